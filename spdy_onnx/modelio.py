"""Loading untrusted ONNX files safely, describing their inputs, and writing outputs atomically.

What `load_model` refuses, each with one line (SpdyError): a missing/empty/non-protobuf file, a single
file over 2 GB (protobuf cannot hold it: weights must be external data), an IR version newer than the
installed onnx reads, a graph that fails onnx.checker, external data outside the model's folder
(absolute paths, `..`, links leaving it), missing or short external data files, bad offset/length
fields, and tensors whose stored data does not match their shape and type.

Models with external data are checked by path (onnx.checker.check_model(path), which works above 2 GB),
then their data is read into memory. Such a model is written back by `save_model_atomic` with external
data too: the model file plus `<name>.data` beside it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper

from spdy_onnx.errors import SpdyError

log = logging.getLogger(__name__)

TWO_GB = 2**31 - 1
# metadata_props key marking an in-memory model that was loaded with external data; it holds the
# external files that were read (JSON list), so an output never overwrites them. Never written to disk.
EXTERNAL_MARK = "spdy_onnx.loaded_external_data"
MAX_INPUT_BYTES = 2**31        # one timing/calibration input larger than this is surely a wrong shape
EXTERNAL_SIZE_THRESHOLD = 1024   # tensors of at least this many bytes go to the .data file

_T = onnx.TensorProto
# bytes per element in raw_data, and (typed field, values per element) otherwise
_RAW_ITEMSIZE = {_T.FLOAT: 4, _T.UINT8: 1, _T.INT8: 1, _T.UINT16: 2, _T.INT16: 2, _T.INT32: 4, _T.INT64: 8,
                 _T.BOOL: 1, _T.FLOAT16: 2, _T.DOUBLE: 8, _T.UINT32: 4, _T.UINT64: 8, _T.COMPLEX64: 8,
                 _T.COMPLEX128: 16, _T.BFLOAT16: 2}
_TYPED_FIELD = {_T.FLOAT: ("float_data", 1), _T.COMPLEX64: ("float_data", 2), _T.DOUBLE: ("double_data", 1),
                _T.COMPLEX128: ("double_data", 2), _T.INT64: ("int64_data", 1), _T.UINT32: ("uint64_data", 1),
                _T.UINT64: ("uint64_data", 1), _T.STRING: ("string_data", 1)}
for _name in ("INT32", "INT16", "INT8", "UINT16", "UINT8", "BOOL", "FLOAT16", "BFLOAT16"):
    _TYPED_FIELD[getattr(_T, _name)] = ("int32_data", 1)
for _name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"):  # onnx >= 1.14
    if hasattr(_T, _name):
        _RAW_ITEMSIZE[getattr(_T, _name)] = 1
        _TYPED_FIELD[getattr(_T, _name)] = ("int32_data", 1)


def printable(text, limit: int = 200) -> str:
    """Names from an untrusted file, safe for one terminal line: control characters escaped, length capped."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    return out if len(out) <= limit else out[:limit - 3] + "..."


def _label(node, index: int) -> str:
    return printable(node.name or (node.output[0] if node.output else f"{node.op_type}#{index}"), 80)


def _graph_tensors(graph: onnx.GraphProto, where: str = ""):
    """(tensor, description, loadable) for every tensor stored in the graph and its subgraphs.

    `loadable` is False for the parts of sparse tensors, whose external data onnx does not load.
    """
    for t in graph.initializer:
        yield t, f"initializer '{printable(t.name, 80)}'{where}", True
    for s in graph.sparse_initializer:
        yield s.values, f"sparse initializer '{printable(s.values.name, 80)}'{where}", False
        yield s.indices, f"indices of sparse initializer '{printable(s.values.name, 80)}'{where}", False
    for i, node in enumerate(graph.node):
        label = _label(node, i)
        for a in node.attribute:
            what = f"attribute '{printable(a.name, 40)}' of node '{label}'{where}"
            if a.HasField("t"):
                yield a.t, what, True
            for t in a.tensors:
                yield t, what, True
            sparse = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
            for s in sparse:
                yield s.values, what, False
                yield s.indices, what, False
            inner = f" in a subgraph of node '{label}'{where}"
            if a.HasField("g"):
                yield from _graph_tensors(a.g, inner)
            for g in a.graphs:
                yield from _graph_tensors(g, inner)


