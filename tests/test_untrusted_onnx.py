"""Untrusted ONNX files (issue #5, item 1): each case either works or fails with exactly one
`spdy-onnx: error: ...` line, never a traceback, and nothing is read or written outside what the user
named. Runs through `spdy_onnx.cli.main`, on the replayed-table runtime unless DeepSparse is the point.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny
from onnx import TensorProto, helper, numpy_helper

from spdy_onnx import graph, modelio
from spdy_onnx.cli import main
from spdy_onnx.passes import sparsity_of
from spdy_onnx.tables import LatencyTable

LEVELS = [0.0, 0.5, 0.9]

# --- helpers ---------------------------------------------------------------------------------------

_OPENED: list | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


class opened_files:
    """Every path opened with open()/os.open() inside the block (Python-level file access)."""

    def __enter__(self):
        global _OPENED
        _OPENED = []
        return _OPENED

    def __exit__(self, *exc):
        global _OPENED
        _OPENED = None


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save(model, path: Path, **kw) -> Path:
    onnx.save(model, str(path), **kw)   # str: onnx 1.14 resolves external data of a Path against the cwd
    return path


def table_for(model, path: Path) -> Path:
    sites, _ = graph.find_sites(graph.constants_to_initializers(model))
    table = LatencyTable(levels=LEVELS, times={s.name: [1.0, 0.6, 0.3] for s in sites},
                         dense_total_ms=1.0 * len(sites) + 0.5, runtime="table", meta={"cores": 1})
    return table.save(path)


def cli(capsys, *argv):
    """(exit code, the `spdy-onnx: error` lines, stdout); a traceback fails the test by itself."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("spdy-onnx: error")]
    assert "Traceback" not in captured.err
    return code, errors, captured.out


def optimize(capsys, model_path: Path, table: Path, *extra):
    return cli(capsys, "optimize", model_path, "--target", "1.5x", "--runtime", "table",
               "--latency-table", table, "-q", *extra)


def expect_one_error(capsys, folder: Path, argv_fn, match: str) -> str:
    before = snapshot(folder)
    code, errors, _ = argv_fn()
    assert code == 2
    assert len(errors) == 1, errors
    assert match in errors[0], errors[0]
    assert snapshot(folder) == before, "something was written although the run failed"
    return errors[0]


def mlp(**kw):
    kw = {"width": 64, "depth": 2, "seq": 4, **kw}
    return tiny.mlp(**kw)


