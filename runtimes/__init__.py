"""Engines behind one small protocol. Each module is imported lazily, so a missing engine fails only
when it is asked for, with the pip command that fixes it."""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Protocol

from spdy_onnx.errors import SpdyError

REGISTRY = {
    "deepsparse": ("spdy_onnx.runtimes.deepsparse", "DeepSparseRuntime", "pip install 'spdy-onnx[deepsparse]'"),
    "table": ("spdy_onnx.runtimes.table", "TableRuntime", None),
    "cuda-2:4": ("spdy_onnx.runtimes.cuda_sparse", "CudaSemiStructuredRuntime", "pip install 'spdy-onnx[torch]' (a CUDA build of torch)"),
}


@dataclass
class Comparison:
    """An end-to-end, interleaved measurement of a baseline and a candidate model."""
    baseline_ms: float
    candidate_ms: float
    rounds: int
    iterations_per_round: int
    ratio_p25: float = 0.0           # spread of the per-round speedups
    ratio_p75: float = 0.0
    foreign_load_cores: float = 0.0  # CPU used by other processes while measuring
    extra: dict = field(default_factory=dict)
    # what the engine returned for the timing inputs, [baseline outputs, candidate outputs], where the
    # engine hands them back; checked against onnxruntime (spdy_onnx/engine_check.py), never serialised
    outputs: list | None = field(default=None, repr=False, compare=False)

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.candidate_ms

    def to_json(self) -> dict:
        return {"baseline_ms": self.baseline_ms, "candidate_ms": self.candidate_ms, "speedup": self.speedup,
                "rounds": self.rounds, "iterations_per_round": self.iterations_per_round,
                "speedup_p25": self.ratio_p25, "speedup_p75": self.ratio_p75,
                "foreign_load_cores": self.foreign_load_cores, **self.extra}


def pooled(first: Comparison, second: Comparison) -> Comparison:
    """One estimate from two measurements of models with the same zeros (the same kernels, so the same
    speed): the speedups' geometric mean weighted by rounds. Re-compiling a model moves its measured
    speed by a few percent here, so two measurements pin the speed down better than either alone."""
    rounds = max(1, first.rounds) + max(1, second.rounds)
    log_speedup = (max(1, first.rounds) * math.log(first.speedup)
                   + max(1, second.rounds) * math.log(second.speedup)) / rounds
    baseline = (first.baseline_ms + second.baseline_ms) / 2
    return Comparison(baseline_ms=baseline, candidate_ms=baseline / math.exp(log_speedup),
                      rounds=first.rounds + second.rounds,
                      iterations_per_round=max(first.iterations_per_round, second.iterations_per_round),
                      ratio_p25=min(first.ratio_p25, second.ratio_p25), ratio_p75=max(first.ratio_p75, second.ratio_p75),
                      foreign_load_cores=max(first.foreign_load_cores, second.foreign_load_cores),
                      extra={**second.extra,
                             "pooled_speedups": first.extra.get("pooled_speedups", [first.speedup]) + [second.speedup]},
                      outputs=second.outputs if second.outputs is not None else first.outputs)


class Runtime(Protocol):
    name: str
    pattern: str                     # "unstructured" | "2:4"

    def default_levels(self) -> list[float]: ...

    def check_model(self, model) -> None:
        """Raise SpdyError if the engine cannot load this model (IR version, opset, ...)."""

    def fingerprint(self) -> dict:
        """Everything besides the model and shapes that timings depend on: engine version, CPU, cores."""

    def measure(self, model_path: str, sites: list, *, levels: list[float], batch_size: int,
                feeds: dict, aliases: dict, checkpoint=None) -> "LatencyTable":  # noqa: F821
        """Per-site times at each level; finished runs may be journaled to `checkpoint` to resume."""

    def compare(self, baseline_path: str, candidate_path: str, *, batch_size: int,
                feeds: dict) -> Comparison | None:
        """End-to-end interleaved timing; None when this machine cannot run the engine."""

    # Optional: `native_graph(model) -> (model, rewrites)`, the same computation written in ops the
    # engine runs natively, and a count of each rewrite ({} when none applied). The rewritten graph is
    # the one profiled, measured and written.
    # Optional: `checks_lowest_level = True`: after profiling, a uniform file at the lowest sparse level is
    # measured with `compare`, and that level's savings are cut when it gave less (api._check_lowest_level).
    # Optional: `dense_check_ms(model_path, *, batch_size, feeds) -> float | None`, the dense model's
    # total as `measure` reports it (LatencyTable.dense_total_ms), from one quick run. A runtime that
    # has it gets its cached tables checked against the machine as it is now.
    # Optional: `fused_sites(model_path, *, batch_size, feeds, aliases) -> list[list[str]]`, the sites the
    # engine runs as one kernel in this file as it is. On an engine whose table has fused groups, a missed
    # draft is analysed with it and the groups its kernels join are tied (api._optimize, tie_fused).
    # Optional: `quiet`, a list of our own helper processes (runtimes/cpu_load.identity) that the runtime
    # stops while an engine times (runtimes/cpu_load.stopped) and leaves out of its foreign load. A
    # runtime that has it gets the OBS database built in a child process during profiling
    # (spdy_onnx/early_database.py); one without it gets the database built after profiling.


def available() -> list[str]:
    return sorted(REGISTRY)


def get_runtime(name: str, **options) -> Runtime:
    if name not in REGISTRY:
        raise SpdyError(f"unknown runtime '{name}'; choose one of: {', '.join(available())}")
    module_name, cls_name, fix = REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; install it with: {fix}" if fix else ""
        raise SpdyError(f"runtime '{name}' is not installed ({exc.name or exc}){hint}") from None
    return getattr(module, cls_name)(**options)
