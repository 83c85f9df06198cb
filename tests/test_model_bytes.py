"""Model bytes handled without serialising the weights: onnxruntime sessions from arrays, and the 2 GB test."""
import gc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from spdy_onnx import modelio, ort_session


def _model():
    """y = If(flag, (x @ W1 + b) * s, x @ W2) with weights of every kind: raw, typed, tiny, int64 shape."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w1")   # raw, 8 KiB
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [64, 32], rng.standard_normal(64 * 32).tolist())  # float_data
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")          # raw, under 1 KiB
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 32])                 # int64_data, negative
    scale = numpy_helper.from_array(np.full((4, 32), 0.5, dtype=np.float32), "scale_big")
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["t1"]), helper.make_node("Add", ["t1", "b"], ["t2"]),
         helper.make_node("Mul", ["t2", "s1"], ["t3"]), helper.make_node("Reshape", ["t3", "shape"], ["y_then"])],
        "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w2"], ["y_else"])], "else", [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Constant", [], ["s1"], value=numpy_helper.from_array(np.float32(0.5))),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64]),
                                       helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          initializer=[w1, w2, b, shape, scale], doc_string="a model for the byte tests")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    helper.set_model_props(m, {"note": "x" * 300})
    return m


@pytest.mark.parametrize("flag", [True, False])
def test_a_session_from_arrays_computes_what_one_from_bytes_does_and_outlives_the_model(flag):
    m = _model()
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32), "flag": np.array(flag)}
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    skeleton, arrays = ort_session.split_weights(m)
    assert [n for n, _ in arrays] == ["w1"]   # typed, small and shape tensors stay in the proto
    assert not skeleton.graph.initializer[0].HasField("raw_data")
    assert len(skeleton.SerializeToString()) < len(m.SerializeToString()) - 8000
    session = ort_session.make_session(m)
    del m, skeleton, arrays
    gc.collect()
    _ = [np.ones(1 << 16, dtype=np.float32) for _ in range(8)]   # reuse freed memory, if any was freed
    np.testing.assert_array_equal(session.run(None, feeds)[0], ref)


def test_the_2gb_test_matches_bytesize_on_both_sides_of_the_limit(monkeypatch):
    m = _model()
    size = m.ByteSize()
    for limit in (size - 1, size, size + 1, size * 10):
        monkeypatch.setattr(modelio, "TWO_GB", limit)
        assert modelio.over_two_gb(m) == (size > limit)
    monkeypatch.undo()
    bound = (sum(modelio._tensor_bytes_bound(t) for t in m.graph.initializer)
             + modelio._fields_bound(m, "graph") + modelio._fields_bound(m.graph, "initializer"))
    assert size <= bound < 2 * size   # a bound, and not a useless one
