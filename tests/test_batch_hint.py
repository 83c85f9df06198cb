"""A refusal suggests a larger --batch-size only where it gives the pruned sites more rows: sites whose rows
the graph fixes (a Reshape to heads, beams or a constant count) gain nothing from it."""
import numpy as np
import onnx
import tiny
from onnx import TensorProto, helper, numpy_helper

from spdy_onnx import graph, modelio
from spdy_onnx.cli import main
from spdy_onnx.errors import InfeasibleTarget, TargetMissed
from spdy_onnx.tables import LatencyTable

LARGER_BATCH = "try a larger --batch-size"
NOT_THE_BATCH = "a larger --batch-size would not help: the graph, not the batch, fixes the rows"


def heads_model(batch_site: bool = False) -> onnx.ModelProto:
    """x (N, 8, 64) -> Reshape to a constant (8, 64): the 8 rows are heads, whatever the batch -> two MatMuls.
    `batch_site`: a MatMul on x first, whose N x 8 rows do follow the batch."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([8, 64], dtype=np.int64), "heads")]
    nodes, x = [], "x"
    if batch_site:
        inits.append(numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "wb"))
        nodes.append(helper.make_node("MatMul", ["x", "wb"], ["hb"], name="mm_batch"))
        x = "hb"
    nodes.append(helper.make_node("Reshape", [x, "heads"], ["r"], name="to_heads"))
    for i, (k, n) in enumerate([(64, 128), (128, 64)]):
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["r" if i == 0 else "a0", f"w{i}"], [f"h{i}"], name=f"mm_heads{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"], name=f"relu{i}"))
    nodes.append(helper.make_node("Identity", ["a1"], ["y"], name="output"))
    g = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _fixed(model, batch=1):
    sites, _ = graph.find_sites(model)
    return graph.fixed_rows(model, sites, modelio.input_specs(model, batch))


def test_fixed_rows_names_the_sites_whose_rows_the_graph_fixes():
    assert _fixed(heads_model()) == {"mm_heads0": 8, "mm_heads1": 8}
    assert _fixed(heads_model(batch_site=True)) == {"mm_heads0": 8, "mm_heads1": 8}   # not mm_batch
    assert _fixed(tiny.mlp(width=64, depth=2, seq=4)) == {}          # rows = batch x 4: they follow -b
    assert _fixed(tiny.cnn(channels=8, size=8, classes=10)) == {}    # rows = batch x pixels


def _no_level_pays(model, tmp_path):
    """A latency table in which no level is faster than dense (small layers at batch 1), replayed."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    sites, _ = graph.find_sites(model)
    table = tmp_path / "t.json"
    LatencyTable(levels=[0.0, 0.5, 0.9], times={s.name: [1.0, 1.3, 1.2] for s in sites},
                 dense_total_ms=len(sites) + 0.2, runtime="table", meta={"cores": 1}).save(table)
    return path, table


def _refusal(capsys, path, table, tmp_path):
    code = main(["optimize", str(path), "--target", "1.5x", "--runtime", "table", "--latency-table", str(table),
                 "--min-weights", "0", "-q", "-o", str(tmp_path / "o.onnx")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spdy-onnx: error")]
    assert code == 2 and len(errors) == 1 and not (tmp_path / "o.onnx").exists()
    return errors[0]


def test_a_refusal_at_sites_of_fixed_rows_says_a_larger_batch_does_not_help(tmp_path, capsys):
    """The heads' MatMuls multiply 8 rows at any -b: the refusal used to say 'try a larger --batch-size'."""
    err = _refusal(capsys, *_no_level_pays(heads_model(), tmp_path), tmp_path)
    assert "no sparsity level runs faster than dense" in err
    assert LARGER_BATCH not in err
    assert NOT_THE_BATCH in err and "('mm_heads0' 8, 'mm_heads1' 8 rows at any batch size)" in err


def test_a_refusal_still_suggests_a_larger_batch_where_rows_follow_it(tmp_path, capsys):
    """An ordinary MLP (rows = batch x tokens), and a model where one site's rows follow the batch."""
    for i, model in enumerate([tiny.mlp(width=64, depth=2, seq=4), heads_model(batch_site=True)]):
        folder = tmp_path / str(i)
        folder.mkdir()
        err = _refusal(capsys, *_no_level_pays(model, folder), folder)
        assert "no sparsity level runs faster than dense" in err and LARGER_BATCH in err, err
        assert NOT_THE_BATCH not in err


def test_measured_refusal_and_miss_name_fixed_rows_instead_of_the_batch():
    """The other two places that suggested a larger batch: the measured fastest profile, and a miss at -b 1."""
    rows = {"mm_heads0": 8, "mm_heads1": 8}
    for kw in ({}, {"rows_fixed": rows}):
        refused = str(InfeasibleTarget(2.0, 1.8, margin=0.02, measured=1.0, **kw))
        missed = str(TargetMissed(2.0, 1.1, 3, fastest=(1.8, 1.1), batch_size=1, **kw))
        for text in (refused, missed):
            assert (LARGER_BATCH in text) == (not kw) and (NOT_THE_BATCH in text) == bool(kw), text
    assert "'mm_heads0' 8, 'mm_heads1' 8 rows" in str(TargetMissed(2.0, 1.1, 3, fastest=(1.8, 1.1), batch_size=1,
                                                                   rows_fixed=rows))



def test_the_bound_of_a_tiny_prunable_share_is_not_rounded_to_no_speedup():
    """1.002x was printed as 'at most 1.00x faster' beside a largest speedup of 1.002x."""
    from spdy_onnx.errors import InfeasibleTarget
    assert "could run at most 1.002x faster" in str(InfeasibleTarget(1.5, 1.002, pruned_share=0.002))
    assert "could run at most 1.67x faster" in str(InfeasibleTarget(2.0, 1.5, pruned_share=0.4))
