"""Level factors: what a dense or lightly pruned site costs among pruned neighbours.

Why: the table times each level with every site at that level, and the solver adds up times from
different levels. For the low levels that sum is short on DeepSparse: a site left dense or lightly
pruned between pruned ones runs slower than in the run where every site was at its level. With half the
sites (fused groups whole) at a low level and the rest at 85%, the low-level sites took 1.03-1.47x the
table's time when MiniLM-L6 (batch 1, 1 core) was profiled, pooled 1.19, and 1.07-1.35x on MobileNetV2
(batch 16), pooled 1.15 (`table_meta.level_context` in benchmarks/results/accuracy_*_level_context.json);
repeated three times each by benchmarks/level_context.py, 0.92-1.22x, pooled 1.08 and 1.03. SPDY keeps
such sites where the baselines do not, and its drafts measured further under their prediction.

With `--level-context`, right after profiling, each level below CONTEXT_BELOW is measured once in that
setting, with one file at the background level alone to fix the machine's speed, and one factor pooled
over those levels (single runs are noisy) scales their times. The dense total and the fixed time stay
as measured. It is off by default: in a paired run on one MiniLM-L6 table it brought neither the first
draft nor the kept profile's accuracy consistently closer (benchmarks/results/accuracy_minilm_factors_*).
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

CONTEXT_BELOW = 0.6     # levels under this are measured among pruned neighbours
BACKGROUND = 0.85       # the neighbours' level (the nearest grid level at or above CONTEXT_BELOW)
MAX_FACTOR = 1.8        # a larger pooled factor is taken as a noisy run, not as the engine
# Engine runs are budgeted from profiling's own pace: as many low levels as fit, the dense level first,
# none when fewer than two runs fit. MiniLM-L6 takes 4-8 s per run (all four fit); a BERT-base-size model
# about 22 s at batch 1 on one core (none: its tool time was 16.9-19.6 minutes in steady hours, for a
# 20-minute goal).
MAX_SECONDS = 40.0


def designs(levels: list[float], units: list[list[int]], n_sites: int):
    """(background level, [(level, boolean mask of the sites at that level)]) or None without a grid for it.

    Units (fused groups and the sites sharing one weight whole, other sites alone) alternate between the
    level and the background; the parity flips from one level to the next so both halves are covered."""
    sparse = [j for j, v in enumerate(levels) if v >= CONTEXT_BELOW]
    low = [j for j, v in enumerate(levels) if v < CONTEXT_BELOW]
    if not sparse or not low or len(units) < 2:
        return None
    background = min(sparse, key=lambda j: abs(levels[j] - BACKGROUND))
    out = []
    for k, j in enumerate(low):
        mask = np.zeros(n_sites, dtype=bool)
        for u, unit in enumerate(units):
            if u % 2 == k % 2:
                mask[unit] = True
        out.append((j, mask))
    return background, out


def pooled_factor(times: np.ndarray, background: int, design: list[tuple[int, np.ndarray]],
                  background_ms: float, background_predicted_ms: float, measured_ms: list[float]) -> tuple[float, list[float]]:
    """One factor for the low levels, and the raw factor of each design.

    `times` is the table (sites x levels). A design's file is the background file with the masked sites
    moved to level j; its measured increase over the background file, plus the masked sites' background
    time, is what those sites took at level j, set against the table's time for them there. Measurements
    are first scaled to the table's speed by the background file."""
    speed = background_predicted_ms / background_ms
    took, table_ms, each = 0.0, 0.0, []
    for (j, mask), ms in zip(design, measured_ms):
        at_level = float(times[mask, j].sum())
        here = (ms - background_ms) * speed + float(times[mask, background].sum())
        each.append(here / at_level if at_level > 0 else 1.0)
        took += here
        table_ms += at_level
    pooled = took / table_ms if table_ms > 0 else 1.0
    return float(min(max(pooled, 1.0), MAX_FACTOR)), each


def measure_level_factors(prep, table, total_ms, max_runs: int | None = None) -> tuple[list[float], dict] | None:
    """Per-level factors for `table` (1 at and above CONTEXT_BELOW) and what was measured, or None when
    the grid has nothing to measure or fewer than two runs are allowed. `total_ms(path)` times one file
    the way the table was timed; `max_runs` caps the runs (the background file and one per level)."""
    from spdy_onnx import graph
    from spdy_onnx.database import magnitude_database
    from spdy_onnx.passes.prune import write_weights
    from spdy_onnx.solver import tied_units

    sites = [s for s in prep.all_sites if s.name in table.times]
    names = [s.name for s in sites]
    index = {n: i for i, n in enumerate(names)}
    shared = [[index[n] for n in group] for group in graph.shared_weight_groups(sites)]   # one array, one level
    units = sorted(tied_units(len(names), table.tied_groups(names) + shared), key=min)
    plan = designs(list(table.levels), units, len(names))
    if plan is None:
        return None
    background, design = plan
    if max_runs is not None:
        if max_runs < 2:
            log.info("level factors not measured: one engine run takes too long for %.0f s", MAX_SECONDS)
            return None
        design = design[:max_runs - 1]
    database = magnitude_database(sites, graph.read_weights(prep.model, sites), list(table.levels), table.pattern)

    def file_for(picks, tag):
        weights = {s.weight: database.weight(s.name, int(j)) for s, j in zip(sites, picks)}
        return prep.static_copy(write_weights(prep.model, weights), tag)

    base = np.full(len(names), background)
    log.info("timing %d low levels among pruned neighbours (level %g)", len(design), table.levels[background])
    background_ms = total_ms(file_for(base, "context-background"))
    measured = [total_ms(file_for(np.where(mask, j, base), f"context-{j}")) for j, mask in design]
    predicted = table.predicted_ms({n: background for n in names})
    raw = np.array([table.times[n] for n in names], dtype=np.float64)
    factor, each = pooled_factor(raw, background, design, background_ms, predicted, measured)
    factors = [factor if v < CONTEXT_BELOW else 1.0 for v in table.levels]
    info = {"background_level": table.levels[background], "background_ms": background_ms,
            "background_predicted_ms": predicted, "factor": factor,
            "per_level": {str(table.levels[j]): {"measured_ms": ms, "raw_factor": f}
                          for (j, _), ms, f in zip(design, measured, each)}}
    log.info("low levels among pruned neighbours: %.2fx the table's time (per level: %s)", factor,
             ", ".join(f"{table.levels[j]:g}: {f:.2f}" for (j, _), f in zip(design, each)))
    return factors, info
