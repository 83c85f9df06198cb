import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny

from spdy_onnx import graph
from spdy_onnx.levels import log_density_grid, parse_levels
from spdy_onnx.errors import SpdyError
from spdy_onnx.passes import magnitude_prune, set_metadata, get_metadata, sparsity_of, write_weights
from spdy_onnx.scores import removed_energy


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("form", ["initializer", "constant", "transpose", "fp16"])
def test_sites_found_through_weight_forms(form):
    model = graph.constants_to_initializers(tiny.mlp(width=64, depth=3, seq=4, weight_form=form))
    sites, unprunable = graph.find_sites(model)
    assert [s.name for s in sites] == ["matmul_0", "matmul_1", "matmul_2"]
    assert not unprunable
    weights = graph.read_weights(model, sites)
    for s in sites:
        m = s.to_matrix(weights[s.name])
        assert m.shape == (64, 64)
        back = s.from_matrix(m)
        assert back.dtype == weights[s.name].dtype
        np.testing.assert_array_equal(back, weights[s.name])


def test_matrix_view_is_outputs_by_reduction():
    model = tiny.cnn(channels=8, classes=10)
    sites, _ = graph.find_sites(model)
    by = {s.name: s for s in sites}
    w = graph.read_weights(model, sites)
    conv = by["conv1"]                       # (8, 16, 3, 3)
    m = conv.to_matrix(w["conv1"])
    assert m.shape == (8, 16 * 9) and conv.reduction_size == 144
    # channels-last reduction order: column (kh*3+kw)*16 + c is weight[o, c, kh, kw]
    assert m[3, (1 * 3 + 2) * 16 + 5] == w["conv1"][3, 5, 1, 2]
    fc = by["classifier"]                    # Gemm transB=1, weight (10, 8)
    assert fc.trans_b and fc.to_matrix(w["classifier"]).shape == (10, 8)
    np.testing.assert_array_equal(fc.from_matrix(fc.to_matrix(w["classifier"])), w["classifier"])


def test_default_exclusions_and_patterns():
    model = tiny.cnn(channels=64, classes=100)
    sites, _ = graph.find_sites(model)
    chosen, excluded = graph.select_sites(sites)
    assert "depthwise" in excluded and "grouped" in excluded["depthwise"]
    assert "stem_conv" in excluded and "tiny" in excluded["stem_conv"]
    assert {s.name for s in chosen} == {"conv1", "pointwise", "classifier"}
    chosen, excluded = graph.select_sites(sites, exclude=["class.*"], include=["depthwise"])
    assert {s.name for s in chosen} == {"conv1", "pointwise", "depthwise"}
    assert excluded["classifier"] == "excluded by --exclude"
    with pytest.raises(SpdyError):
        graph.select_sites(sites, exclude=["("])


def test_a_pattern_that_matches_only_part_of_a_name_is_named_with_the_fix(caplog):
    sites, _ = graph.find_sites(tiny.cnn(channels=64, classes=100))
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        chosen, _ = graph.select_sites(sites, include=["depth"])
    assert "depthwise" not in {s.name for s in chosen}          # patterns match whole names
    assert "--include pattern 'depth'" in caplog.text and "'.*depth.*'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        chosen, _ = graph.select_sites(sites, include=[".*depth.*"])
    assert "depthwise" in {s.name for s in chosen} and caplog.text == ""
    caplog.clear()
    with caplog.at_level("WARNING", logger="spdy_onnx"):       # already a part-of-a-name pattern
        graph.select_sites(sites, include=[".*nomatch.*"])
    assert "matches no site" in caplog.text and ".*.*nomatch" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spdy_onnx"):       # only nodes left dense: say why they are
        graph.select_sites(sites, include=[".*shared.*"], unprunable={"shared_mm": "weight 'w' is shared"})
    assert "matches only node(s) that cannot be pruned: 1, such as 'shared_mm' (weight 'w' is shared)" in caplog.text


