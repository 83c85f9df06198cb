"""Data-free per-site error at each level: the share of a site's squared weight mass that pruning removes.

Used when no calibration data is given, and as the starting point of magnitude-based baselines.
"""
from __future__ import annotations

import numpy as np

from spdy_onnx.passes.prune import n_pruned


def removed_energy(weight: np.ndarray, levels: list[float]) -> np.ndarray:
    """e[j] = ||W - magnitude_prune(W, levels[j])||^2 / ||W||^2, computed with one sort."""
    sq = np.sort(np.square(np.asarray(weight, dtype=np.float64).ravel()))
    total = float(sq.sum())
    csum = np.concatenate([[0.0], np.cumsum(sq)])
    out = np.array([csum[n_pruned(sq.size, s)] for s in levels], dtype=np.float64)
    return out / total if total > 0 else out


def magnitude_errors(sources: dict[str, np.ndarray], names: list[str], levels: list[float]) -> np.ndarray:
    return np.stack([removed_energy(sources[n], levels) for n in names]) if names else np.zeros((0, len(levels)))
