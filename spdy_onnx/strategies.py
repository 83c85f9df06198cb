"""How a profile is chosen under a time budget: SPDY's learned search or one of the baselines.

Every strategy sees the same latency table and the same reconstruction database, so the measured
speed check and the weights are identical across them; only the choice of levels differs.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from spdy_onnx import graph, modelio
from spdy_onnx.errors import SpdyError
from spdy_onnx.scores import magnitude_errors
from spdy_onnx.solver import Infeasible, solve_dp

log = logging.getLogger(__name__)


class Chooser:
    """Maps (times, budget) to level picks, and a profile to the weights to write."""

    ties_groups = True   # whether `groups` constrain its picks (the DP strategies)

    def __init__(self, *, sites, levels, database, evaluator=None, feeds=None, groups=None):
        self.sites = sites
        self.names = [s.name for s in sites]
        self.groups = groups or []   # index lists of sites the engine fuses: the DP keeps each at one level
        self.levels = levels
        self.database = database
        self.evaluator = evaluator
        self._feeds = feeds
        self.info: dict = {}
        self.refit = None          # callable {initializer: weight} -> corrected weights, set with data
        self.correction = None     # callable {initializer: weight} -> (tuned weights and biases, summary)
        self.correction_summary: dict | None = None
        self._final: tuple = (None, None, None)   # (profile key, weights, correction summary)

    def choose(self, times: np.ndarray, budget: float) -> np.ndarray:
        raise NotImplementedError

    def weights(self, profile: dict[str, int]) -> dict[str, np.ndarray]:
        """{initializer name: source-layout array} for every site in the profile."""
        by_name = {s.name: s for s in self.sites}
        return {by_name[n].weight: self.database.weight(n, j) for n, j in profile.items()}

    @property
    def corrects(self) -> bool:
        """Whether the written weights differ from the database's (same zeros, other values)."""
        return self.refit is not None or self.correction is not None

    def final_weights(self, profile: dict[str, int]) -> dict[str, np.ndarray]:
        """The weights to write: the database's, after the sequential and global corrections if any.

        Corrections change values only, never which weights are zero. Also returns tuned biases
        ({initializer: array}); memoised for the last profile."""
        weights = self.weights(profile)
        if not self.corrects:
            return weights
        key = tuple(sorted(profile.items()))
        if self._final[0] != key:
            final = dict(weights)
            if self.refit is not None:
                final = self.refit(final)
            summary = None
            if self.correction is not None:
                from spdy_onnx.correct import CorrectionUnsupported
                try:
                    tuned, summary = self.correction(final)
                    final = {**final, **tuned}
                except CorrectionUnsupported as exc:
                    # an optional refinement: the measured draft weights are still a valid result
                    log.warning("%s; the global correction is skipped and the reconstructed weights are "
                                "written as they are (lower accuracy)", exc)
                    self.correction = None
                    self.info["global_correction_skipped"] = str(exc)
            self._final = (key, final, summary)
        self.correction_summary = self._final[2]
        return self._final[1]

    def timing_feeds(self):
        return self._feeds

    def quality(self, profile: dict[str, int], corrected: bool = True) -> dict:
        out = dict(self.info)
        if self.evaluator is not None:
            picks = self.picks_of(profile)
            out["calibration_loss"] = float(self.evaluator.loss(picks))   # memoised by the search
            out["loss"] = self.evaluator.loss_name
            tuned = self.corrects and corrected
            if tuned or len(self.evaluator.outputs) > 1:   # one pass over the samples gives both figures
                final = self.final_weights(profile) if tuned else self.evaluator.weights_of(picks)
                per_output = self.evaluator.output_losses(final)
                if tuned:
                    out["calibration_loss_before_correction"] = out["calibration_loss"]
                    out["calibration_loss"] = self.evaluator.combined(per_output)
                if len(per_output) > 1:
                    out["calibration_loss_per_output"] = per_output
            if self.correction_summary is not None and corrected:
                out["global_correction"] = self.correction_summary
        return out

    def picks_of(self, profile: dict[str, int]) -> np.ndarray:
        return np.array([profile[n] for n in self.names], dtype=np.int64)


