"""The reconstruction database: for every site and level, the pruned weight to stitch in.

Stitching a candidate profile is then only a lookup. Magnitude pruning is the cheap option; the
second-order (OBS-class) reconstruction lives in `obs.py` and is stored on disk per site.
"""
from __future__ import annotations

import numpy as np

from spdy_onnx.passes.prune import n_pruned


class MagnitudeDatabase:
    """Magnitude pruning, computed on demand from one sort per site (masks are nested across levels)."""

    method = "magnitude"

    def __init__(self, sites, sources: dict[str, np.ndarray], levels: list[float]):
        self.sites = {s.name: s for s in sites}
        self.sources = sources
        self.levels = list(levels)
        self._order: dict[str, np.ndarray] = {}

    def _sorted(self, name):
        if name not in self._order:
            flat = np.abs(self.sources[name].astype(np.float32)).ravel()
            self._order[name] = np.argsort(flat, kind="stable").astype(np.int64)
        return self._order[name]

    def weight(self, name: str, j: int) -> np.ndarray:
        src = self.sources[name]
        k = n_pruned(src.size, self.levels[j])
        if k == 0:
            return src
        out = src.copy().ravel()
        out[self._sorted(name)[:k]] = 0
        return out.reshape(src.shape)


class SemiStructuredDatabase:
    """2:4 by magnitude: j == 0 is the dense source, any j >= 1 the 2:4-pruned source (computed once)."""

    method = "magnitude-2:4"

    def __init__(self, sites, sources: dict[str, np.ndarray], levels: list[float]):
        from spdy_onnx.passes.semi_structured import eligible

        self.sites = {s.name: s for s in sites}
        self.sources = sources
        self.levels = list(levels)
        self._pruned: dict[str, np.ndarray] = {}
        for site in sites:
            ok, why = eligible(site)
            if not ok:
                raise ValueError(f"site '{site.name}' cannot be made 2:4: {why}")

    def weight(self, name: str, j: int) -> np.ndarray:
        if j == 0 or self.levels[j] == 0.0:
            return self.sources[name]
        if name not in self._pruned:
            from spdy_onnx.passes.semi_structured import prune_2_4
            self._pruned[name] = prune_2_4(self.sites[name], self.sources[name])
        return self._pruned[name]


def magnitude_database(sites, sources: dict[str, np.ndarray], levels: list[float], pattern: str = "unstructured"):
    """The data-free database for a table's pattern: 2:4 by magnitude, or unstructured magnitude."""
    cls = SemiStructuredDatabase if pattern == "2:4" else MagnitudeDatabase
    return cls(sites, sources, levels)