def _model_tensors(model: onnx.ModelProto):
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        for i, node in enumerate(f.node):
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t, (f"attribute '{printable(a.name, 40)}' of node '{_label(node, i)}' in function "
                                f"'{printable(f.name, 80)}'"), True


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _external_tensors(model: onnx.ModelProto):
    for tensor, _, _ in _model_tensors(model):
        if _is_external(tensor):
            yield tensor


def _external_int(info: dict, key: str, tensor_name: str) -> int | None:
    if key not in info or info[key] == "":
        return None
    try:
        value = int(info[key])
    except ValueError:
        value = -1
    if value < 0:
        raise SpdyError(f"tensor '{tensor_name}' has a bad external data {key} '{printable(info[key], 40)}' "
                        "(expected a whole number >= 0)")
    return value


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> list[str]:
    """Refuse external-data references that leave the model's folder or point at missing/short files.

    Returns the files that will be read (resolved paths).
    """
    base = base_dir.resolve()
    files = set()
    for tensor, what, loadable in _model_tensors(model):
        if not _is_external(tensor):
            continue
        name = printable(tensor.name, 80) or what
        if not loadable:
            raise SpdyError(f"{what} keeps its data in an external file; external data is only supported "
                            "for dense initializers and constants")
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        shown = printable(location)
        try:
            outside = (not location or "\0" in location or os.path.isabs(location)
                       or ".." in Path(location).parts)
            target = None if outside else (base / location).resolve()
        except (OSError, ValueError, RuntimeError):
            outside, target = True, None
        if outside or (base not in target.parents):
            raise SpdyError(
                f"tensor '{name}' refers to external data '{shown}' outside the model's folder; only "
                "relative paths inside it are read")
        if not target.is_file():
            raise SpdyError(f"external data file '{shown}' of tensor '{name}' is missing (or not a file)")
        offset = _external_int(info, "offset", name) or 0
        length = _external_int(info, "length", name)
        size = target.stat().st_size
        if offset > size or (length is not None and offset + length > size):
            raise SpdyError(f"external data file '{shown}' is shorter than tensor '{name}' needs "
                            f"({size} bytes; it needs {offset + (length or 0)})")
        files.add(str(target))
    return sorted(files)


def _check_tensor_data(model: onnx.ModelProto, name: str) -> None:
    """Every stored tensor's data must match its dims and type (raw_data bytes or typed values).

    Only lengths are compared: nothing is converted to arrays, so giant tensors cost no extra memory.
    """
    for tensor, what, _ in _model_tensors(model):
        if _is_external(tensor):
            continue  # sparse parts refused above; the rest are loaded by now
        dims = [int(d) for d in tensor.dims]
        if any(d < 0 for d in dims):
            raise SpdyError(f"{name}: {what} has a negative dimension {tuple(dims)}")
        count = math.prod(dims)
        dtype = tensor.data_type
        if dtype not in _TYPED_FIELD:
            raise SpdyError(f"{name}: {what} has an unknown data type {dtype}")
        shape = "x".join(str(d) for d in dims) or "scalar"
        type_name = onnx.TensorProto.DataType.Name(dtype)
        if tensor.HasField("raw_data"):
            if dtype == onnx.TensorProto.STRING:
                raise SpdyError(f"{name}: {what} is a STRING tensor with raw data, which ONNX does not allow")
            have, need = len(tensor.raw_data), count * _RAW_ITEMSIZE[dtype]
            if have != need:
                raise SpdyError(f"{name}: {what} has {have} bytes of data, but its shape {shape} of "
                                f"{type_name} needs {need} (corrupt or truncated weights)")
        else:
            field, per = _TYPED_FIELD[dtype]
            have, need = len(getattr(tensor, field)), count * per
            if have != need:
                raise SpdyError(f"{name}: {what} has {have} values, but its shape {shape} of "
                                f"{type_name} needs {need} (corrupt or truncated weights)")


