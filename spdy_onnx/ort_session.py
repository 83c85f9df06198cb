"""onnxruntime sessions for calibration and evaluation, with the engine's errors turned into one line."""
from __future__ import annotations

import os

import onnx

from spdy_onnx.errors import SpdyError


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _session(model, *, optimize: bool = True, threads: int | None = None):
    """onnxruntime's own session, with its own errors."""
    import onnxruntime as ort
    if os.environ.get("ORT_DISABLE_TELEMETRY") == "1" and hasattr(ort, "disable_telemetry_events"):
        # imported before spdy_onnx set the variable, onnxruntime has started its telemetry: this stops
        # what it would still send (the variable set in time, as spdy_onnx does, stops it all)
        ort.disable_telemetry_events()
    opts = ort.SessionOptions()
    opts.log_severity_level = 4   # fatal only: its errors reach the user once, through the exception
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor visible
    if threads:
        opts.intra_op_num_threads = threads
    source = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def make_session(model: "onnx.ModelProto | str | os.PathLike", *, optimize: bool = True, threads: int | None = None):
    """A CPU session of an in-memory model, or of a file (which may keep its weights as external data)."""
    try:
        return _session(model, optimize=optimize, threads=threads)
    except Exception as exc:
        raise SpdyError(f"onnxruntime cannot load the model for calibration: {_first_line(exc)}") from None


def run_error(model, feeds: dict) -> str | None:
    """The first line of onnxruntime's error loading `model` or running it once on `feeds`, or None
    when it runs: for checks that word the error themselves."""
    try:
        _session(model).run(None, feeds)
    except Exception as exc:   # onnxruntime's own errors have no common base class
        return _first_line(exc)
    return None


def run(session, outputs, feeds):
    try:
        return session.run(outputs, feeds)
    except Exception as exc:
        raise SpdyError(f"onnxruntime failed to run the model on the calibration data: {_first_line(exc)}") from None
