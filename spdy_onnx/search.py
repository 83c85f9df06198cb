"""The SPDY search: learn per-site sensitivity coefficients c, map each c through the DP to a profile
that meets the time budget, and keep the c whose stitched model has the least calibration loss.

Pure numpy plus two callables (the DP and the loss), so it is testable without any model.
"""
from __future__ import annotations

import logging
import re
import time

import numpy as np
from tqdm.auto import tqdm

from spdy_onnx.errors import SpdyError
from spdy_onnx.solver import solve_dp
from spdy_onnx.strategies import Chooser

log = logging.getLogger(__name__)

N_INIT = 100
PATIENCE = 100
DEFAULT_SECONDS = 40.0   # the paper's schedule is capped in time unless --search-budget says otherwise
RESOLVE_EVALS = 30   # a re-solve under a tighter budget re-maps the best c and refines it briefly
PRIORS = ("shape", "losses")
MIN_SECONDS = 10.0   # the search keeps at least this long after the loss curves


def parse_budget(text) -> tuple[int | None, float | None]:
    """'600' -> (600 evaluations, None); '5m' -> (None, 300 s); '90s' -> (None, 90 s); None -> (None, None)."""
    if text is None or text == "":
        return None, None
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(m|min|s|sec|h)?", s)
    if not m:
        raise SpdyError(f"bad --search-budget '{text}': give evaluations (600) or time (5m, 90s)")
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0:
        raise SpdyError(f"bad --search-budget '{text}': must be positive")
    if unit is None:
        return int(value), None
    return None, value * {"m": 60, "min": 60, "s": 1, "sec": 1, "h": 3600}[unit]


def error_shape(n_levels: int) -> np.ndarray:
    """e(j) = (j / (n-1))^2: SPDY's fixed per-level shape; the coefficients set the per-site scale."""
    return (np.arange(n_levels) / max(1, n_levels - 1)) ** 2


def spdy_search(n_sites: int, n_levels: int, profile_of, loss_of, *, seed: int = 0, n_init: int = N_INIT,
                patience: int = PATIENCE, max_evals: int | None = None, max_seconds: float | None = None,
                start: np.ndarray | None = None, seeds=(), progress: bool = True) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """Random initial coefficients, then shrinking-neighbourhood local search.

    profile_of(c) -> picks meeting the budget; loss_of(picks) -> float. Returns (best c, its picks,
    its loss, stats). With `start`, the random phase is skipped and the search refines `start`;
    `seeds` are evaluated before the random ones.
    """
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    evals = 0
    seen: dict[tuple, float] = {}

    def out_of_budget():
        return (max_evals is not None and evals >= max_evals) or \
               (max_seconds is not None and time.perf_counter() - t0 >= max_seconds)

    def evaluate(c):
        nonlocal evals
        picks = profile_of(c)
        key = tuple(int(j) for j in picks)
        if key not in seen:
            seen[key] = float(loss_of(picks))
        evals += 1
        return picks, seen[key]

    bar = tqdm(desc="search", unit="eval", disable=not progress, leave=False, total=max_evals)
    best_c = best_picks = None
    best_loss = np.inf
    inits = [start] if start is not None else \
        [np.asarray(c, dtype=np.float64) for c in seeds] + [rng.uniform(0, 1, n_sites) for _ in range(n_init)]
    for c in inits:
        picks, loss = evaluate(c)
        bar.update(1)
        if loss < best_loss:
            best_c, best_picks, best_loss = np.array(c, dtype=np.float64), picks, loss
            bar.set_postfix(best=f"{best_loss:.5g}")
        if out_of_budget():
            break
    k = max(1, int(round(0.1 * n_sites)))
    while k >= 1 and best_c is not None and not out_of_budget():
        fails = 0
        while fails < patience and not out_of_budget():
            c = best_c.copy()
            idx = rng.choice(n_sites, size=min(k, n_sites), replace=False)
            c[idx] = rng.uniform(0, 1, idx.size)
            picks, loss = evaluate(c)
            bar.update(1)
            if loss < best_loss:
                best_c, best_picks, best_loss, fails = c, picks, loss, 0
                bar.set_postfix(best=f"{best_loss:.5g}", k=k)
            else:
                fails += 1
        k -= 1
    bar.close()
    stats = {"evaluations": evals, "distinct_profiles": len(seen), "seconds": time.perf_counter() - t0,
             "best_loss": best_loss}
    return best_c, best_picks, best_loss, stats