@pytest.fixture
def work(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def external_model(folder: Path, model=None, location="m.data") -> Path:
    """A model whose every initializer lives in `location` beside it."""
    path = folder / "m.onnx"
    save(model or mlp(), path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
         size_threshold=0)
    assert (folder / location).exists()
    return path


def edit_external(path: Path, **fields):
    """Rewrite external_data fields (location/offset/length) of every external tensor of the file."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        entries = {e.key: e for e in t.external_data}
        for key, value in fields.items():
            if key in entries:
                entries[key].value = value
            else:
                t.external_data.add(key=key, value=value)
    onnx.save(model, str(path))


# --- truncated / corrupt protobuf, checker ---------------------------------------------------------

def test_truncated_protobuf(work, capsys):
    data = mlp().SerializeToString()
    path = work / "m.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    table = table_for(mlp(), work / "t.json")
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "not a valid ONNX file")


def test_corrupt_protobuf(work, capsys):
    data = bytearray(mlp().SerializeToString())
    data[:64] = np.random.default_rng(5).integers(0, 256, 64, dtype=np.uint8).tobytes()  # wreck tags/lengths
    path = work / "m.onnx"
    path.write_bytes(bytes(data))
    table = table_for(mlp(), work / "t.json")
    msg = expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "m.onnx")
    assert "not a valid ONNX" in msg or "onnx.checker" in msg or "corrupt" in msg


def test_graph_failing_checker(work, capsys):
    model = mlp()
    model.graph.node[2].input[0] = "never_produced"
    path = save(model, work / "m.onnx")
    table = table_for(mlp(), work / "t.json")
    msg = expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "fails onnx.checker")
    assert "input 'never_produced' of node: name: relu_0 OpType: Relu is not output of any previous" in msg


def test_ir_version_10_without_its_features_is_read_and_written_as_9(work, capsys):
    """Recent exporters write IR version 10 (onnx 1.16) for graphs that use nothing it added."""
    model = mlp()
    model.ir_version = onnx.IR_VERSION + 1
    path = work / "m.onnx"
    path.write_bytes(model.SerializeToString())   # onnx.save would refuse the version itself
    table = table_for(mlp(), work / "t.json")
    out = work / "out.onnx"
    code = main([str(a) for a in ("optimize", path, "--target", "1.5x", "--runtime", "table",
                                  "--latency-table", table, "-o", out)])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    assert "read, and written, as IR version" in err
    assert onnx.load(str(out)).ir_version == onnx.IR_VERSION


def _with_unknown_node_field(model) -> bytes:
    """The model with field 8 (IR 10's NodeProto.overload) on its first node."""
    node = model.graph.node[0]
    node.ParseFromString(node.SerializeToString() + bytes([0x42, 0x03]) + b"abc")
    return model.SerializeToString()


@pytest.mark.parametrize("feature", ["int4 initializer", "int4 cast", "function overload", "ir past the known"])
def test_ir_version_newer_features_are_one_error(work, capsys, feature):
    model = mlp()
    model.ir_version = onnx.IR_VERSION + 1
    if feature == "int4 initializer":
        q = onnx.TensorProto(name="q", data_type=22, dims=[4], raw_data=b"\x12\x34")   # onnx 1.14 has no INT4
        model.graph.initializer.append(q)
        match = "data type 22"
    elif feature == "int4 cast":
        node = model.graph.node[0]
        node.attribute.append(helper.make_attribute("to", 22))
        match = "data type 22"
    elif feature == "function overload":
        data = _with_unknown_node_field(model)
        model = onnx.ModelProto()
        model.ParseFromString(data)
        match = "does not know in a NodeProto"
    else:   # IR versions 10 to modelio.NEWEST_KNOWN_IR are read when they use nothing new (test_newer_exports.py)
        model.ir_version = modelio.NEWEST_KNOWN_IR + 1
        match = f"IR version {modelio.NEWEST_KNOWN_IR + 1}"
    path = work / "m.onnx"
    path.write_bytes(model.SerializeToString())
    table = table_for(mlp(), work / "t.json")
    msg = expect_one_error(capsys, work, lambda: optimize(capsys, path, table), match)
    assert "re-export with an older opset" in msg


def test_name_that_is_not_utf8_text(work, capsys):
    """protobuf hands back bytes for such a name; every later use of it would crash."""
    data = mlp().SerializeToString()
    assert data.count(b"matmul_0") == 1
    path = work / "m.onnx"
    path.write_bytes(data.replace(b"matmul_0", b"matmul\x80_"))
    table = table_for(mlp(), work / "t.json")
    for argv in (lambda: optimize(capsys, path, table), lambda: cli(capsys, "sites", path)):
        msg = expect_one_error(capsys, work, argv, "model.graph.node[0].name is not valid UTF-8 text")
        assert msg.endswith("(b'matmul\\x80_'): corrupt file")


def test_control_characters_in_names_stay_on_one_escaped_line(work, capsys, tmp_path):
    model = mlp()
    evil = "w0\n\x1b[2Jspdy-onnx: error: fake"
    model.graph.initializer[0].name = evil
    model.graph.node[0].input[1] = evil
    path = external_model(work, model)
    edit_external(path, location="/etc/hostname")
    table = table_for(mlp(), work / "t.json")
    code = main(["optimize", str(path), "--target", "1.5x", "--runtime", "table", "--latency-table", str(table)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "\x1b" not in err
    assert err.strip() == ("spdy-onnx: error: tensor 'w0\\n\\x1b[2Jspdy-onnx: error: fake' refers to external data "
                           "'/etc/hostname' outside the model's folder; only relative paths inside it are read")


# --- external data ---------------------------------------------------------------------------------

@pytest.fixture
def secret(tmp_path):
    """A file outside the model's folder that must never be opened."""
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "secret.data"
    path.write_bytes(os.urandom(64 * 64 * 4 * 4))
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_folder_is_refused_unread(work, capsys, secret, kind):
    path = external_model(work)
    if kind == "absolute":
        edit_external(path, location=str(secret), offset="0")
    elif kind == "dotdot":
        edit_external(path, location="../outside/secret.data", offset="0")
    else:
        (work / "link.data").symlink_to(secret)
        edit_external(path, location="link.data", offset="0")
    table = table_for(mlp(), work / "t.json")
    with opened_files() as opened:
        msg = expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "outside the model's folder")
    assert str(secret.resolve()) not in opened
    assert "only relative paths inside it are read" in msg


def test_external_data_missing_file(work, capsys):
    path = external_model(work)
    (work / "m.data").unlink()
    table = table_for(mlp(), work / "t.json")
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "external data file 'm.data' of tensor")


def test_external_data_short_file(work, capsys):
    path = external_model(work)
    data = (work / "m.data").read_bytes()
    (work / "m.data").write_bytes(data[: len(data) // 2])
    table = table_for(mlp(), work / "t.json")
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "is shorter than tensor")


def test_external_data_length_past_end(work, capsys):
    path = external_model(work)
    edit_external(path, length=str(10**9))
    table = table_for(mlp(), work / "t.json")
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "is shorter than tensor")


@pytest.mark.parametrize("offset", ["abc", "-5"])
def test_external_data_bad_offset(work, capsys, offset):
    path = external_model(work)
    edit_external(path, offset=offset)
    table = table_for(mlp(), work / "t.json")
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "bad external data offset")


def test_external_data_wrong_length_field(work, capsys):
    """length inside the file, but not what the tensor's shape needs: caught by the data check."""
    path = external_model(work)
    edit_external(path, length="16")
    table = table_for(mlp(), work / "t.json")
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "corrupt or truncated weights")