def test_a_matmul_with_its_constant_first_is_listed_as_left_dense():
    from onnx import TensorProto, helper
    w = helper.make_tensor("w", TensorProto.FLOAT, [16, 8], np.ones(128, dtype=np.float32))
    g = helper.make_graph([helper.make_node("MatMul", ["w", "x"], ["y"], name="wx")], "wx",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 4])], [w])
    sites, unprunable = graph.find_sites(helper.make_model(g))
    assert sites == [] and "first input (MatMul of W and x)" in unprunable["wx"]


def test_a_gemm_with_its_constant_first_and_an_einsum_are_listed_as_left_dense():
    """`sites` printed '0 prunable, 0 left dense' for both, with no reason."""
    from onnx import TensorProto, helper
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.ones(64, dtype=np.float32))
    nodes = [helper.make_node("Gemm", ["w", "x"], ["h"], name="wx_gemm"),
             helper.make_node("Einsum", ["h", "w"], ["y"], name="ein", equation="ij,jk->ik")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])], [w])
    sites, unprunable = graph.find_sites(helper.make_model(g))
    assert sites == [] and "first input (Gemm of W and x)" in unprunable["wx_gemm"]
    assert "Einsum is not pruned" in unprunable["ein"]


def test_no_constant_weight_is_silently_absent():
    """A ConvTranspose, and a MatMul whose weight is a Reshape of an initializer (tf2onnx writes these),
    are listed as left dense with the reason; a MatMul of two activations behind DequantizeLinear (a
    QDQ model's attention) is no weight and is not listed."""
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "up_w"),
             numpy_helper.from_array(np.ones(64, np.float32), "flat"),
             numpy_helper.from_array(np.array([8, 8], np.int64), "shape"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("ConvTranspose", ["img", "up_w"], ["up"], name="upsample"),
             helper.make_node("Reshape", ["flat", "shape"], ["w8"]),
             helper.make_node("MatMul", ["x", "w8"], ["h"], name="dense2"),
             helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"]),
             helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["hd"]),
             helper.make_node("MatMul", ["x", "hd"], ["y"], name="scores")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 5, 5]),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8])],
                          [helper.make_tensor_value_info("up", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    sites, unprunable = graph.find_sites(helper.make_model(g))
    assert sites == []
    assert "ConvTranspose is not pruned" in unprunable["upsample"]
    assert "comes through a Reshape of initializer 'flat'" in unprunable["dense2"]
    assert "scores" not in unprunable


def test_a_weight_several_matmuls_read_is_one_group_of_sites():
    """A weight that several nodes of one kind read directly (ALBERT's layers, a siamese tower) is a site
    at each, grouped: one level and one reconstruction for all. Read also by another kind of node (a
    Gather of tied embeddings, a Gemm) or through a Transpose, it stays dense with the reason; and a node
    the user leaves dense keeps the shared weight dense at the others."""
    from onnx import helper, numpy_helper
    model = tiny.mlp(width=32, depth=3, seq=2, weight_form="shared")
    sites, unprunable = graph.find_sites(model)
    assert [s.name for s in sites] == ["matmul_0", "matmul_1", "matmul_2"] and not unprunable
    assert graph.shared_weight_groups(sites) == [["matmul_0", "matmul_1", "matmul_2"]]
    chosen, excluded = graph.select_sites(sites, exclude=["matmul_1"], min_weights=0)
    assert chosen == [] and excluded["matmul_1"] == "excluded by --exclude"
    assert excluded["matmul_0"] == "shares its weight with 'matmul_1', which is left dense: left dense"

    # a TorchScript export reads every later use of a shared parameter through an Identity
    w = numpy_helper.from_array(np.ones((16, 16), np.float32), "w")
    for copy_is_output in (False, True):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                 helper.make_node("Identity", ["w"], ["w_copy"]),
                 helper.make_node("MatMul", ["h", "w_copy"], ["y"], name="mm_1")]
        outs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
        if copy_is_output:
            outs.append(helper.make_tensor_value_info("w_copy", onnx.TensorProto.FLOAT, None))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16, 16])],
                              outs, [w])
        sites, unprunable = graph.find_sites(helper.make_model(g))
        if copy_is_output:
            assert sites == [] and "shared by several nodes" in unprunable["mm"]
        else:
            assert graph.shared_weight_groups(sites) == [["mm", "mm_1"]] and not unprunable

    for other in (helper.make_node("Gemm", ["x", "w"], ["y"], name="other"),
                  helper.make_node("Gather", ["w", "ids"], ["y"], name="other"),
                  helper.make_node("Transpose", ["w"], ["y"], name="other")):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), other]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16, 16]),
                                           helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
        sites, unprunable = graph.find_sites(helper.make_model(g))
        assert sites == []
        assert "is shared by several nodes, not all of them MatMuls reading it directly" in unprunable["mm"]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.97])
