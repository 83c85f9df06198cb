"""Models from today's exporters: ONNX IR version 10 with metadata_props, opset 20 and later, Gelu.

torch.onnx.export's default exporter (torch 2.13 with onnx 1.23) writes all three; the installed onnx
1.14 (DeepSparse 1.8's pin) knows IR version 9 and opset 19, and DeepSparse loads opset 18. Such a
model is read as the older version when that computes the same, and is one clear error naming what
differs otherwise. tests/fixtures/dynamo_encoder.onnx is a real export of that exporter
(tests/fixtures/make_dynamo_export.py).
"""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny
from google.protobuf.unknown_fields import UnknownFieldSet
from onnx import TensorProto, helper, numpy_helper

from spdy_onnx import modelio
from spdy_onnx.cli import main
from spdy_onnx.errors import SpdyError
from spdy_onnx.passes.opsets import as_opset, opset_blockers
from spdy_onnx.tables import LatencyTable

FIXTURE = Path(__file__).parent / "fixtures" / "dynamo_encoder.onnx"


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _with_metadata(message, field: int, key: str = "pkg.torch.onnx.stack_trace", value: str = "File x.py") -> None:
    """Append a metadata_props entry as field `field` (unknown to onnx 1.14) to `message`, in place."""
    entry = onnx.StringStringEntryProto(key=key, value=value).SerializeToString()
    message.ParseFromString(message.SerializeToString() + _varint(field << 3 | 2) + _varint(len(entry)) + entry)


def _mlp_with_metadata():
    model = tiny.mlp(width=64, depth=2, seq=4)
    model.ir_version = 10
    for node in model.graph.node:
        _with_metadata(node, 9)                      # NodeProto.metadata_props
    _with_metadata(model.graph.input[0], 4)          # ValueInfoProto.metadata_props
    _with_metadata(model.graph.initializer[0], 16)   # TensorProto.metadata_props
    _with_metadata(model.graph, 16)                  # GraphProto.metadata_props
    assert len(UnknownFieldSet(model.graph.node[0])) == 1
    return model


def _table(model, path: Path) -> Path:
    from spdy_onnx import graph
    sites, _ = graph.find_sites(graph.constants_to_initializers(model))
    return LatencyTable(levels=[0.0, 0.5, 0.9], times={s.name: [1.0, 0.6, 0.3] for s in sites},
                        dense_total_ms=1.0 * len(sites) + 0.5, runtime="table", meta={"cores": 1}).save(path)


def _no_unknown_fields(message) -> bool:
    if len(UnknownFieldSet(message)):
        return False
    for field, value in message.ListFields():
        if field.message_type is not None and field.name != "raw_data":
            if not all(_no_unknown_fields(v) for v in (value if hasattr(value, "extend") else [value])):
                return False
    return True


@pytest.mark.parametrize("external", [False, True])
def test_ir_10_metadata_is_dropped_and_the_model_read_as_ir_9(tmp_path, capsys, external):
    """The checker reads an external-data model by path, where it would see IR version 10: a model
    read at an older version is checked in memory instead."""
    model = _mlp_with_metadata()
    path = tmp_path / "m.onnx"
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
        assert onnx.load(str(path), load_external_data=False).ir_version == 10
        assert len(UnknownFieldSet(onnx.load(str(path), load_external_data=False).graph.node[0])) == 1
    else:
        path.write_bytes(model.SerializeToString())   # onnx.save would refuse the version itself
    out = tmp_path / "out.onnx"
    code = main([str(a) for a in ("optimize", path, "--target", "1.5x", "--runtime", "table", "--latency-table",
                                  _table(tiny.mlp(width=64, depth=2, seq=4), tmp_path / "t.json"), "-o", out)])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    n_tagged = len(model.graph.node) + 3
    assert f"metadata_props on {n_tagged} graph element(s)" in err
    written = onnx.load(str(out))
    assert written.ir_version == onnx.IR_VERSION and _no_unknown_fields(written)


def test_a_field_that_is_not_metadata_is_still_refused(tmp_path, capsys):
    model = _mlp_with_metadata()
    node = model.graph.node[1]
    node.ParseFromString(node.SerializeToString() + bytes([0x42, 0x03]) + b"abc")   # field 8: an overload
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(SpdyError, match="does not know in a NodeProto"):
        modelio.load_model(path)


