"""Shared by fused_groups.py and compile_spread.py: a model's latency table (cached, checked against the
machine), its prunable sites, and files written from level profiles with magnitude weights (the zeros,
not their values, set the engine's kernels)."""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from spdy_onnx import api, graph, modelio  # noqa: E402
from spdy_onnx.database import magnitude_database  # noqa: E402
from spdy_onnx.passes.prune import write_weights  # noqa: E402
from spdy_onnx.scores import magnitude_errors  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--cache-dir", default=None)
    return p


class MagnitudeProfiles:
    """The dense model on DeepSparse with its table; `write(profile, tag)` gives a static pruned copy."""

    def __init__(self, model, *, batch_size: int, cores: int, cache_dir=None):
        self.prep = api.Prepared(model, runtime="deepsparse", batch_size=batch_size, cores=cores, input_shapes=None,
                                 exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS, progress=False)
        self.batch_size = batch_size
        self.table = api.latency_table(self.prep, cache_dir=cache_dir)
        self.sites = [s for s in self.prep.sites if s.name in self.table.times]
        self.names = [s.name for s in self.sites]
        self.times = self.table.matrix(self.names)
        self.sources = graph.read_weights(self.prep.model, self.sites)
        self.errors = magnitude_errors(self.sources, self.names, list(self.table.levels))
        self.database = magnitude_database(self.sites, self.sources, list(self.table.levels), self.table.pattern)
        self.feeds = modelio.example_inputs(self.prep.specs)

    def budget(self, aim: float) -> float:
        return self.table.dense_total_ms / aim - self.table.fixed_ms(self.names)

    def write(self, profile: dict[str, int], tag: str):
        weights = {s.weight: self.database.weight(s.name, profile[s.name]) for s in self.sites}
        return self.prep.static_copy(write_weights(self.prep.model, weights), tag)

    def speedup(self, path) -> float:
        """Dense against `path`, end to end on fresh compiles, interleaved."""
        return self.prep.runtime.compare(str(self.prep.dense_static()), str(path), batch_size=self.batch_size,
                                         feeds=self.feeds).speedup

    def sparsity(self, profile: dict[str, int]) -> float:
        return (sum(self.table.levels[profile[s.name]] * s.n_weights for s in self.sites)
                / sum(s.n_weights for s in self.sites))

    def close(self):
        self.prep.close()