def _check_text(message, where: str, name: str) -> None:
    """Every string field must be text: protobuf hands back `bytes` for invalid UTF-8 (a corrupt name),
    which would break every later use of the name. Bytes fields (weights) are never touched."""
    from google.protobuf.descriptor import FieldDescriptor as F
    for fd in message.DESCRIPTOR.fields:
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == F.LABEL_REPEATED
        if fd.type == F.TYPE_STRING:
            values = getattr(message, fd.name) if repeated else [getattr(message, fd.name)]
            for i, v in enumerate(values):
                if not isinstance(v, str):
                    at = f"{where}.{fd.name}" + (f"[{i}]" if repeated else "")
                    raise SpdyError(f"{name}: {at} is not valid UTF-8 text ({printable(v, 60)}): corrupt file")
        elif fd.type == F.TYPE_MESSAGE:
            if repeated:
                for i, v in enumerate(getattr(message, fd.name)):
                    _check_text(v, f"{where}.{fd.name}[{i}]", name)
            elif message.HasField(fd.name):
                _check_text(getattr(message, fd.name), f"{where}.{fd.name}", name)


def _checker_message(exc: Exception) -> str:
    """The checker's message on one line (it spreads node descriptions over several)."""
    text = " ".join(str(exc).split())
    return printable(text, 300) if text else "invalid graph"


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and validate an ONNX file; every failure becomes one clear SpdyError.

    Nothing outside the model's folder is read: external data must be relative paths inside it.
    """
    path = Path(path)
    if not path.exists():
        raise SpdyError(f"no such file: {path}")
    if not path.is_file():
        raise SpdyError(f"not a file: {path}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SpdyError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size > TWO_GB:
        raise SpdyError(
            f"{path} is {size / 2**30:.1f} GiB in one file; an ONNX protobuf cannot exceed 2 GB: save the "
            "weights as external data (onnx.save_model(model, path, save_as_external_data=True))")
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
    del data
    _check_text(model, "model", str(path))
    if not model.graph.node or not model.opset_import:
        raise SpdyError(f"{path} is not a valid ONNX model (no graph nodes or no opset)")
    as_read = True   # the file's own proto: the checker may read it by path
    if model.ir_version > onnx.IR_VERSION:
        as_read = False
        metadata: list[str] = []
        newer = newer_ir_feature(model, metadata) if model.ir_version <= NEWEST_KNOWN_IR \
            else f"IR version {model.ir_version}"
        if newer is not None:
            raise SpdyError(
                f"{path.name} has ONNX IR version {model.ir_version} and uses {newer}; the installed onnx "
                f"{onnx.__version__} reads IR version <= {onnx.IR_VERSION} (the pin DeepSparse 1.8 needs): re-export "
                "with an older opset, e.g. torch.onnx.export(..., dynamo=False, opset_version=17)")
        if metadata:
            model.DiscardUnknownFields()   # every unknown field is metadata: newer_ir_feature said so
        log.warning("%s has ONNX IR version %d but uses nothing that changes what it computes (4-bit types, "
                    "function overloads)%s: read, and written, as IR version %d, which the installed onnx %s and "
                    "DeepSparse read", path.name, model.ir_version,
                    f"; its metadata_props on {len(metadata)} graph element(s) (e.g. {metadata[0]}) are dropped, "
                    "as that version cannot store them" if metadata else "",
                    onnx.IR_VERSION, onnx.__version__)
        model.ir_version = onnx.IR_VERSION
    if default_opset(model) > onnx.defs.onnx_opset_version():
        from spdy_onnx.passes.opsets import as_known_opset   # a graph rewrite; passes import this module
        model, as_read = as_known_opset(model, path.name), False
    _drop_mark(model)  # only we set it, and only in memory
    external_files = _check_external_data(model, path.parent)
    if external_files:
        # the checker by path reads the file itself and works for models whose weights exceed 2 GB; a
        # model read at an older IR version or opset is not the file's proto, and is checked in memory
        # once its data is in (over 2 GB, not at all: the engine and onnxruntime still check it)
        try:
            if as_read:
                onnx.checker.check_model(str(path))
        except Exception as exc:
            raise SpdyError(f"{path} fails onnx.checker: {_checker_message(exc)}") from None
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise SpdyError(f"cannot load the external data of {path}: {printable(exc, 300)}") from None
        if any(True for _ in _external_tensors(model)):
            raise SpdyError(f"{path}: some external data could not be loaded")
        _check_tensor_data(model, str(path))
        if not as_read:
            check_model(model, str(path))
        _set_mark(model, external_files)
    else:
        check_model(model, str(path))
        _check_tensor_data(model, str(path))
    return model


_KNOWN_TYPES = max(onnx.TensorProto.DataType.values())
_TYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")


# The newest IR version whose additions the walk below knows how to find: its protobuf fields (those
# of onnx 1.23 that onnx 1.14 lacks) and its data types (numbers past the installed onnx's)
NEWEST_KNOWN_IR = 14
# Fields added after IR version 9 that hold only free-form key/value strings (what torch's exporter
# writes there: the module path, the FX node, the stack trace): dropping them changes no computation
METADATA_FIELDS = {"GraphProto": 16, "NodeProto": 9, "ValueInfoProto": 4, "TensorProto": 16, "FunctionProto": 14}


def newer_ir_feature(model: onnx.ModelProto, metadata: list | None = None) -> str | None:
    """What in `model` the installed onnx cannot represent, or None: a field its protobuf does not know
    (function overloads, a function's value_info, device configurations: IR version 10 and later), or a
    data type it does not know (4-bit integers: IR version 10). A model with neither reads the same at
    the installed IR version. Metadata fields (METADATA_FIELDS) do not count: where they are, is
    appended to `metadata`."""
    from google.protobuf.unknown_fields import UnknownFieldSet

    def walk(message, where: str) -> str | None:
        unknown = UnknownFieldSet(message)
        if len(unknown):
            kind = type(message).__name__
            if all(f.field_number == METADATA_FIELDS.get(kind) for f in unknown):
                if metadata is not None:
                    metadata.append(f"{kind} '{printable(getattr(message, 'name', '') or where, 60)}'")
            else:
                return f"a field the installed onnx does not know in a {kind} ({where})"
        if isinstance(message, onnx.TensorProto):   # its data is not walked: raw_data would be copied
            return f"data type {message.data_type} ({where})" if message.data_type > _KNOWN_TYPES else None
        if isinstance(message, onnx.TypeProto.Tensor) and message.elem_type > _KNOWN_TYPES:
            return f"data type {message.elem_type} ({where})"
        if isinstance(message, onnx.AttributeProto) and message.name in _TYPE_ATTRIBUTES \
                and message.type == onnx.AttributeProto.INT and message.i > _KNOWN_TYPES:
            return f"data type {message.i} ({where})"
        for field, value in message.ListFields():
            if field.message_type is None:
                continue
            name = getattr(message, "name", "") or where
            for item in (value if hasattr(value, "extend") else [value]):
                found = walk(item, printable(name, 60))
                if found:
                    return found
        return None

    return walk(model, "the model")


def _set_mark(model: onnx.ModelProto, files: list[str]) -> None:
    entry = model.metadata_props.add()
    entry.key = EXTERNAL_MARK
    entry.value = json.dumps(files)


def _drop_mark(model: onnx.ModelProto) -> None:
    kept = [p for p in model.metadata_props if p.key != EXTERNAL_MARK]
    if len(kept) != len(model.metadata_props):
        del model.metadata_props[:]
        model.metadata_props.extend(kept)


def _mark(model: onnx.ModelProto) -> list[str] | None:
    for p in model.metadata_props:
        if p.key == EXTERNAL_MARK:
            try:
                return [str(f) for f in json.loads(p.value)]
            except (ValueError, TypeError):
                return []
    return None


def loaded_with_external_data(model: onnx.ModelProto) -> bool:
    return _mark(model) is not None


def _tensor_bytes_bound(t: onnx.TensorProto) -> int:
    """At least the serialised size of a tensor, without serialising it (a varint takes up to 10 bytes)."""
    typed = len(t.float_data) * 4 + len(t.double_data) * 8 + (len(t.int32_data) + len(t.int64_data)
                                                              + len(t.uint64_data)) * 10
    strings = sum(len(x) + 10 for x in t.string_data)
    return len(t.raw_data) + typed + strings + 64 + len(t.name.encode()) + 11 * len(t.dims) \
        + sum(len(e.key.encode()) + len(e.value.encode()) + 32 for e in t.external_data) + len(t.doc_string.encode())


def _fields_bound(message, skip: str) -> int:
    """At least the serialised size of `message`'s set fields other than `skip`."""
    total = 0
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):   # repeated
            total += sum((v.ByteSize() if hasattr(v, "ByteSize") else len(str(v).encode())) + 16 for v in value)
        elif hasattr(value, "ByteSize"):
            total += value.ByteSize() + 16
        else:
            total += len(value if isinstance(value, bytes) else str(value).encode()) + 16
    return total