def _gelu_model(opset: int, approximate: str | None):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    attrs = {} if approximate is None else {"approximate": approximate}
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Gelu", ["h"], ["g"], name="act", **attrs),
             helper.make_node("ReduceMean", ["g", "axes"], ["y"], name="pool", keepdims=0)]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [w, axes],
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 8, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
def test_opset_20_with_gelu_reads_as_19_and_computes_the_same(tmp_path, approximate):
    model = _gelu_model(20, approximate)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    read = modelio.load_model(path)
    assert modelio.default_opset(read) == 19 and read.ir_version == 9
    assert "Gelu" not in {n.op_type for n in read.graph.node}
    assert ("Tanh" if approximate == "tanh" else "Erf") in {n.op_type for n in read.graph.node}
    onnx.checker.check_model(read, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 8, 16)).astype(np.float32) * 3
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]          # onnxruntime knows opset 20
    got = ort.InferenceSession(read.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ops_that_changed_after_the_older_opset_are_named(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    scale = numpy_helper.from_array(np.ones(4, np.float32), "s")
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    norm = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)   # per channel at 21
    model = helper.make_model(helper.make_graph([norm], "g", [x], [y], [scale, bias]),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(SpdyError, match=r"GroupNormalization \(changed in opset 21\).*opset_version"):
        modelio.load_model(path)
    model.opset_import[0].version = 29
    path.write_bytes(model.SerializeToString())
    with pytest.raises(SpdyError, match="opsets past 28 are not known"):
        modelio.load_model(path)


def test_opset_19_to_18_keeps_what_computes_the_same_and_names_the_rest():
    """DeepSparse loads opset 18: Cast, Pad and AveragePool changed at 19 in ways a node may not use."""
    def model_with(*nodes):
        graph = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 7, 7])],
                                  [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])

    plain = model_with(helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
                       helper.make_node("Pad", ["c", "pads"], ["p"], mode="reflect"),
                       helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2]))
    assert opset_blockers(plain, 19, 18) == {}
    read = as_opset(plain, 18)
    assert modelio.default_opset(read) == 18
    onnx.checker.check_model(read, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(ort.InferenceSession(read.SerializeToString()).run(None, {"x": x})[0],
                               ort.InferenceSession(plain.SerializeToString()).run(None, {"x": x})[0],
                               rtol=1e-6, atol=1e-6)   # onnxruntime's kernels of the two versions round apart
    uses = model_with(helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT, saturate=0),
                      helper.make_node("Pad", ["c", "pads"], ["p"], mode="wrap"),
                      helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2], dilations=[2, 2]))
    assert set(opset_blockers(uses, 19, 18)) == {"Cast", "Pad", "AveragePool"}
    with pytest.raises(SpdyError, match=r"DeepSparse reads opsets up to 18.*AveragePool \(changed in opset 19\), "
                                        r"Cast \(changed in opset 19\), Pad \(changed in opset 19\)"):
        as_opset(uses, 18, "m.onnx", reader="DeepSparse")


def test_a_real_dynamo_export_reads_and_runs_on_deepsparse_as_onnxruntime_runs_the_file(capsys):
    deepsparse = pytest.importorskip("deepsparse")
    from spdy_onnx.api import Prepared
    assert onnx.load(str(FIXTURE)).ir_version == 10     # the file as the exporter wrote it
    code = main(["sites", str(FIXTURE)])
    captured = capsys.readouterr()
    assert code == 0 and "prunable" in captured.out and "Traceback" not in captured.err
    prep = Prepared(FIXTURE, runtime="deepsparse", batch_size=1, cores=1, input_shapes=None, exclude=None,
                    include=None, min_weights=1024, progress=False)
    try:
        assert modelio.default_opset(prep.model) == 17 and prep.model.ir_version == 9   # DeepSparse's native_opset
        assert {n.op_type for n in prep.model.graph.node}.isdisjoint({"Gelu", "LayerNormalization"})
        assert len(prep.sites) >= 4
        ids = np.random.default_rng(0).integers(0, 500, (1, 32)).astype(np.int64)
        want = ort.InferenceSession(str(FIXTURE)).run(None, {"input_ids": ids})[0]
        engine = deepsparse.Engine(str(prep.dense_static()), batch_size=1, num_cores=1)
        got = engine.run([ids])[0]
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    finally:
        prep.close()


def test_opset_18_reductions_and_splits_are_written_in_their_opset_17_forms():
    """DeepSparse 1.8 ran none of transformers' ResNet natively with its ReduceMean taking axes as an input
    (opset 18), and 96% of it at opset 17; GPT-2's Split with num_outputs likewise."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 10, 6])
    outs = [helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, shape)
            for k, shape in enumerate([[2, 1, 1], [], [1, 1, 1], [2, 4, 6], [2, 4, 6]])]
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y0"], keepdims=1),
             helper.make_node("ReduceMax", ["x"], ["y1"], keepdims=0),                       # every axis
             helper.make_node("ReduceSumSquare", ["x", "none"], ["y2"], noop_with_empty_axes=0),  # every axis
             helper.make_node("Split", ["x"], ["y3", "y4", "s3"], axis=1, num_outputs=3)]      # 4, 4, 2
    graph = helper.make_graph(nodes, "g", [x], outs, [numpy_helper.from_array(np.array([-1, 1], np.int64), "axes"),
                                                      numpy_helper.from_array(np.zeros(0, np.int64), "none")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    read = as_opset(model, 17)
    assert modelio.default_opset(read) == 17
    onnx.checker.check_model(read, full_check=True)
    assert [len(n.input) for n in read.graph.node] == [1, 1, 1, 2]
    data = np.random.default_rng(0).standard_normal((2, 10, 6)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": data})
    got = ort.InferenceSession(read.SerializeToString()).run(None, {"x": data})
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert got[3].shape == (2, 4, 6)
    runtime_axes = helper.make_graph([helper.make_node("Shape", ["x"], ["s"]),
                                      helper.make_node("Slice", ["s", "zero", "one"], ["a"]),
                                      helper.make_node("ReduceMean", ["x", "a"], ["y0"])], "g", [x], outs[:1],
                                     [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                                      numpy_helper.from_array(np.array([1], np.int64), "one")])
    model = helper.make_model(runtime_axes, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(SpdyError, match=r"ReduceMean \(changed in opset 18\)"):   # axes known only at run time
        as_opset(model, 17)