class ErrorDP(Chooser):
    """The DP on fixed per-site errors (data-free magnitude errors, or measured loss increases)."""

    def __init__(self, errors: np.ndarray, **kw):
        super().__init__(**kw)
        self.errors = np.array(errors, dtype=np.float64)
        # a weight several sites share is one pruning, priced once: the solver sums a tied group's errors
        self.errors[sorted(graph.repeated_sites(kw.get("sites") or []))] = 0.0

    def choose(self, times, budget):
        return solve_dp(self.errors, times, budget, groups=self.groups)


class Uniform(Chooser):
    """One level for every site: the least sparse level whose total time fits the budget."""

    ties_groups = False

    def choose(self, times, budget):
        totals = times.sum(axis=0)
        order = np.argsort(self.levels, kind="stable")
        for j in order:
            if totals[j] <= budget:
                return np.full(len(self.names), j, dtype=np.int64)
        raise Infeasible("no single sparsity level for all sites meets the target")


class GlobalMagnitude(Chooser):
    """One magnitude threshold over all sites, raised until the profile fits the budget.

    A site's level is the least sparse grid level removing at least the share of its weights below
    the threshold.
    """

    ties_groups = False

    def __init__(self, sources: dict, **kw):
        super().__init__(**kw)
        self.sorted = {n: np.sort(np.abs(sources[n].astype(np.float32)).ravel()) for n in self.names}
        everything = np.concatenate(list(self.sorted.values()))
        self.thresholds = np.quantile(everything, np.linspace(0.0, 0.999, 400))
        self.grid = np.asarray(self.levels)

    def picks_at(self, threshold: float) -> np.ndarray:
        picks = []
        for n in self.names:
            w = self.sorted[n]
            share = np.searchsorted(w, threshold, side="left") / w.size
            j = int(np.searchsorted(self.grid, share - 1e-9, side="left"))
            picks.append(min(j, len(self.grid) - 1))
        return np.array(picks, dtype=np.int64)

    def choose(self, times, budget):
        rows = np.arange(len(self.names))
        for threshold in self.thresholds:
            picks = self.picks_at(threshold)
            if times[rows, picks].sum() <= budget:
                self.info["global_threshold"] = float(threshold)
                return picks
        raise Infeasible("no global magnitude threshold meets the target")


NO_DATA = ("NO CALIBRATION DATA (--data): accuracy is NOT being protected. The weights are magnitude-pruned, with "
           "no reconstruction, and SPDY's profile uses a data-free error model (share of weight magnitude removed).")


def make_chooser(strategy, *, prep, sites, table, data, samples, reconstruct, loss, search_budget, seed,
                 cache_dir, progress, eval_samples: int | None = None, refit: bool = False, correct_epochs: int = 0,
                 correct_seconds: float | None = None, correct_layers: float = 0.0, search_prior: str = "auto",
                 validation: dict | None = None) -> Chooser:
    """The strategy's chooser, with the corrections asked for. `data` is the calibration data's path, or
    the samples already loaded by calibrate.load_data; `validation` (loaded samples) is what
    the global correction judges its epochs on instead of a slice of the calibration data."""
    chooser = _make_chooser(strategy, prep=prep, sites=sites, table=table, data=data, samples=samples,
                            reconstruct=reconstruct, loss=loss, search_budget=search_budget, seed=seed,
                            cache_dir=cache_dir, progress=progress, eval_samples=eval_samples,
                            search_prior=search_prior)
    if refit and chooser.evaluator is not None:
        from spdy_onnx.refit import sequential_refit
        dense = {s.weight: chooser.database.weight(s.name, 0) for s in sites}
        calib = chooser.evaluator.data
        chooser.refit = lambda weights: sequential_refit(prep.calibration_model, sites, dense, weights, calib, prep.batch_size,
                                                         progress=progress)
    if correct_epochs > 0 and chooser.evaluator is not None:
        from spdy_onnx import correct
        if not correct.available():
            log.warning("PyTorch is not installed: the global correction of the kept weights is skipped, and "
                        "accuracy will be lower (pip install 'spdy-onnx[torch]', or --correct-epochs 0 to "
                        "silence this)")
        else:
            evaluator = chooser.evaluator
            chooser.correction = lambda weights: correct.global_correction(
                prep.calibration_model, sites, weights, evaluator.data, loss=evaluator.loss_name,
                batch_size=prep.batch_size, epochs=correct_epochs,
                max_seconds=correct_seconds or correct.DEFAULT_SECONDS, seed=seed, progress=progress,
                validation=validation, loss_scales=evaluator.scales, layer_weight=correct_layers)
    return chooser