def over_two_gb(model: onnx.ModelProto) -> bool:
    """model.ByteSize() > TWO_GB, without serialising the weights unless the answer is close: upb's
    ByteSize encodes the whole model (0.2 s for MiniLM-L6, 2 s for BERT-base size, per call). The
    weights count by their bytes (an upper bound) and everything else by its own ByteSize."""
    bound = sum(_tensor_bytes_bound(t) for t in model.graph.initializer) + 4096
    bound += _fields_bound(model, "graph") + _fields_bound(model.graph, "initializer")
    if bound <= TWO_GB:
        return False
    return model.ByteSize() > TWO_GB


def check_model(model: onnx.ModelProto, name: str = "model") -> None:
    try:
        if over_two_gb(model):
            return  # the in-memory checker refuses >2GB protos; load_model checks those by path
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError, and protobuf/size errors from the checker
        raise SpdyError(f"{name} fails onnx.checker: {_checker_message(exc)}") from None


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write into a temporary folder beside the target, then rename into place: never half-written.

    Models over 2 GB, or loaded with external data, are written with their weights in `<name>.data`
    beside the model (tensors of 1 KiB or more). The data file is renamed into place first and the model
    last; if the last rename fails, the data file is removed again. An interruption (Ctrl-C, disk full)
    leaves no output and no temporary files. `model` itself is not modified. Write errors become one
    SpdyError line.
    """
    path = Path(path)
    folder = path.parent
    if any(True for _ in _external_tensors(model)):
        raise SpdyError(f"cannot write {path}: the model still refers to external data that was not loaded")
    read_from = _mark(model)
    external = read_from is not None or over_two_gb(model)
    data_name = path.name + ".data"
    data_path = folder / data_name
    if external and read_from:
        try:
            clash = data_path.exists() and any(os.path.samefile(data_path, f) for f in read_from if os.path.exists(f))
        except OSError:
            clash = False
        if clash:
            raise SpdyError(f"the output's data file {data_path} is an external data file of the input; "
                            "refusing to overwrite it (choose another output name)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=folder) as tmpdir:
            tmp = Path(tmpdir) / path.name
            if external:
                out = onnx.ModelProto()
                out.CopyFrom(model)   # onnx.save_model moves the weights out of the proto it is given
                _drop_mark(out)
                onnx.save_model(out, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=EXTERNAL_SIZE_THRESHOLD)
                del out
                tmp_data = Path(tmpdir) / data_name
                if tmp_data.exists():
                    _fsync(tmp_data)
                    _fsync(tmp)
                    os.replace(tmp_data, data_path)
                    try:
                        os.replace(tmp, path)
                    except BaseException:
                        data_path.unlink(missing_ok=True)
                        raise
                else:  # no tensor was big enough to go out
                    _fsync(tmp)
                    os.replace(tmp, path)
            else:
                with open(tmp, "wb") as f:
                    f.write(model.SerializeToString())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
    except OSError as exc:
        raise SpdyError(f"cannot write {path}: {exc.strerror or exc}") from None
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


def _stored_sample_shape(stored, dims: list) -> tuple[int, ...] | None:
    """One sample's shape from a stored array's (samples first; a folder's files may hold one sample with
    or without that axis) when it fits the input's rank and fixed dimensions, else None."""
    if stored is None:
        return None
    for sample in (tuple(stored[1:]), tuple(stored)):
        if len(sample) == len(dims) - 1 and all(d is None or d == g for d, g in zip(dims[1:], sample)) \
                and all(g > 0 for g in sample):
            return sample
    return None


