"""onnxruntime sessions for calibration and evaluation, with the engine's errors turned into one line."""
from __future__ import annotations

import os

import numpy as np
import onnx

from spdy_onnx.errors import SpdyError

# initializers at least this big reach onnxruntime as arrays (external initializers), not serialised in
# the model's bytes: serialising a proto and parsing it back cost 0.4 s per session of MiniLM-L6 and
# 3.5-7 s of BERT-base size, about a fifth of that in arrays (benchmarks/session_start.py)
ARRAY_BYTES = 1024
_ARRAY_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
                onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT8: np.int8,
                onnx.TensorProto.INT16: np.int16, onnx.TensorProto.INT32: np.int32,
                onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT8: np.uint8,
                onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.UINT32: np.uint32,
                onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.BOOL: np.bool_}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _copy_fields(src, dst, skip: str) -> None:
    """Every set field of `src` but `skip` into `dst` (messages of the same type)."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):
            getattr(dst, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def split_weights(model: onnx.ModelProto, min_bytes: int = ARRAY_BYTES):
    """(a copy of `model` whose large initializers are marked external, [(name, array)]): the arrays are
    read-only views of the initializers' bytes, for onnxruntime's add_external_initializers. The copy
    leaves the weights out, so it costs little, and the arrays cost one copy of them, not a serialisation
    and a parse."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, "graph")
    _copy_fields(model.graph, skeleton.graph, "initializer")
    arrays = []
    for init in model.graph.initializer:
        dtype = _ARRAY_TYPES.get(init.data_type)
        raw = init.raw_data if dtype is not None and init.HasField("raw_data") else b""
        if len(raw) < min_bytes or init.data_location == onnx.TensorProto.EXTERNAL \
                or len(raw) != int(np.prod(init.dims, dtype=np.int64)) * np.dtype(dtype).itemsize:
            skeleton.graph.initializer.append(init)
            continue
        marked = skeleton.graph.initializer.add()
        marked.name, marked.data_type = init.name, init.data_type
        marked.dims.extend(init.dims)
        marked.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "in-memory"), ("offset", "0"), ("length", str(len(raw)))):
            entry = marked.external_data.add()
            entry.key, entry.value = key, value
        arrays.append((init.name, np.frombuffer(raw, dtype=dtype).reshape(tuple(init.dims))))
    return skeleton, arrays


# intra-op threads of sessions made without `threads` (None: onnxruntime's default, every core); the
# child that builds the database during profiling narrows it (spdy_onnx.early_database)
DEFAULT_THREADS: int | None = None


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
    threads = threads or DEFAULT_THREADS
    if threads:
        opts.intra_op_num_threads = threads
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    skeleton, arrays = split_weights(model)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for _, a in arrays]
    if arrays:
        opts.add_external_initializers([n for n, _ in arrays], values)
    # onnxruntime copies the arrays into the graph before optimising it, and frees them from the options
    # once loaded: they need not outlive this call (OrtApi::AddExternalInitializers)
    return ort.InferenceSession(skeleton.SerializeToString(), opts, providers=["CPUExecutionProvider"])


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