def test_external_data_model_works_and_output_keeps_external_data(work, capsys):
    model = mlp()
    path = external_model(work, model)
    table = table_for(model, work / "t.json")
    out = work / "out.onnx"
    before = snapshot(work)
    code, errors, _ = optimize(capsys, path, table, "-o", out, "--min-weights", "0")
    assert code == 0 and not errors
    assert {k: v for k, v in snapshot(work).items() if k in before} == before   # input and its data untouched
    new = sorted(set(snapshot(work)) - set(before))
    assert new == ["out.onnx", "out.onnx.data", "out.report.json"]              # no temporary leftovers
    written = onnx.load(str(out), load_external_data=False)
    assert all(modelio._is_external(t) for t in written.graph.initializer if t.name.startswith("w"))
    assert not any(p.key == modelio.EXTERNAL_MARK for p in written.metadata_props)
    pruned = onnx.load(str(out))
    onnx.checker.check_model(str(out))
    sites, _ = graph.find_sites(pruned)
    weights = graph.read_weights(pruned, sites)
    assert sorted(sparsity_of(w) for w in weights.values()) == pytest.approx([0.5, 0.9], abs=1e-3)


def test_external_output_never_overwrites_the_inputs_data(work, capsys):
    """The input keeps its weights in `out.onnx.data`: writing `out.onnx` would clobber them."""
    model = mlp()
    path = external_model(work, model, location="out.onnx.data")
    table = table_for(model, work / "t.json")
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table, "-o", work / "out.onnx"),
                     "refusing to overwrite")


def test_sparse_initializer_with_external_data_is_refused(work, capsys, secret):
    model = mlp()
    values = numpy_helper.from_array(np.ones(2, np.float32), "sp")
    values.data_location = TensorProto.EXTERNAL
    values.external_data.add(key="location", value=str(secret))
    values.ClearField("raw_data")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "sp_idx")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    path = save(model, work / "m.onnx")
    table = table_for(mlp(), work / "t.json")
    with opened_files() as opened:
        expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "external data")
    assert str(secret.resolve()) not in opened


# --- models over 2 GB (no 2 GB file is built) ------------------------------------------------------

def test_single_file_over_2gb_is_refused_before_reading(work, capsys):
    path = work / "huge.onnx"
    with open(path, "wb") as f:
        f.truncate(2**31 + 16)   # sparse: no disk space used
    table = table_for(mlp(), work / "t.json")
    with opened_files() as opened:
        msg = expect_one_error(capsys, work, lambda: optimize(capsys, path, table), "cannot exceed 2 GB")
    assert str(path.resolve()) not in opened
    assert "save_as_external_data=True" in msg


