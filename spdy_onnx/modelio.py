"""Loading untrusted ONNX files safely, describing their inputs, and writing outputs atomically."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper

from spdy_onnx.errors import SpdyError

log = logging.getLogger(__name__)

TWO_GB = 2**31 - 1


def _external_tensors(model: onnx.ModelProto):
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data references that leave the model's folder or point at short files."""
    base = base_dir.resolve()
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise SpdyError(
                f"tensor '{tensor.name}' refers to external data '{location}' outside the model's "
                "folder; only relative paths inside it are read")
        target = (base / location).resolve()
        if base not in target.parents and target != base:
            raise SpdyError(f"tensor '{tensor.name}' refers to external data outside the model's folder")
        if not target.is_file():
            raise SpdyError(f"external data file '{location}' of tensor '{tensor.name}' is missing")
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        size = target.stat().st_size
        if length is not None and offset + int(length) > size:
            raise SpdyError(f"external data file '{location}' is shorter than tensor '{tensor.name}' needs")
        if offset > size:
            raise SpdyError(f"external data file '{location}' is shorter than tensor '{tensor.name}' needs")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and validate an ONNX file; every failure becomes one clear SpdyError."""
    path = Path(path)
    if not path.exists():
        raise SpdyError(f"no such file: {path}")
    if not path.is_file():
        raise SpdyError(f"not a file: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SpdyError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise SpdyError(f"{path} is empty, not an ONNX model")
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception:
        raise SpdyError(f"{path} is not a valid ONNX file (truncated or not a protobuf model)") from None
    if not model.graph.node or not model.opset_import:
        raise SpdyError(f"{path} is not a valid ONNX model (no graph nodes or no opset)")
    if model.ir_version > onnx.IR_VERSION:
        raise SpdyError(
            f"{path.name} has ONNX IR version {model.ir_version}; the installed onnx {onnx.__version__} reads IR "
            f"version <= {onnx.IR_VERSION} (the pin DeepSparse 1.8 needs): re-export with an older opset")
    _check_external_data(model, path.parent)
    if any(True for _ in _external_tensors(model)):
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise SpdyError(f"cannot load the external data of {path}: {exc}") from None
    check_model(model, str(path))
    return model


def check_model(model: onnx.ModelProto, name: str = "model") -> None:
    try:
        if model.ByteSize() > TWO_GB:
            return  # the in-memory checker refuses >2GB protos; the file was checked on save
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid graph"
        raise SpdyError(f"{name} fails onnx.checker: {first}") from None
    except Exception as exc:  # protobuf/size errors from the checker
        raise SpdyError(f"{name} fails onnx.checker: {exc}") from None


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write into a temporary folder beside the target, then rename into place: never half-written.

    Models over 2 GB (or loaded with external data) are written with their weights in `<name>.data`;
    the data file is moved first and the model last, so a visible model always has its data.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    external = model.ByteSize() > TWO_GB or any(True for _ in _external_tensors(model))
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=folder) as tmpdir:
        tmp = Path(tmpdir) / path.name
        if external:
            data_name = path.name + ".data"
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(Path(tmpdir) / data_name, folder / data_name)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_digest(model: onnx.ModelProto) -> str:
    """Content hash of the model (graph and weights), used to key caches."""
    h = hashlib.sha256()
    h.update(model.graph.SerializeToString(deterministic=True))
    for entry in model.opset_import:
        h.update(f"{entry.domain}:{entry.version};".encode())
    return h.hexdigest()


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old exporters list weights as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ['name:1x3x224x224', ...] into {name: (1, 3, 224, 224)}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().replace(",", "x").split("x"))
            if not sep or not name or any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise SpdyError(f"bad --input-shape '{spec}': expected NAME:D0xD1x..., e.g. input:1x3x224x224") from None
        shapes[name] = shape
    return shapes


def input_specs(model: onnx.ModelProto, batch_size: int,
                overrides: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Concrete shape and dtype of every model input.

    The first dimension is the batch: it takes `batch_size`. Any other dynamic dimension must be given
    with --input-shape, because timing and calibration need real shapes.
    """
    overrides = dict(overrides or {})
    specs = {}
    for value in graph_inputs(model):
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise SpdyError(f"input '{value.name}' is not a tensor; only tensor inputs are supported")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim]
        if value.name in overrides:
            shape = overrides.pop(value.name)
            if len(shape) != len(dims):
                raise SpdyError(f"--input-shape for '{value.name}' has {len(shape)} dims, the model has {len(dims)}")
            for i, (given, static) in enumerate(zip(shape, dims)):
                if i > 0 and static is not None and given != static:
                    raise SpdyError(f"--input-shape for '{value.name}' sets dim {i} to {given}, the model fixes it to {static}")
            shape = (batch_size,) + tuple(shape[1:]) if shape else shape
        else:
            missing = [i for i, d in enumerate(dims) if d is None and i > 0]
            if missing:
                pretty = "x".join(str(d) if d else "?" for d in dims)
                raise SpdyError(
                    f"input '{value.name}' has dynamic dimensions ({pretty}); give them with "
                    f"--input-shape {value.name}:" + "x".join(str(d or 1) if i == 0 else str(d or 'N') for i, d in enumerate(dims)))
            shape = tuple([batch_size] + dims[1:]) if dims else ()
        specs[value.name] = (tuple(int(d) for d in shape), dtype)
    if overrides:
        raise SpdyError(f"--input-shape names unknown input(s): {', '.join(sorted(overrides))}; "
                        f"the model's inputs are: {', '.join(specs)}")
    return specs


def with_static_inputs(model: onnx.ModelProto, specs: dict) -> onnx.ModelProto:
    """A copy whose graph inputs carry the concrete shapes (engines compile static shapes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        if value.name in specs:
            shape, _ = specs[value.name]
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dims.add().dim_value = int(d)
    return out


def example_inputs(specs: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for timing: normal floats; ones for integer inputs (valid ids and masks)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in specs.items():
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = np.ones(shape, dtype=dtype)
        else:
            feeds[name] = np.ones(shape, dtype=dtype)
    return feeds
