"""Every bad input: non-zero exit, one clear line on stderr, and nothing written."""
import os

import numpy as np
import onnx
import pytest
import tiny
from onnx import TensorProto, helper

from spdy_onnx.cli import main
from spdy_onnx.runtimes import REGISTRY
from spdy_onnx.tables import LatencyTable


def snapshot(folder):
    return sorted(p.name for p in folder.iterdir())


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("spdy-onnx: error")]


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(tiny.mlp(width=64, depth=2, seq=4), path)
    return path


def expect_error(capsys, folder, *argv, match):
    before = snapshot(folder)
    code, errors = run_cli(capsys, *argv)
    assert code != 0
    assert len(errors) == 1, errors
    assert match in errors[0], errors[0]
    assert snapshot(folder) == before
    return errors[0]


def test_missing_file(tmp_path, capsys):
    expect_error(capsys, tmp_path, "optimize", str(tmp_path / "nope.onnx"), "--target", "2x", match="no such file")


def test_directory_instead_of_file(tmp_path, capsys):
    (tmp_path / "d.onnx").mkdir()
    expect_error(capsys, tmp_path, "optimize", str(tmp_path / "d.onnx"), "--target", "2x", match="not a file")


def test_not_onnx(tmp_path, capsys):
    p = tmp_path / "junk.onnx"
    p.write_bytes(os.urandom(4096))
    expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match="not a valid ONNX")


def test_text_file(tmp_path, capsys):
    p = tmp_path / "readme.onnx"
    p.write_text("hello, I am not a model\n")
    expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match="not a valid ONNX")


def test_truncated(tmp_path, capsys, mlp_path):
    data = mlp_path.read_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match="not a valid ONNX")


def test_no_prunable_site(tmp_path, capsys):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    p = tmp_path / "relu.onnx"
    onnx.save(m, p)
    expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match="no prunable site")


def _save(tmp_path, name, nodes, inits):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    p = tmp_path / name
    onnx.save(m, p)
    return p


def test_a_quantized_model_is_named_as_such(tmp_path, capsys):
    """An int8 QDQ model has no float weight to prune: the error says it is quantized and what to do,
    and so does `sites`, instead of only "no prunable site"."""
    from onnx import numpy_helper
    w = numpy_helper.from_array(np.ones((16, 16), np.int8), "w_q")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    p = _save(tmp_path, "qdq.onnx", [helper.make_node("DequantizeLinear", ["w_q", "scale", "zero"], ["w"]),
                                     helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [w, scale, zero])
    err = expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match="it is quantized")
    assert "DequantizeLinear" in err and "prune the float model first" in err
    assert main(["sites", str(p)]) == 0
    assert "it is quantized (DequantizeLinear)" in capsys.readouterr().out


def test_a_float16_model_is_refused_for_deepsparse_with_the_reason(tmp_path, capsys):
    """DeepSparse 1.8 runs float32 graphs: a model exported in float16 failed with the engine's
    "<unsupported ONNX type 10>"."""
    from onnx import numpy_helper
    w = numpy_helper.from_array(np.ones((16, 16), np.float16), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 16])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    p = tmp_path / "half.onnx"
    onnx.save(m, p)
    err = expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", "--min-weights", "0",
                       match="runs float32 models: input/output 'x', 'y' are float16")
    assert "Export the model in float32" in err


def test_no_prunable_site_gives_the_reasons(tmp_path, capsys):
    """Every constant-weight node left dense: the error says why, not only that nothing is prunable."""
    from onnx import numpy_helper
    w = numpy_helper.from_array(np.ones((16, 16), np.float32), "w_shared")
    p = _save(tmp_path, "shared.onnx", [helper.make_node("MatMul", ["x", "w_shared"], ["h"], name="first"),
                                        helper.make_node("Gemm", ["h", "w_shared"], ["y"], name="second")], [w])
    err = expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match="no prunable site")
    assert "first: weight 'w_shared' is shared by several nodes" in err