def test_magnitude_prune_exact_count(sparsity):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((37, 53)).astype(np.float32)
    p = magnitude_prune(w, sparsity)
    assert np.count_nonzero(p == 0) == round(sparsity * w.size)
    kept = np.abs(w[p != 0])
    if kept.size and sparsity > 0:
        assert kept.min() >= np.abs(w[p == 0]).max()


def test_removed_energy_matches_pruning():
    rng = np.random.default_rng(2)
    w = rng.standard_normal(1000)
    levels = [0.0, 0.5, 0.9]
    e = removed_energy(w, levels)
    for s, ej in zip(levels, e):
        assert np.isclose(ej, np.sum((w - magnitude_prune(w, s)) ** 2) / np.sum(w**2))
    assert e[0] == 0 and e[1] < e[2]


def test_write_weights_keeps_model_and_zero_level_is_identity():
    model = tiny.mlp(width=64, depth=2, seq=4, weight_form="fp16")
    sites, _ = graph.find_sites(model)
    weights = graph.read_weights(model, sites)
    x = np.random.default_rng(0).standard_normal((1, 4, 64)).astype(np.float32)
    same = write_weights(model, {s.weight: weights[s.name] for s in sites})
    np.testing.assert_array_equal(run(same, x), run(model, x))
    pruned = write_weights(model, {s.weight: magnitude_prune(weights[s.name], 0.5) for s in sites})
    onnx.checker.check_model(pruned)
    assert pruned.ir_version == model.ir_version and pruned.opset_import == model.opset_import
    for s in graph.find_sites(pruned)[0]:
        assert sparsity_of(graph.read_weights(pruned, [s])[s.name]) == pytest.approx(0.5, abs=1e-3)
    assert not np.allclose(run(pruned, x), run(model, x))
    tagged = set_metadata(pruned, {"target": 2.0})
    assert get_metadata(tagged) == {"target": 2.0}


def test_level_grid():
    g = log_density_grid(5, 0.5, 0.9375)
    assert g[0] == 0.0 and len(g) == 6
    dens = 1 - np.array(g[1:])
    assert np.allclose(dens[1:] / dens[:-1], dens[1] / dens[0], rtol=1e-2)
    assert parse_levels("0.9,0.5") == [0.0, 0.5, 0.9]
    assert len(parse_levels("8")) == 9
    for bad in ["abc", "1.5", "0.5,x"]:
        with pytest.raises(SpdyError):
            parse_levels(bad)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("opset,bias", [(17, True), (17, False), (18, True)])
def test_layernorm_is_rewritten_into_primitive_ops_with_the_same_outputs(opset, bias):
    from spdy_onnx.passes.decompose import decompose_layernorm
    model = tiny.layernorm_mlp(width=32, depth=3, seq=5, opset=opset, bias=bias)
    before = model.SerializeToString()
    out, count = decompose_layernorm(model)
    assert count == 3 and model.SerializeToString() == before            # the input model is not touched
    onnx.checker.check_model(out, full_check=True)
    assert not any(n.op_type == "LayerNormalization" for n in out.graph.node)
    assert sum(n.op_type == "ReduceMean" for n in out.graph.node) == 6
    x = np.random.default_rng(0).standard_normal((1, 5, 32)).astype(np.float32) * 3 + 1
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-4, atol=1e-4)
    sites, _ = graph.find_sites(out)                                         # the sites are unchanged
    assert [s.name for s in sites] == [s.name for s in graph.find_sites(model)[0]]