def test_external_data_models_are_checked_by_path(work, monkeypatch):
    """onnx.checker.check_model(path) is what works above 2 GB; in-memory checking is skipped there."""
    path = external_model(work)
    calls = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: (calls.append(m), real(m, *a, **k))[1])
    model = modelio.load_model(path)
    assert calls == [str(path)]
    assert modelio.loaded_with_external_data(model)
    # a >2GB proto is never handed to the in-memory checker (it would refuse it)
    monkeypatch.setattr(modelio, "TWO_GB", 1024)
    calls.clear()
    modelio.check_model(model)
    assert calls == []


def test_save_writes_external_data_above_2gb(work, monkeypatch):
    model = mlp()
    monkeypatch.setattr(modelio, "TWO_GB", 1024)   # stand-in for a model over 2 GB
    before = model.SerializeToString()
    out = modelio.save_model_atomic(model, work / "big.onnx")
    assert model.SerializeToString() == before      # the caller's model is not emptied
    assert sorted(p.name for p in work.iterdir()) == ["big.onnx", "big.onnx.data"]
    back = onnx.load(str(out))
    for a, b in zip(model.graph.initializer, back.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_save_of_a_model_loaded_with_external_data_writes_external_data(work):
    path = external_model(work)
    model = modelio.load_model(path)
    out = modelio.save_model_atomic(model, work / "copy" / "again.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["again.onnx", "again.onnx.data"]
    assert modelio.load_model(out).graph == model.graph


# --- initializer data vs dims ----------------------------------------------------------------------

def _short_raw(m):
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]


def _short_typed(m):
    t = m.graph.initializer[0]
    values = numpy_helper.to_array(t).ravel()[:-3]
    t.ClearField("raw_data")
    t.float_data.extend(values.tolist())


def _bigger_dims(m):
    m.graph.initializer[0].dims[0] = 65


def _negative_dim(m):
    m.graph.initializer[0].dims[0] = -64


def _unknown_type(m):
    m.graph.initializer[0].data_type = 77


@pytest.mark.parametrize("corrupt,match", [
    (_short_raw, "has 16380 bytes of data, but its shape 64x64 of FLOAT needs 16384"),
    (_short_typed, "has 4093 values, but its shape 64x64 of FLOAT needs 4096"),
    (_bigger_dims, "has 16384 bytes of data, but its shape 65x64 of FLOAT needs 16640"),
    (_negative_dim, "negative dimension"),
    (_unknown_type, "initializer 'w0' has an unknown data type 77"),
])
def test_initializer_data_not_matching_its_shape(work, capsys, corrupt, match):
    model = mlp()
    corrupt(model)
    path = work / "m.onnx"
    path.write_bytes(model.SerializeToString())
    table = table_for(mlp(), work / "t.json")
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table), match)


def test_constant_node_data_not_matching_its_shape(work, capsys):
    model = mlp(weight_form="constant")
    model.graph.node[0].attribute[0].t.raw_data = b"\0" * 12
    path = work / "m.onnx"
    path.write_bytes(model.SerializeToString())
    table = table_for(mlp(), work / "t.json")
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table),
                     "attribute 'value' of node 'const_0' has 12 bytes of data")


# --- weight forms ----------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["constant", "fp16", "transpose"])
def test_weight_forms_are_pruned_in_their_own_layout(work, capsys, form):
    """Constant nodes, fp16 behind Cast, and weights behind Transpose are pruned where they live."""
    model = mlp(weight_form=form)
    path = save(model, work / "m.onnx")
    table = table_for(model, work / "t.json")
    out = work / "out.onnx"
    code, errors, _ = optimize(capsys, path, table, "-o", out, "--min-weights", "0")
    assert code == 0 and not errors
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned)
    sites, _ = graph.find_sites(pruned)
    assert [s.name for s in sites] == ["matmul_0", "matmul_1"]
    weights = graph.read_weights(pruned, sites)
    assert sorted(sparsity_of(w) for w in weights.values()) == pytest.approx([0.5, 0.9], abs=1e-3)
    if form == "fp16":
        assert all(w.dtype == np.float16 for w in weights.values())
    if form == "transpose":
        assert all(s.chain == [("Transpose", (1, 0))] for s in sites)


def dq_model():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 127, (64, 64)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
             numpy_helper.from_array(np.array(0, np.int8), "zero"),
             numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "w1")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["w0"], name="dq"),
             helper.make_node("MatMul", ["x", "w0"], ["h"], name="matmul_0"),
             helper.make_node("MatMul", ["h", "w1"], ["y"], name="matmul_1")]
    return matmul_graph(nodes, inits, "dq")