def inputs_with_defaults(model: onnx.ModelProto) -> set[str]:
    """Graph inputs backed by an initializer of the same name: optional inputs with a default value."""
    inits = {t.name for t in model.graph.initializer}
    return {i.name for i in model.graph.input if i.name in inits}


def index_rows(model: onnx.ModelProto) -> dict[str, tuple[int, str]]:
    """{integer graph input: (rows, node)} for inputs used as the indices of a Gather from a constant
    table (token ids into an embedding), directly or through a Cast: an id past the table is an error
    onnxruntime only raises on the batch that holds it, after profiling."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    integer = {i.name for i in model.graph.input if i.type.tensor_type.elem_type in (
        onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64)}
    source = {name: name for name in integer}   # tensor -> the graph input it is a cast of
    rows: dict[str, tuple[int, str]] = {}
    for node in model.graph.node:   # nodes are in topological order
        if node.op_type == "Cast" and node.input and node.input[0] in source:
            source[node.output[0]] = source[node.input[0]]
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in source \
                and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = inits[node.input[0]]
            if -len(dims) <= axis < len(dims):
                name = source[node.input[1]]
                n = int(dims[axis])
                if name not in rows or n < rows[name][0]:
                    rows[name] = (n, node.name or node.output[0])
    return rows


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


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs fix in their first dimension, or None where any is dynamic
    (or the inputs disagree)."""
    sizes = set()
    for value in graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value <= 0:
            return None
        sizes.add(int(dims[0].dim_value))
    return sizes.pop() if len(sizes) == 1 else None