class SpdySearch(Chooser):
    """Chooser running the search; later re-solves (tighter budgets) refine the best c found so far."""

    def __init__(self, *, search_budget=None, seed=0, progress=True, prior: str = "shape", **kw):
        super().__init__(**kw)
        self.max_evals, self.max_seconds = parse_budget(search_budget)
        if search_budget is None:
            self.max_seconds = DEFAULT_SECONDS
        self.seed = seed
        self.progress = progress
        self.prior = prior
        self.shape = None   # (sites, levels) error shape the coefficients scale
        self.best_c = None

    def _error_shape(self, n_sites: int, n_levels: int) -> np.ndarray:
        """SPDY's quadratic shape, or with --search-prior losses each site's measured loss curve (the
        dp-loss errors, n_sites x (n_levels - 1) evaluations, taken out of the search's time). With the
        curves the first candidate, c = 1, is exactly dp-loss's profile, so the search starts from it
        and keeps it unless it finds better."""
        if self.shape is not None:
            return self.shape
        if self.prior == "losses":
            t0 = time.perf_counter()
            self.shape = single_site_losses(self.evaluator, n_levels, progress=self.progress)
            spent = time.perf_counter() - t0
            self.info["search_prior"] = {"kind": "losses", "seconds": spent}
            if self.max_seconds is not None:
                self.max_seconds = max(MIN_SECONDS, self.max_seconds - spent)
        else:
            self.shape = np.tile(error_shape(n_levels), (n_sites, 1))
            self.info["search_prior"] = {"kind": "shape"}
        return self.shape

    def choose(self, times, budget):
        shape = self._error_shape(times.shape[0], times.shape[1])

        def profile_of(c):
            return solve_dp(np.asarray(c)[:, None] * shape, times, budget, groups=self.groups)

        profile_of(np.zeros(times.shape[0]))  # raises Infeasible early
        refine = self.best_c is not None
        measured_prior = self.info.get("search_prior", {}).get("kind") == "losses"
        c, picks, loss, stats = spdy_search(
            times.shape[0], times.shape[1], profile_of, self.evaluator.loss, seed=self.seed + (1 if refine else 0),
            max_evals=self.max_evals if not refine else RESOLVE_EVALS,
            max_seconds=self.max_seconds, start=self.best_c, patience=PATIENCE if not refine else RESOLVE_EVALS,
            seeds=[np.ones(times.shape[0])] if measured_prior else (), progress=self.progress)
        if picks is None:
            raise SpdyError("the calibration loss is NaN or infinite for every candidate the search tried: the "
                            "pruned models' outputs overflow on this data (check the calibration data's scale, "
                            "or try --reconstruct magnitude)")
        self.best_c = c
        self.info.setdefault("search", []).append(stats)
        log.info("search: %d evaluations (%d distinct profiles) in %.1fs, best loss %.5g",
                 stats["evaluations"], stats["distinct_profiles"], stats["seconds"], loss)
        return picks


def single_site_losses(evaluator, n_levels: int, *, progress=True) -> np.ndarray:
    """dp-loss baseline: loss increase with one site at each level and all others dense."""
    n_sites = len(evaluator.sites)
    base = evaluator.loss(np.zeros(n_sites, dtype=np.int64))
    errors = np.zeros((n_sites, n_levels))
    bar = tqdm(total=n_sites * (n_levels - 1), desc="per-site losses", unit="eval", disable=not progress,
               leave=False)
    for i in range(n_sites):
        for j in range(1, n_levels):
            picks = np.zeros(n_sites, dtype=np.int64)
            picks[i] = j
            errors[i, j] = max(0.0, evaluator.loss(picks) - base)
            bar.update(1)
    bar.close()
    return errors
