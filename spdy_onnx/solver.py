"""The SPDY dynamic program: least total error under a time budget. Pure numpy, no files or graphs.

    minimise   sum_l errors[l, j_l]
    subject to sum_l times[l, j_l] <= budget

Time is discretised into `buckets` steps of budget/buckets. Times may be anything (non-monotone,
dense slower than sparse); every option stays available.

`groups` ties layers to one shared level: layers an engine fuses into one kernel are timed together
at each level, and only profiles that keep them at one level run at the speed the table says.
"""
from __future__ import annotations

import numpy as np

DEFAULT_BUCKETS = 10_000


class Infeasible(ValueError):
    """No choice of levels fits the budget."""


def _dp(errors: np.ndarray, ticks: np.ndarray, n_buckets: int) -> np.ndarray | None:
    n_layers, n_levels = errors.shape
    inf = np.inf
    best = np.full(n_buckets + 1, inf)
    best[0] = 0.0
    choice = np.zeros((n_layers, n_buckets + 1), dtype=np.int16)
    for layer in range(n_layers):
        new = np.full(n_buckets + 1, inf)
        arg = np.zeros(n_buckets + 1, dtype=np.int16)
        for j in range(n_levels):
            tick = int(ticks[layer, j])
            if tick > n_buckets:
                continue
            cand = np.full(n_buckets + 1, inf)
            cand[tick:] = best[: n_buckets + 1 - tick] + errors[layer, j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        best, choice[layer] = new, arg
    if not np.isfinite(best).any():
        return None
    tau = int(np.argmin(best))
    picks = np.zeros(n_layers, dtype=np.int64)
    for layer in range(n_layers - 1, -1, -1):
        j = int(choice[layer, tau])
        picks[layer] = j
        tau -= int(ticks[layer, j])
    return picks


def tied_units(n_layers: int, groups=None) -> list[list[int]]:
    """Disjoint lists of layer indices, covering every layer once: each group (merged where groups
    share a layer) is one unit, every other layer its own. Checked: indices in range."""
    parent = list(range(n_layers))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in groups or ():
        members = [int(i) for i in group]
        if any(i < 0 or i >= n_layers for i in members):
            raise ValueError(f"group {members} has a layer index outside 0..{n_layers - 1}")
        for i in members[1:]:
            parent[root(i)] = root(members[0])
    units: dict[int, list[int]] = {}
    for i in range(n_layers):
        units.setdefault(root(i), []).append(i)
    return list(units.values())


def solve_dp(errors, times, budget: float, *, buckets: int = DEFAULT_BUCKETS, groups=None) -> np.ndarray:
    """Level index per layer minimising total error with sum of times <= budget (real-valued).

    Layers in one of `groups` (lists of layer indices) get the same level. Raises Infeasible when
    even the fastest choice exceeds the budget.
    """
    errors = np.asarray(errors, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    if errors.shape != times.shape or errors.ndim != 2 or errors.shape[1] < 1:
        raise ValueError(f"errors {errors.shape} and times {times.shape} must be the same (layers, levels) shape")
    if not (np.isfinite(errors).all() and np.isfinite(times).all()) or (times < 0).any():
        raise ValueError("errors and times must be finite, times non-negative")
    if groups:
        units = tied_units(errors.shape[0], groups)
        if len(units) < errors.shape[0]:
            unit_picks = _solve_untied(np.array([errors[u].sum(axis=0) for u in units]),
                                       np.array([times[u].sum(axis=0) for u in units]), budget, buckets)
            picks = np.zeros(errors.shape[0], dtype=np.int64)
            for unit, j in zip(units, unit_picks):
                picks[unit] = j
            return picks
    return _solve_untied(errors, times, budget, buckets)


def _solve_untied(errors: np.ndarray, times: np.ndarray, budget: float, buckets: int) -> np.ndarray:
    n_layers = errors.shape[0]
    if n_layers == 0:
        return np.zeros(0, dtype=np.int64)
    fastest = times.min(axis=1).sum()
    if fastest > budget * (1 + 1e-12):
        raise Infeasible(f"fastest profile takes {fastest:.6g} > budget {budget:.6g}")
    if budget <= 0:
        return times.argmin(axis=1)

    # Rounding can overshoot by up to n_layers/2 buckets; tighten the bucket budget until the real sum fits.
    target_buckets = buckets
    for _ in range(8):
        step = budget / target_buckets
        ticks = np.rint(times / step).astype(np.int64)
        picks = _dp(errors, ticks, buckets)
        if picks is not None and times[np.arange(n_layers), picks].sum() <= budget * (1 + 1e-12):
            return picks
        target_buckets += n_layers  # a slightly smaller effective budget
    # Conservative fallback: ceil never overshoots in real terms.
    step = budget / buckets
    ticks = np.ceil(times / step - 1e-9).astype(np.int64)
    picks = _dp(errors, ticks, buckets)
    if picks is None:
        return times.argmin(axis=1)  # feasible in real terms, too tight for the grid
    return picks


def profile_time(times, picks) -> float:
    times = np.asarray(times, dtype=np.float64)
    return float(times[np.arange(times.shape[0]), np.asarray(picks)].sum())