@pytest.mark.parametrize("target", ["abc", "1", "1x", "0.5x", "-2", "nan", "inf"])
def test_bad_target(tmp_path, capsys, mlp_path, target):
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", target, match="target")


def test_output_equal_to_input_refused(tmp_path, capsys, mlp_path):
    before = mlp_path.read_bytes()
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "-o", str(mlp_path),
                 match="refusing to overwrite")
    assert mlp_path.read_bytes() == before


def test_engine_not_installed(tmp_path, capsys, mlp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "deepsparse", ("spdy_onnx_missing_engine_module", "X", "pip install 'spdy-onnx[deepsparse]'"))
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", match="pip install")


def test_unknown_runtime(tmp_path, capsys, mlp_path):
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "--runtime", "tpu",
                 match="unknown runtime")


def test_dynamic_dims_need_input_shape(tmp_path, capsys):
    m = tiny.mlp(width=64, depth=2, seq="seq", batch="batch")
    p = tmp_path / "dyn.onnx"
    onnx.save(m, p)
    msg = expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match="dynamic dimensions")
    assert "--input-shape x:" in msg


def _two_dynamic_inputs():
    g = helper.make_graph([helper.make_node("Add", ["ids", "mask"], ["y"])], "g",
                          [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("ids", "mask")],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "seq"])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_every_dynamic_input_is_named_in_one_error():
    from spdy_onnx import modelio
    from spdy_onnx.errors import SpdyError
    with pytest.raises(SpdyError) as err:
        modelio.input_specs(_two_dynamic_inputs(), 1)
    assert "--input-shape ids:1xN --input-shape mask:1xN" in str(err.value)
    specs = modelio.input_specs(_two_dynamic_inputs(), 4, {"ids": (1, 32), "mask": (4, 32)})
    assert {n: s for n, (s, _) in specs.items()} == {"ids": (4, 32), "mask": (4, 32)}