def matmul_graph(nodes, inits, name):
    """A checked opset-13 model of `nodes` from x (1x4x64) to y (1x4x64)."""
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 64])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_dequantizelinear_weight_is_left_dense_with_reason(work, capsys):
    model = dq_model()
    path = save(model, work / "m.onnx")
    code, errors, out = cli(capsys, "sites", path, "--min-weights", "0")
    assert code == 0 and not errors
    line = next(line for line in out.splitlines() if line.startswith("matmul_0"))
    assert "dense: quantized weight (DequantizeLinear): left as is" in line
    table = table_for(model, work / "t.json")
    code, errors, _ = optimize(capsys, path, table, "-o", work / "out.onnx", "--min-weights", "0")
    assert code == 0 and not errors
    pruned = onnx.load(str(work / "out.onnx"))
    wq = {t.name: t for t in pruned.graph.initializer}["wq"]
    assert wq.raw_data == {t.name: t for t in model.graph.initializer}["wq"].raw_data


def shared_model(through_transpose: bool = True):
    """matmul_0 and matmul_1 read the same weight w0 (matmul_1 through a Transpose, or directly);
    matmul_2 has its own."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), n)
             for n in ("w0", "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="matmul_0"),
             helper.make_node("MatMul", ["h0", "w0t" if through_transpose else "w0"], ["h1"], name="matmul_1"),
             helper.make_node("MatMul", ["h1", "w2"], ["y"], name="matmul_2")]
    if through_transpose:
        nodes.insert(1, helper.make_node("Transpose", ["w0"], ["w0t"], perm=[1, 0]))
    return matmul_graph(nodes, inits, "shared")


def test_shared_weight_is_left_dense_with_reason(work, capsys):
    """A weight two nodes read in different ways (one through a Transpose) is excluded: one pruned array
    cannot serve both views, and it is never pruned for one user behind the other's back."""
    model = shared_model()
    path = save(model, work / "m.onnx")
    code, errors, out = cli(capsys, "sites", path, "--min-weights", "0")
    assert code == 0 and not errors
    for name in ("matmul_0", "matmul_1"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert "dense: weight 'w0' is shared by several nodes, not all of them MatMuls reading it directly" in line
    table = table_for(model, work / "t.json")
    code, errors, _ = cli(capsys, "optimize", path, "--target", "1.2x", "--runtime", "table", "--latency-table",
                          table, "-q", "-o", work / "out.onnx", "--min-weights", "0")
    assert code == 0 and not errors
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(work / "out.onnx")).graph.initializer}
    np.testing.assert_array_equal(pruned["w0"], numpy_helper.to_array(model.graph.initializer[0]))
    assert sparsity_of(pruned["w2"]) > 0


def test_a_weight_two_matmuls_read_directly_is_pruned_once_at_one_level(work, capsys):
    """Two MatMuls reading one weight directly are two sites tied to one level: the file holds one pruned
    array for both, and the report gives them the same level."""
    model = shared_model(through_transpose=False)
    path = save(model, work / "m.onnx")
    code, _, out = cli(capsys, "sites", path, "--min-weights", "0")
    assert code == 0 and "prunable (its weight 'w0' shared by 2 sites: one level)" in out
    table = table_for(model, work / "t.json")
    code, errors, _ = cli(capsys, "optimize", path, "--target", "1.5x", "--runtime", "table", "--latency-table",
                          table, "-q", "-o", work / "out.onnx", "--min-weights", "0", "--strategy", "spdy")
    assert code == 0 and not errors
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(work / "out.onnx")).graph.initializer}
    rep = json.loads((work / "out.report.json").read_text())
    levels = {s["name"]: s["sparsity"] for s in rep["sites"]}
    assert levels["matmul_0"] == levels["matmul_1"] > 0
    assert sparsity_of(pruned["w0"]) == pytest.approx(levels["matmul_0"], abs=0.02)


def test_weight_that_is_also_a_graph_output_is_left_dense():
    model = mlp()
    model.graph.output.append(helper.make_tensor_value_info("w0", TensorProto.FLOAT, [64, 64]))
    sites, unprunable = graph.find_sites(model)
    assert [s.name for s in sites] == ["matmul_1"]
    assert unprunable == {"matmul_0": "weight 'w0' is also a graph output: left dense"}