@pytest.mark.parametrize("opset", [14, 10])
def test_hardswish_and_hardsigmoid_are_rewritten_into_ops_the_engine_runs(tmp_path, opset):
    """With a HardSwish (opset 14+, every MobileNetV3 export) DeepSparse ran none of the graph itself, and
    HardSigmoid (a squeeze-excite gate; torch's opset-13 HardSwish) it hands to onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper
    from spdy_onnx.passes.decompose import decompose_hard_activations
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 16, 1, 1)).astype(np.float32), "w2")
    act = (helper.make_node("HardSwish", ["a"], ["h"], name="act") if opset >= 14
           else helper.make_node("HardSigmoid", ["a"], ["g"], name="gate", alpha=0.25, beta=0.4))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]), act]
    if opset >= 14:
        nodes.append(helper.make_node("HardSigmoid", ["h"], ["g"], name="gate", alpha=0.25, beta=0.4))
    nodes += [helper.make_node("Mul", ["a", "g"], ["m"], name="scale"),
              helper.make_node("Conv", ["m", "w2"], ["y"], name="conv2")]
    g = helper.make_graph(nodes, "hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], [w1, w2])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    before = model.SerializeToString()
    out, counts = decompose_hard_activations(model)
    want = {"HardSwish": 1, "HardSigmoid": 1} if opset >= 14 else {"HardSigmoid": 1}
    assert counts == want and model.SerializeToString() == before
    onnx.checker.check_model(out, full_check=True)
    assert not {"HardSwish", "HardSigmoid"} & {n.op_type for n in out.graph.node}
    consts = [t for t in out.graph.initializer if t.name.endswith(("/alpha", "/beta"))]
    assert consts and all(list(t.dims) == [1, 1, 1, 1] for t in consts)   # rank 0 broke the engine's conv bias
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32) * 4     # over the whole ramp and both flats
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-5, atol=1e-5)
    deepsparse = pytest.importorskip("deepsparse")
    from spdy_onnx.runtimes.deepsparse import DeepSparseRuntime
    rewritten, counts = DeepSparseRuntime(cores=1, progress=False).native_graph(model)
    assert counts == want
    shares, outs = [], []
    for k, m in enumerate((model, rewritten)):
        path = tmp_path / f"m{k}.onnx"
        onnx.save(m, path)
        engine = deepsparse.Engine(str(path), batch_size=1, num_cores=1)
        shares.append(engine.fraction_of_supported_ops)
        outs.append(engine.run([x])[0])
    assert shares[0] < 0.9 and shares[1] == 1.0     # 0.0 with a HardSwish, 0.8 with a HardSigmoid
    np.testing.assert_allclose(outs[1], _run(model, x), rtol=1e-3, atol=1e-3 * np.abs(outs[1]).max())


def test_layernorm_over_two_axes_and_a_used_statistic():
    """axis=-2 and axis=1 (of three) normalise the last two axes; a node whose Mean output is read
    elsewhere is left as is."""
    from onnx import TensorProto, helper, numpy_helper
    from spdy_onnx.passes.decompose import decompose_layernorm
    g = numpy_helper.from_array(np.full((4, 6), 1.5, np.float32), "g")
    nodes = [helper.make_node("LayerNormalization", ["x", "g"], ["a0"], name="two_axes", axis=-2),
             helper.make_node("LayerNormalization", ["a0", "g"], ["a"], name="positive_axis", axis=1),
             helper.make_node("LayerNormalization", ["a", "g"], ["b", "mean"], name="stats", axis=-2),
             helper.make_node("Add", ["b", "mean"], ["y"], name="use_mean")]
    graph_ = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [g])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, count = decompose_layernorm(model)
    assert count == 2 and [n.name for n in out.graph.node if n.op_type == "LayerNormalization"] == ["stats"]
    x = np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(model, x), rtol=1e-4, atol=1e-4)