def _make_chooser(strategy, *, prep, sites, table, data, samples, reconstruct, loss, search_budget, seed,
                  cache_dir, progress, eval_samples=None, search_prior="auto") -> Chooser:
    from spdy_onnx.database import magnitude_database

    levels = list(table.levels)
    sources = graph.read_weights(prep.model, sites)
    groups = table.tied_groups([s.name for s in sites])

    if data is None:
        log.warning(NO_DATA)
        if strategy == "dp-loss":
            raise SpdyError("--strategy dp-loss measures losses and needs calibration data (--data)")
        database = magnitude_database(sites, sources, levels, table.pattern)
        feeds = prep.example_inputs()
        common = dict(sites=sites, levels=levels, database=database, feeds=feeds, groups=groups)
        if strategy == "uniform":
            return Uniform(**common)
        if strategy == "global-magnitude":
            return GlobalMagnitude(sources, **common)
        return ErrorDP(magnitude_errors(sources, [s.name for s in sites], levels), **common)

    from spdy_onnx import calibrate, evaluate, search
    from spdy_onnx.reconstruct import build_database

    # where the time of this setup goes (report: quality.calibration_phases_s), for the tool-time goals
    setup = {}
    if isinstance(data, dict):   # loaded and checked by the caller (optimize does it before profiling)
        calib = data
    else:
        t0 = time.perf_counter()
        calib = calibrate.load_data(data, prep.specs, samples=samples, index_rows=prep.index_rows)
        setup["load_data_s"] = time.perf_counter() - t0
    eval_samples = evaluate.DEFAULT_EVAL_SAMPLES if eval_samples is None else int(eval_samples)
    feeds = calibrate.timing_batch(calib, prep.specs)
    t0 = time.perf_counter()
    built: dict = {}
    database = build_database(prep, sites, sources, levels, calib, method=reconstruct,
                                 pattern=table.pattern, cache_dir=cache_dir, progress=progress, timings=built)
    setup["database_s"] = time.perf_counter() - t0
    setup.update(built)
    from spdy_onnx import cache
    memo = cache.cache_key(model=prep.digest, sites=[s.name for s in sites], levels=levels, loss=loss,
                           database=Path(database.folder).name if hasattr(database, "folder") else type(database).__name__,
                           pattern=table.pattern,
                           data=calibrate.data_digest(calib), samples=eval_samples,
                           version=6)   # 6: per-sample MSE outputs normalised by their spread; the database by its key
    journal = Path(cache_dir or cache.default_cache_dir()) / "evaluations" / f"{memo}.jsonl"
    t0 = time.perf_counter()
    evaluator = evaluate.Evaluator(prep.calibration_model, sites, database, calib, loss=loss, specs=prep.specs,
                                   eval_samples=eval_samples, journal=journal)
    setup["evaluator_s"] = time.perf_counter() - t0
    common = dict(sites=sites, levels=levels, database=database, evaluator=evaluator, feeds=feeds, groups=groups)
    if strategy == "uniform":
        chooser = Uniform(**common)
    elif strategy == "global-magnitude":
        chooser = GlobalMagnitude(sources, **common)
    elif strategy == "magnitude-dp":
        chooser = ErrorDP(magnitude_errors(sources, [s.name for s in sites], levels), **common)
    elif strategy == "dp-loss":
        t0 = time.perf_counter()
        chooser = ErrorDP(search.single_site_losses(evaluator, len(levels), progress=progress), **common)
        setup["single_site_losses_s"] = time.perf_counter() - t0
    else:
        chooser = search.SpdySearch(search_budget=search_budget, seed=seed, progress=progress, prior=search_prior,
                                    **common)
    chooser.info["calibration_phases_s"] = setup
    return chooser