# --- control flow ----------------------------------------------------------------------------------

def control_flow_model(kind: str, share_weight: bool = False):
    """The tiny MLP (2 prunable MatMuls) plus an If/Loop/Scan whose body has a MatMul of its own.

    With share_weight, the body's MatMul reads the main graph's weight w1 (an outer-scope input).
    """
    m = mlp()
    g = m.graph
    rng = np.random.default_rng(1)
    g.initializer.append(numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "ws"))
    ws = "w1" if share_weight else "ws"
    vi = helper.make_tensor_value_info
    if kind == "If":
        g.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        then_g = helper.make_graph([helper.make_node("MatMul", ["add1", ws], ["t_out"], name="then_mm")], "then",
                                   [], [vi("t_out", TensorProto.FLOAT, [1, 4, 64])])
        else_g = helper.make_graph([helper.make_node("Identity", ["add1"], ["e_out"], name="else_id")], "else",
                                   [], [vi("e_out", TensorProto.FLOAT, [1, 4, 64])])
        g.node.append(helper.make_node("If", ["cond"], ["z"], name="if0", then_branch=then_g, else_branch=else_g))
        g.output.append(vi("z", TensorProto.FLOAT, [1, 4, 64]))
    elif kind == "Loop":
        g.initializer.append(numpy_helper.from_array(np.array(2, np.int64), "trip"))
        g.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        body = helper.make_graph(
            [helper.make_node("Identity", ["c_in"], ["c_out"], name="body_cond"),
             helper.make_node("MatMul", ["v_in", ws], ["v_out"], name="body_mm")], "body",
            [vi("i", TensorProto.INT64, []), vi("c_in", TensorProto.BOOL, []), vi("v_in", TensorProto.FLOAT, [1, 4, 64])],
            [vi("c_out", TensorProto.BOOL, []), vi("v_out", TensorProto.FLOAT, [1, 4, 64])])
        g.node.append(helper.make_node("Loop", ["trip", "cond", "add1"], ["z"], name="loop0", body=body))
        g.output.append(vi("z", TensorProto.FLOAT, [1, 4, 64]))
    else:
        g.initializer.append(numpy_helper.from_array(np.array([4, 64], np.int64), "shape2d"))
        g.node.append(helper.make_node("Reshape", ["add1", "shape2d"], ["s0"], name="to2d"))
        body = helper.make_graph(
            [helper.make_node("MatMul", ["s_in", ws], ["s_mm"], name="scan_mm"),
             helper.make_node("Add", ["s_mm", "x_in"], ["s_out"], name="scan_add"),
             helper.make_node("Identity", ["s_out"], ["scan_y"], name="scan_id")], "body",
            [vi("s_in", TensorProto.FLOAT, [4, 64]), vi("x_in", TensorProto.FLOAT, [64])],
            [vi("s_out", TensorProto.FLOAT, [4, 64]), vi("scan_y", TensorProto.FLOAT, [4, 64])])
        g.node.append(helper.make_node("Scan", ["s0", "s0"], ["z", "zs"], name="scan0", body=body, num_scan_inputs=1))
        g.output.append(vi("z", TensorProto.FLOAT, [4, 64]))
        g.output.append(vi("zs", TensorProto.FLOAT, [4, 4, 64]))
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_control_flow_subgraphs_are_left_alone(work, capsys, kind):
    import onnxruntime as ort
    model = control_flow_model(kind)
    path = save(model, work / "m.onnx")
    code, errors, out = cli(capsys, "sites", path, "--min-weights", "0")
    assert code == 0 and not errors
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["matmul_0"].endswith("prunable") and lines["matmul_1"].endswith("prunable")
    body = [line for name, line in lines.items() if "/" in name]
    assert len(body) == 1 and f"dense: inside a control-flow subgraph ({kind})" in body[0]
    table = table_for(model, work / "t.json")
    out_path = work / "out.onnx"
    code, errors, _ = optimize(capsys, path, table, "-o", out_path, "--min-weights", "0")
    assert code == 0 and not errors
    pruned = onnx.load(str(out_path))
    onnx.checker.check_model(pruned)
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert sparsity_of(inits["ws"]) == 0.0                     # the body's weight is untouched
    assert sorted([sparsity_of(inits["w0"]), sparsity_of(inits["w1"])]) == pytest.approx([0.5, 0.9], abs=1e-3)
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.ones((1, 4, 64), np.float32)})


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_weight_shared_with_a_subgraph_is_left_dense(kind):
    model = control_flow_model(kind, share_weight=True)
    sites, unprunable = graph.find_sites(model)
    assert [s.name for s in sites] == ["matmul_0"]
    assert "shared with a node inside a control-flow subgraph" in unprunable["matmul_1"]


