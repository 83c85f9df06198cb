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
from spdy_onnx.graph import repeated_sites
from spdy_onnx.solver import solve_dp
from spdy_onnx.strategies import Chooser

log = logging.getLogger(__name__)

N_INIT = 100
PATIENCE = 100
DEFAULT_SECONDS = 40.0   # the paper's schedule is capped in time unless --search-budget says otherwise
# A re-solve (a new aim after a measured draft) re-maps the best c under the new budget and refines it with
# at least RESOLVE_EVALS evaluations and RESOLVE_SHARE of the first search's. With 30 alone the kept profile
# was the least searched one: on MobileNetV2 (batch 16), over three pairs of aims and two seeds, the
# 30-evaluation re-solves ended at a mean loss of 0.170, those with RESOLVE_SHARE at 0.142, and a fresh search
# at the new aim at 0.135 (benchmarks/results/search_resolve_mobilenetv2.txt).
RESOLVE_EVALS = 30
RESOLVE_SHARE = 0.25
# A local search that has converged (patience exhausted at every neighbourhood size) while budget is left
# restarts from the best c with this share of its coefficients drawn afresh. MobileNetV2's search converged
# after 315-701 evaluations of the 958-1677 its 40 s afford; with the rest spent on restarts, the same six
# searches' mean loss fell from 0.153 to 0.135 (same file).
RESTART_SHARE = 0.3
STALE_RESTARTS = 2
PRIORS = ("auto", "shape", "losses")
MIN_SECONDS = 10.0   # the search keeps at least this long after the loss curves
CURVE_SHARE = 0.75   # auto: the loss curves may take this share of the search's budget
MIN_CURVE_LEVELS = 2   # auto: fewer affordable sparse levels per site than this -> the quadratic shape
TIMED_EVALUATIONS = 3   # auto: the median of this many evaluations sets the cost of one


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
        if value != int(value):
            raise SpdyError(f"bad --search-budget '{text}': a number of evaluations is a whole number "
                            "(or give a time: 5m, 90s)")
        return int(value), None
    return None, value * {"m": 60, "min": 60, "s": 1, "sec": 1, "h": 3600}[unit]


def error_shape(n_levels: int) -> np.ndarray:
    """e(j) = (j / (n-1))^2: SPDY's fixed per-level shape; the coefficients set the per-site scale."""
    return (np.arange(n_levels) / max(1, n_levels - 1)) ** 2