def input_specs(model: onnx.ModelProto, batch_size: int,
                overrides: dict[str, tuple[int, ...]] | None = None,
                stored: dict[str, tuple[int, ...]] | None = None, *, stored_from: str = "the calibration data",
                data_hint: bool = True) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Concrete shape and dtype of every model input.

    The first dimension is the batch: it takes `batch_size`. Any other dynamic dimension must be given
    with --input-shape, because timing and calibration need real shapes, or comes from `stored`: the
    shapes of the calibration arrays (calibrate.sample_shapes), samples on the first axis.
    """
    overrides = dict(overrides or {})
    names = [v.name for v in graph_inputs(model)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise SpdyError(f"--input-shape names unknown input(s): {printable(', '.join(unknown))}; the model's "
                        f"inputs are: {printable(', '.join(names))} (one --input-shape NAME:D0xD1... per input)")
    specs = {}
    dynamic = []   # --input-shape flags still needed, all named in one error
    for value in graph_inputs(model):
        shown = printable(value.name, 80)
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise SpdyError(f"input '{shown}' is not a tensor; only tensor inputs are supported")
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError, ValueError):
            dtype = None
        if dtype is None or ttype.elem_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
            raise SpdyError(f"input '{shown}' has element type {ttype.elem_type}, which cannot be fed "
                            "(numeric and bool tensor inputs only)")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim]
        if ttype.HasField("shape") and not dims and batch_size > 1:
            raise SpdyError(f"input '{shown}' is a scalar (rank 0): it has no batch axis, so the model runs one "
                            f"sample per call and cannot be run at --batch-size {batch_size}; use -b 1, or export "
                            "the model with a batch axis on every input")
        if value.name in overrides:
            shape = overrides.pop(value.name)
            if len(shape) != len(dims):
                raise SpdyError(f"--input-shape for '{shown}' has {len(shape)} dims, the model has {len(dims)}")
            for i, (given, static) in enumerate(zip(shape, dims)):
                if i > 0 and static is not None and given != static:
                    raise SpdyError(f"--input-shape for '{shown}' sets dim {i} to {given}, the model fixes it to {static}")
            if shape and shape[0] not in (1, batch_size):
                raise SpdyError(f"--input-shape for '{shown}' gives batch {shape[0]}, but the batch comes from "
                                f"--batch-size ({batch_size}): pass -b {shape[0]} to optimise for batch {shape[0]}")
            shape = (batch_size,) + tuple(shape[1:]) if shape else shape
        else:
            missing = [i for i, d in enumerate(dims) if d is None and i > 0]
            sample = _stored_sample_shape((stored or {}).get(value.name), dims)
            if missing and sample is not None:
                dims = [dims[0]] + list(sample)
                log.info("input '%s': dynamic dimensions taken from %s: %s", shown, stored_from,
                         "x".join(map(str, sample)))
                missing = []
            if missing:
                pretty = "x".join(str(d) if d else "?" for d in dims)
                flag = f"--input-shape {shown}:" + "x".join(str(d or 1) if i == 0 else str(d or 'N')
                                                            for i, d in enumerate(dims))
                dynamic.append((shown, pretty, flag))
                continue
            shape = tuple([batch_size] + dims[1:]) if dims else ()
        shape = tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > MAX_INPUT_BYTES:
            raise SpdyError(f"input '{shown}' of shape {'x'.join(map(str, shape))} would take "
                            f"{nbytes / 2**30:.1f} GiB per batch; inputs over {MAX_INPUT_BYTES >> 30} GiB are "
                            "refused (check the model's input shape, --input-shape and --batch-size)")
        specs[value.name] = (shape, dtype)
    if dynamic:
        which = ", ".join(f"'{n}' ({pretty})" for n, pretty, _ in dynamic)
        raise SpdyError(f"input(s) {which} have dynamic dimensions; give them with "
                        + " ".join(flag for _, _, flag in dynamic) + " (N: the length to optimise for)"
                        + (", or give calibration data (--data), whose arrays' shapes are then used"
                           if data_hint else ""))
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


def example_inputs(specs: dict, seed: int = 0, rows: dict | None = None) -> dict[str, np.ndarray]:
    """Deterministic inputs for timing and the engine check: normal floats; for integer inputs that index
    a table (`rows`: index_rows), ids drawn over its rows; ones for other integers (masks). All-ones ids
    were the padding token of the RoBERTa family: outputs identically zero, an engine check of nothing."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in specs.items():
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif name in (rows or {}) and np.issubdtype(dtype, np.integer) and rows[name][0] > 0:
            feeds[name] = rng.integers(0, rows[name][0], size=shape).astype(dtype)
        else:
            feeds[name] = np.ones(shape, dtype=dtype)
    return feeds