# --- custom domains --------------------------------------------------------------------------------

def custom_domain_model():
    m = mlp()
    m.graph.node.append(helper.make_node("FancyOp", ["y"], ["z"], name="fancy", domain="com.example"))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 64]))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.checker.check_model(m)
    return m


def test_custom_domain_on_the_table_runtime_without_data_works(work, capsys):
    """The table runtime never runs the model, so an unknown op is carried through untouched."""
    model = custom_domain_model()
    path = save(model, work / "m.onnx")
    table = table_for(model, work / "t.json")
    code, errors, _ = optimize(capsys, path, table, "-o", work / "out.onnx", "--min-weights", "0")
    assert code == 0 and not errors
    assert [n.op_type for n in onnx.load(str(work / "out.onnx")).graph.node][-1] == "FancyOp"


def test_custom_domain_with_calibration_data_is_one_error(work, capsys):
    model = custom_domain_model()
    path = save(model, work / "m.onnx")
    table = table_for(model, work / "t.json")
    np.savez(work / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 4, 64)).astype(np.float32))
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table, "--data", work / "calib.npz",
                                                    "--cache-dir", work / "cache", "--min-weights", "0"),
                     "com.example")


@pytest.mark.deepsparse
def test_custom_domain_on_deepsparse_is_one_error(work, capsys):
    pytest.importorskip("deepsparse")
    path = save(custom_domain_model(), work / "m.onnx")
    expect_one_error(capsys, work, lambda: cli(capsys, "optimize", path, "--target", "1.2x", "--cores", "1",
                                               "--levels", "0.5,0.9", "--repeats", "1", "-q",
                                               "--cache-dir", work / "cache"),
                     "custom operator domain(s) com.example that DeepSparse cannot run")


@pytest.mark.deepsparse
def test_external_data_model_profiles_on_deepsparse(work, capsys):
    """DeepSparse reads the external-data copies the tool hands it (the `.data` travels with them)."""
    pytest.importorskip("deepsparse")
    path = external_model(work, tiny.mlp(width=128, depth=2, seq=8))
    code, errors, _ = cli(capsys, "profile", path, "--cores", "1", "--levels", "0.5", "--repeats", "1", "-q",
                          "--cache-dir", work / "cache", "-o", work / "table.json")
    assert code == 0 and not errors
    table = LatencyTable.load(work / "table.json")
    assert set(table.times) == {"matmul_0", "matmul_1"}


# --- inputs and weight chains that would otherwise crash later ------------------------------------

@pytest.mark.parametrize("edit,match", [
    (lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", TensorProto.STRING),
     "input 'x' has element type 8, which cannot be fed (numeric and bool tensor inputs only)"),
    (lambda m: setattr(m.graph.input[0].type.tensor_type.shape.dim[1], "dim_value", 2**30),
     "input 'x' of shape 1x1073741824x64 would take 256.0 GiB per batch; inputs over 2 GiB are refused"),
])
def test_inputs_that_cannot_be_fed(work, capsys, edit, match):
    model = mlp()
    edit(model)
    path = work / "m.onnx"
    path.write_bytes(model.SerializeToString())
    table = table_for(mlp(), work / "t.json")
    expect_one_error(capsys, work, lambda: optimize(capsys, path, table), match)


def test_transpose_perm_not_fitting_the_weight_leaves_it_dense():
    model = mlp(weight_form="transpose")
    for node in model.graph.node:
        if node.op_type == "Transpose":
            node.attribute[0].ints[:] = [0, 1, 2]
    sites, unprunable = graph.find_sites(model)
    assert not sites
    assert unprunable["matmul_0"] == ("weight 'w0_t' goes through a Transpose with perm [0, 1, 2], which does not "
                                      "fit its rank 2: left dense")