def spdy_search(n_sites: int, n_levels: int, profile_of, loss_of, *, seed: int = 0, n_init: int = N_INIT,
                patience: int = PATIENCE, max_evals: int | None = None, max_seconds: float | None = None,
                start: np.ndarray | None = None, seeds=(), restarts: bool = True,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """Random initial coefficients, then shrinking-neighbourhood local search.

    profile_of(c) -> picks meeting the budget; loss_of(picks) -> float. Returns (best c, its picks,
    its loss, stats). With `start`, the random phase is skipped and the search refines `start`;
    `seeds` are evaluated before the random ones. With a budget and `restarts`, what the local search
    leaves of it goes to local searches from perturbed copies of the best c.
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

    def local_search(c0, picks0, loss0):
        """Shrinking-neighbourhood local search from c0; stops after `patience` failures at every size."""
        k = max(1, int(round(0.1 * n_sites)))
        while k >= 1 and not out_of_budget():
            fails = 0
            while fails < patience and not out_of_budget():
                c = c0.copy()
                idx = rng.choice(n_sites, size=min(k, n_sites), replace=False)
                c[idx] = rng.uniform(0, 1, idx.size)
                picks, loss = evaluate(c)
                bar.update(1)
                if loss < loss0:
                    c0, picks0, loss0, fails = c, picks, loss, 0
                    if loss < best_loss:
                        bar.set_postfix(best=f"{loss:.5g}", k=k)
                else:
                    fails += 1
            k -= 1
        return c0, picks0, loss0

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
    if best_c is not None:
        best_c, best_picks, best_loss = local_search(best_c, best_picks, best_loss)
    n_restarts = stale = 0
    # the local search stops in the basin it started in; budget it left unused goes to restarts from the
    # best c (never without a budget: then the result is the paper's schedule, run to its end), until two
    # restarts in a row find no profile not seen before (a small model's space is soon exhausted)
    while restarts and best_c is not None and (max_evals is not None or max_seconds is not None) \
            and not out_of_budget() and stale < STALE_RESTARTS:
        n_restarts += 1
        known = len(seen)
        c0 = best_c.copy()
        idx = rng.choice(n_sites, size=max(1, int(round(RESTART_SHARE * n_sites))), replace=False)
        c0[idx] = rng.uniform(0, 1, idx.size)
        picks0, loss0 = evaluate(c0)
        bar.update(1)
        c, picks, loss = local_search(c0, picks0, loss0)
        if loss < best_loss:
            best_c, best_picks, best_loss = c, picks, loss
            bar.set_postfix(best=f"{best_loss:.5g}")
        stale = stale + 1 if len(seen) == known else 0
    bar.close()
    stats = {"evaluations": evals, "distinct_profiles": len(seen), "seconds": time.perf_counter() - t0,
             "best_loss": best_loss, "restarts": n_restarts}
    return best_c, best_picks, best_loss, stats


class SpdySearch(Chooser):
    """Chooser running the search; later re-solves (tighter budgets) refine the best c found so far."""

    def __init__(self, *, search_budget=None, seed=0, progress=True, prior: str = "auto", **kw):
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
        """What the coefficients scale: each site's measured loss curve, or SPDY's quadratic shape.

        The curves are the dp-loss errors (one evaluation per site and sparse level), so the first
        candidate, a constant c, is dp-loss's own profile and the search keeps it unless it finds better.
        `losses` measures every level; `auto` measures the curves at as many evenly spaced levels
        as fit in CURVE_SHARE of the search budget (linear in between), and falls back to the shape
        when fewer than MIN_CURVE_LEVELS fit (a large model with slow evaluations). The curves'
        time comes out of the search's."""
        if self.shape is not None:
            return self.shape
        measured = None
        if self.prior == "losses":
            measured = list(range(1, n_levels))
        elif self.prior == "auto":
            measured = self._affordable_levels(n_sites, n_levels)
        if measured is None:
            self.shape = np.tile(error_shape(n_levels), (n_sites, 1))
            # a weight several sites share is priced once, as its measured curve would be
            self.shape[sorted(repeated_sites(getattr(self.evaluator, "sites", [])))] = 0.0
            self.info.setdefault("search_prior", {}).update(kind="shape")
            return self.shape
        t0, before = time.perf_counter(), self.evaluator.evaluations
        self.shape = single_site_losses(self.evaluator, n_levels, levels=measured, progress=self.progress)
        spent = time.perf_counter() - t0
        prior = self.info.setdefault("search_prior", {})
        prior.update(kind="losses", levels_measured=measured, seconds=spent)
        if not prior.get("seconds_per_evaluation") and self.evaluator.evaluations > before:
            prior["seconds_per_evaluation"] = spent / (self.evaluator.evaluations - before)
        log.info("search prior: loss curves of %d sites at %d of %d sparse levels in %.1fs",
                 n_sites, len(measured), n_levels - 1, spent)
        if self.max_seconds is not None:
            self.max_seconds = max(MIN_SECONDS, self.max_seconds - spent)
        elif self.max_evals is not None:   # only what was run: curves in the journal cost nothing
            self.max_evals = max(1, self.max_evals - (self.evaluator.evaluations - before))
        return self.shape

    def _affordable_levels(self, n_sites: int, n_levels: int) -> list[int] | None:
        """Evenly spaced sparse levels (always the sparsest) whose curves fit the auto share of the
        budget, timed on a few uncached evaluations (one timing on a noisy machine flipped MiniLM-L6
        between curves and shape); evaluations already in the journal are free."""
        repeats = repeated_sites(getattr(self.evaluator, "sites", []))   # no curves of their own
        wanted = [(i, j) for i in range(n_sites) if i not in repeats for j in range(1, n_levels)]
        uncached = [(i, j) for i, j in wanted if not self.evaluator.is_cached(one_site(n_sites, i, j))]
        if not uncached:
            return list(range(1, n_levels))
        if self.max_evals is not None:
            affordable = CURVE_SHARE * self.max_evals
            per_eval = None
        else:
            self.evaluator.loss(np.zeros(n_sites, dtype=np.int64))   # the base every curve subtracts
            # the sparsest levels first: every choice of levels measures them
            uncached.sort(key=lambda ij: (-ij[1], ij[0]))
            spent = []
            for i, j in uncached[:TIMED_EVALUATIONS]:
                t0 = time.perf_counter()
                self.evaluator.loss(one_site(n_sites, i, j))
                spent.append(time.perf_counter() - t0)
            per_eval = max(float(np.median(spent)), 1e-6)
            affordable = CURVE_SHARE * self.max_seconds / per_eval
        per_site = int(affordable // max(1, n_sites - len(repeats)))
        self.info["search_prior"] = {"seconds_per_evaluation": per_eval, "affordable_levels_per_site": per_site}
        if per_site >= n_levels - 1:
            return list(range(1, n_levels))
        if per_site < MIN_CURVE_LEVELS:
            log.info("search prior: the quadratic shape (loss curves at %d+ levels of %d sites would not fit "
                     "%.0f%% of the search budget; --search-prior losses measures them anyway)",
                     MIN_CURVE_LEVELS, n_sites, 100 * CURVE_SHARE)
            return None
        return curve_levels(n_levels, per_site)

    def _random_starts(self) -> int:
        """With measured curves the search starts from dp-loss's profile (c = 0.5, the middle of the
        coefficients' range, so local moves go both ways), and the random starts take at most a third
        of the evaluations the budget affords: on MiniLM-L6 at 2x with 64 evaluations, 21 random
        starts then local search reached a lower loss than the paper's 100 random starts in 3 of 3
        seeds (0.583-0.620 against 0.616-0.640)."""
        expected = self.max_evals
        per_eval = self.info.get("search_prior", {}).get("seconds_per_evaluation")
        if expected is None and self.max_seconds is not None and per_eval:
            expected = int(self.max_seconds / per_eval)
        return N_INIT if expected is None else max(1, min(N_INIT, expected // 3))

    def choose(self, times, budget):
        shape = self._error_shape(times.shape[0], times.shape[1])

        def profile_of(c):
            return solve_dp(np.asarray(c)[:, None] * shape, times, budget, groups=self.groups)

        profile_of(np.zeros(times.shape[0]))  # raises Infeasible early
        refine = self.best_c is not None
        measured_prior = self.info.get("search_prior", {}).get("kind") == "losses"
        max_evals, patience = self.max_evals, PATIENCE
        seeds = [np.full(times.shape[0], 0.5)] if measured_prior else []
        if refine:
            max_evals = resolve_evaluations(self.info["search"][0]["evaluations"])
            patience = min(PATIENCE, max_evals)
        c, picks, loss, stats = spdy_search(
            times.shape[0], times.shape[1], profile_of, self.evaluator.loss, seed=self.seed + (1 if refine else 0),
            max_evals=max_evals, max_seconds=self.max_seconds, start=self.best_c, patience=patience, seeds=seeds,
            n_init=self._random_starts() if measured_prior else N_INIT, progress=self.progress)
        if picks is None:
            raise SpdyError("the calibration loss is NaN or infinite for every candidate the search tried: the "
                            "pruned models' outputs overflow on this data (check the calibration data's scale, "
                            "or try --reconstruct magnitude)")
        self.best_c = c
        self.info.setdefault("search", []).append(stats)
        log.info("search: %d evaluations (%d distinct profiles) in %.1fs, best loss %.5g",
                 stats["evaluations"], stats["distinct_profiles"], stats["seconds"], loss)
        return picks


def resolve_evaluations(first_search_evaluations: int) -> int:
    """How many evaluations a re-solve gets, given how many the first search made."""
    return max(RESOLVE_EVALS, int(round(RESOLVE_SHARE * first_search_evaluations)))


def one_site(n_sites: int, i: int, j: int) -> np.ndarray:
    """Picks with site i at level j and every other site dense."""
    picks = np.zeros(n_sites, dtype=np.int64)
    picks[i] = j
    return picks


def curve_levels(n_levels: int, count: int) -> list[int]:
    """`count` sparse levels (1..n_levels-1) spread evenly, the sparsest always among them."""
    points = np.unique(np.round(np.linspace(0, n_levels - 1, count + 1)).astype(int))
    return [int(j) for j in points if j > 0]


def single_site_losses(evaluator, n_levels: int, *, levels=None, progress=True) -> np.ndarray:
    """dp-loss baseline: loss increase with one site at each level and all others dense.

    With `levels`, only those sparse levels are evaluated and the rest of each curve is linear
    between them (from 0 at dense); the sparsest level must be among them."""
    n_sites = len(evaluator.sites)
    levels = list(range(1, n_levels)) if levels is None else sorted(int(j) for j in levels)
    if not levels or levels[-1] != n_levels - 1 or levels[0] < 1:
        raise ValueError("levels must be sparse levels and include the sparsest")
    base = evaluator.loss(np.zeros(n_sites, dtype=np.int64))
    errors = np.zeros((n_sites, n_levels))
    bar = tqdm(total=n_sites * len(levels), desc="per-site losses", unit="eval", disable=not progress,
               leave=False)
    points = np.array([0] + levels)
    repeats = repeated_sites(evaluator.sites)
    bar.total -= len(repeats) * len(levels)
    for i in range(n_sites):
        if i in repeats:
            continue
        values = [0.0]
        for j in levels:
            values.append(max(0.0, evaluator.loss(one_site(n_sites, i, j)) - base))
            bar.update(1)
        errors[i] = np.interp(np.arange(n_levels), points, values)
    bar.close()
    return errors