def test_a_scalar_input_cannot_run_at_a_larger_batch():
    """A diffusion-style timestep declared rank 0 has no batch axis: -b 8 failed inside the engine."""
    from spdy_onnx import modelio
    from spdy_onnx.errors import SpdyError
    g = helper.make_graph([helper.make_node("Mul", ["x", "t"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                           helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    m = helper.make_model(g)
    assert modelio.input_specs(m, 1)["t"][0] == ()
    with pytest.raises(SpdyError, match="'t' is a scalar .* use -b 1"):
        modelio.input_specs(m, 8)


def test_a_batch_in_input_shape_that_is_not_the_batch_size_is_refused():
    """input_ids:4x64 without -b 4 used to run at batch 1 without a word."""
    from spdy_onnx import modelio
    from spdy_onnx.errors import SpdyError
    with pytest.raises(SpdyError, match="pass -b 4"):
        modelio.input_specs(_two_dynamic_inputs(), 1, {"ids": (4, 32), "mask": (4, 32)})
    with pytest.raises(SpdyError, match=r"unknown input\(s\): ids:1x32,mask.*one --input-shape"):
        modelio.input_specs(_two_dynamic_inputs(), 1, {"ids:1x32,mask": (1, 32)})


def test_bad_input_shape_spec(tmp_path, capsys, mlp_path):
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "--input-shape", "x:1xq",
                 match="bad --input-shape")
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "--input-shape", "zz:1x4x64",
                 match="unknown input")


def test_an_op_of_an_opset_newer_than_onnx_knows_is_blamed_on_the_opset(tmp_path, capsys):
    """RMSNormalization exists from opset 23: the pinned onnx knows opsets up to 19, and the error names
    the op, its opset, and how to re-export, not only 'No Op registered' (Gelu, new in 20, is rewritten:
    tests/test_newer_exports.py)."""
    scale = helper.make_tensor("s", TensorProto.FLOAT, [4], [1.0] * 4)
    g = helper.make_graph([helper.make_node("RMSNormalization", ["x", "s"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [scale])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 8
    p = tmp_path / "rms.onnx"
    p.write_bytes(m.SerializeToString())
    err = expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match="RMSNormalization (new in opset 23)")
    assert "re-export it with opset 19 or older" in err


def test_ir_version_past_the_known_ones(tmp_path, capsys):
    from spdy_onnx.modelio import NEWEST_KNOWN_IR
    m = tiny.mlp(width=64, depth=2, seq=4)
    m.ir_version = NEWEST_KNOWN_IR + 1     # 10 up to NEWEST_KNOWN_IR: read as 9 (test_newer_exports.py)
    p = tmp_path / "new.onnx"
    p.write_bytes(m.SerializeToString())
    expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match=f"IR version {NEWEST_KNOWN_IR + 1}")


def test_opset_19_is_read_as_18_for_deepsparse_or_refused_naming_the_op(tmp_path, capsys):
    pytest.importorskip("deepsparse")
    from spdy_onnx.api import Prepared
    m = tiny.mlp(width=64, depth=2, seq=4)
    m.opset_import[0].version = 19
    p = tmp_path / "new.onnx"
    onnx.save(m, p)
    prep = Prepared(p, runtime="deepsparse", batch_size=1, cores=1, input_shapes=None, exclude=None, include=None,
                    min_weights=0, progress=False)
    try:
        assert prep.model.opset_import[0].version == 17   # DeepSparse's native_opset: nothing changed since
    finally:
        prep.close()
    relu = next(n for n in m.graph.node if n.op_type == "Relu")   # a Cast that saturates: not the same at 18
    relu.op_type = "Cast"
    relu.attribute.extend([helper.make_attribute("to", TensorProto.FLOAT), helper.make_attribute("saturate", 0)])
    onnx.save(m, p)
    msg = expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match="DeepSparse 1.8.0 reads opsets up to 18")
    assert "Cast (changed in opset 19)" in msg


def test_fails_checker(tmp_path, capsys):
    m = tiny.mlp(width=64, depth=2, seq=4)
    m.graph.node[0].input[1] = "does_not_exist"
    p = tmp_path / "broken.onnx"
    onnx.save(m, p)
    expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", match="onnx.checker")


def test_bad_latency_table(tmp_path, capsys, mlp_path):
    t = tmp_path / "t.json"
    t.write_text("{not json")
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "--runtime", "table",
                 "--latency-table", str(t), match="latency table")


@pytest.mark.parametrize("flag,value,match", [("--eval-samples", "0", "--eval-samples must be >= 1"),
                                              ("--margin", "0.5", "--margin must be over -0.5 and under 0.5"),
                                              ("--max-attempts", "0", "max attempts must be >= 1"),
                                              ("--seed", "-1", "--seed must be between 0 and 2**63 - 1"),
                                              ("--seed", str(2 ** 64), "--seed must be between 0")])
def test_bad_numeric_options(tmp_path, capsys, mlp_path, flag, value, match):
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", flag, value, match=match)


def test_output_cut_short_by_the_reader_is_not_a_traceback(tmp_path):
    """`spdy-onnx sites model.onnx | head`: the pipe closes under a long listing."""
    import subprocess
    import sys
    path = tmp_path / "deep.onnx"
    onnx.save(tiny.mlp(width=8, depth=1500, seq=2), path)     # about 130 kB of listing: more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "spdy_onnx", "sites", str(path), "--min-weights", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "Exception ignored" not in err, err


def _baked_batch_model():
    """x (1, 4, 64) -> MatMul -> Reshape to a constant (1, 256): runs at batch 1 only."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], rng.standard_normal(64 * 64).astype(np.float32))
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 256])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["y"], name="flat")]
    graph_ = helper.make_graph(nodes, "baked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [w, shape])
    model = helper.make_model(graph_, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_a_batch_size_the_graph_has_baked_in_is_named(tmp_path, capsys):
    path = tmp_path / "baked.onnx"
    onnx.save(_baked_batch_model(), path)
    table = tmp_path / "t.json"
    LatencyTable(levels=[0.0, 0.5], times={"mm": [1.0, 0.5]}, dense_total_ms=1.2, runtime="table").save(table)
    err = expect_error(capsys, tmp_path, "optimize", str(path), "--target", "1.2x", "--runtime", "table",
                       "--latency-table", str(table), "--min-weights", "0", "-b", "4",
                       match="was exported at batch 1, and at --batch-size 4 onnxruntime cannot run it")
    assert "--batch-size 1" in err and "batch axis the graph follows" in err
    # a dynamic batch axis in front of the same baked Reshape: DeepSparse's compiler aborted the process
    dynamic = _baked_batch_model()
    dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(dynamic, tmp_path / "dyn.onnx")
    expect_error(capsys, tmp_path, "optimize", str(tmp_path / "dyn.onnx"), "--target", "1.2x", "--runtime", "table",
                 "--latency-table", str(table), "--min-weights", "0", "-b", "4",
                 match="has a dynamic batch axis, but at --batch-size 4 onnxruntime cannot run it")
    # at its own batch it runs
    assert main(["optimize", str(path), "--target", "1.2x", "--runtime", "table", "--latency-table", str(table),
                 "--min-weights", "0", "-q", "-o", str(tmp_path / "out" / "o.onnx")]) == 0


def test_option_values_that_were_silently_replaced_are_errors(tmp_path, capsys, mlp_path):
    expect_error(capsys, tmp_path, "benchmark", str(mlp_path), "--rounds", "2", match="--rounds must be >= 3")
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "--min-weights", "-5",
                 match="--min-weights must be >= 0")


def test_an_include_that_an_exclude_overrides_is_warned_about(caplog):
    from spdy_onnx import graph
    sites, _ = graph.find_sites(tiny.mlp(width=64, depth=2, seq=4))
    name = sites[0].name
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        chosen, excluded = graph.select_sites(sites, exclude=[name], include=[name])
    assert name in excluded and "match both --include and --exclude, and --exclude wins" in caplog.text


def test_the_output_never_replaces_another_input_file(tmp_path, capsys, mlp_path):
    """-o pointed at the calibration data replaced it with the model and exited 0."""
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.zeros((4, 4, 64), np.float32))
    before = data.read_bytes()
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "--data", str(data),
                 "-o", str(data), match="the output path is the --data file")
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "--data", str(data),
                 "--report", str(data), match="the report path is the --data file")
    assert data.read_bytes() == before


def test_checks_that_used_to_wait_for_profiling(tmp_path, capsys, mlp_path):
    """Each of these was found out only after the latency table was measured (minutes on a real model),
    or never: a level count that would profile for hours, a grid with no sparse level, a profile -o that
    cannot be written, dp-loss without data."""
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "--levels", "100000",
                 match="at most 48 levels")
    expect_error(capsys, tmp_path, "profile", str(mlp_path), "--levels", "0.0", match="at least one sparsity above 0")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    expect_error(capsys, tmp_path, "profile", str(mlp_path), "-o", str(folder), match="is a folder")
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "--strategy", "dp-loss",
                 match="needs calibration data")


def test_everything_excluded_is_refused_before_profiling(tmp_path, capsys, mlp_path, monkeypatch):
    """It used to be found out after the latency table was measured, and a table left in the cache."""
    from spdy_onnx import api

    def no_profiling(*a, **k):
        raise AssertionError("profiled")
    monkeypatch.setattr(api, "latency_table", no_profiling)
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "2x", "--exclude", ".*",
                 "--cache-dir", str(tmp_path / "c"), match="every prunable site is excluded")


def test_sites_prints_long_node_names_whole(tmp_path, capsys):
    """Exporters' names share long prefixes: cut at 48 characters, every row of a layer read the same, and
    the names are what --exclude needs."""
    from onnx import numpy_helper
    prefix = "/m/albert/encoder/albert_layer_groups.0/albert_layers.0/attention"
    inits = [numpy_helper.from_array(np.ones((16, 16), np.float32), w) for w in ("wq", "wk")]
    p = _save(tmp_path, "long.onnx", [helper.make_node("MatMul", ["x", "wq"], ["h"], name=f"{prefix}/query/MatMul"),
                                      helper.make_node("MatMul", ["h", "wk"], ["y"], name=f"{prefix}/key/MatMul")],
              inits)
    assert main(["sites", str(p), "--min-weights", "0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "prunable" in line and "MatMul" in line]
    assert len(rows) == 2 and rows[0] != rows[1]
    assert all(row.startswith("/m/albert/") for row in rows)
    assert rows[0].startswith(f"{prefix}/query/MatMul ") and rows[1].startswith(f"{prefix}/key/MatMul ")


def test_input_shapes_that_disagree_with_each_other_are_named(tmp_path, capsys):
    """Ids of 8 tokens and a mask of 6: DeepSparse failed with a shape inference error deep in the graph."""
    from onnx import numpy_helper
    w = numpy_helper.from_array(np.ones((16, 16), np.float32), "w")
    g = helper.make_graph([helper.make_node("Add", ["x", "m"], ["h"]),
                           helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 16]),
                           helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, "n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 16])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    p = tmp_path / "two.onnx"
    onnx.save(m, p)
    err = expect_error(capsys, tmp_path, "optimize", str(p), "--target", "2x", "--min-weights", "0",
                       "--input-shape", "x:1x8x16", "--input-shape", "m:1x6x16",
                       match="cannot run at the input shapes of this run (x:1x8x16 m:1x6x16;")
    assert "agree with each other" in err


def test_runtime_table_without_a_table_and_a_table_of_another_engine_are_errors(tmp_path, capsys, mlp_path):
    """`--runtime table` alone crashed with a traceback; a DeepSparse table given to the 2:4 runtime was
    used, and a file of unstructured zeros was written as if for 2:4 kernels."""
    for command in ("optimize", "profile"):
        extra = ["--target", "2x"] if command == "optimize" else []
        expect_error(capsys, tmp_path, command, str(mlp_path), *extra, "--runtime", "table",
                     match="--runtime table replays a saved latency table and measures nothing")
    from spdy_onnx import graph
    sites, _ = graph.find_sites(onnx.load(mlp_path))
    table = LatencyTable(levels=[0.0, 0.5, 0.9], times={s.name: [1.0, 0.7, 0.3] for s in sites},
                         dense_total_ms=2.5, runtime="deepsparse", meta={"cores": 1})
    table_path = table.save(tmp_path / "t.json")
    expect_error(capsys, tmp_path, "optimize", str(mlp_path), "--target", "1.3x", "--runtime", "cuda-2:4",
                 "--latency-table", str(table_path), "--min-weights", "0",
                 match="was measured on deepsparse (unstructured sparsity), this run is on cuda-2:4 (2:4)")


@pytest.mark.parametrize("cores", ["0", "-1", "4096"])
def test_cores_outside_what_the_process_may_use_is_an_error(tmp_path, capsys, mlp_path, cores):
    for command in (["optimize", str(mlp_path), "--target", "2x"], ["benchmark", str(mlp_path)]):
        expect_error(capsys, tmp_path, *command, "--cores", cores, match="--cores must be between 1 and the")


def test_an_engine_crash_is_one_line_and_leaves_nothing(tmp_path, capsys, mlp_path, monkeypatch):
    """DeepSparse segfaults compiling some graphs (a Mamba export): the run died with a register dump and
    its temporary folder. The model is first compiled and run in a child process; a crash there is an error."""
    pytest.importorskip("deepsparse")
    from spdy_onnx.runtimes.deepsparse import DeepSparseRuntime
    monkeypatch.setattr(DeepSparseRuntime, "CANARY", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    for argv in (["optimize", str(mlp_path), "--target", "2x", "--cache-dir", str(tmp_path / "c")],
                 ["benchmark", str(mlp_path)]):
        err = expect_error(capsys, tmp_path, *argv, "--cores", "1",
                           match="DeepSparse 1.8.0 crashed (SIGSEGV) compiling or running mlp.onnx")
        assert "nothing was measured or written" in err
    assert list(scratch.iterdir()) == []
