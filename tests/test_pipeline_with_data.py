"""optimize with calibration data, on a replayed table (deterministic) and on DeepSparse."""
from types import SimpleNamespace

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import tiny

from spdy_onnx import api, graph
from spdy_onnx.cli import main
from spdy_onnx.tables import LatencyTable

LEVELS = [0.0, 0.5, 0.7, 0.9]


@pytest.fixture
def setup(tmp_path):
    model = tiny.mlp(width=64, depth=4, seq=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((24, 8, 64)).astype(np.float32))
    sites, _ = graph.find_sites(model)
    table = LatencyTable(levels=LEVELS, times={s.name: [1.0, 0.7, 0.45, 0.2] for s in sites},
                         dense_total_ms=4.5, runtime="table", meta={"cores": 1})
    table_path = table.save(tmp_path / "table.json")
    return path, data, table_path


def run(path, data, table_path, out, **kw):
    args = dict(target=2.0, runtime="table", latency_table=table_path, output=out, data=data, progress=False,
                cache_dir=out.parent / "cache", search_budget="150")
    args.update(kw)
    return api.optimize(path, **args)


def test_strategies_share_table_and_spdy_is_best_on_calibration_loss(setup, tmp_path):
    path, data, table_path = setup
    losses = {}
    for strategy in ("spdy", "uniform", "global-magnitude", "dp-loss", "magnitude-dp"):
        rep = run(path, data, table_path, tmp_path / f"{strategy}.onnx", strategy=strategy)
        assert rep["predicted_speedup"] >= 2.0 - 1e-9
        assert rep["status"] == "not_measured"
        losses[strategy] = rep["quality"]["calibration_loss"]
    assert losses["spdy"] <= min(losses.values()) + 1e-12


def test_reproducible_byte_identical(setup, tmp_path):
    path, data, table_path = setup
    a = run(path, data, table_path, tmp_path / "a.onnx", seed=3)
    b = run(path, data, table_path, tmp_path / "b.onnx", seed=3, cache_dir=tmp_path / "other-cache")
    assert [s["sparsity"] for s in a["sites"]] == [s["sparsity"] for s in b["sites"]]
    wa = {t.name: t.raw_data for t in onnx.load(tmp_path / "a.onnx").graph.initializer}
    wb = {t.name: t.raw_data for t in onnx.load(tmp_path / "b.onnx").graph.initializer}
    assert wa == wb


def test_database_is_cached_and_damage_is_rebuilt(setup, tmp_path, caplog):
    path, data, table_path = setup
    run(path, data, table_path, tmp_path / "a.onnx")
    files = sorted((tmp_path / "cache" / "databases").glob("*/*.npy"))
    assert len(files) == 4
    files[0].write_bytes(b"\x93NUMPY garbage")
    with caplog.at_level("INFO", logger="spdy_onnx"):
        run(path, data, table_path, tmp_path / "b.onnx")
    assert "building the obs database for 1 sites" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="spdy_onnx"):
        run(path, data, table_path, tmp_path / "c.onnx")
    assert "database from cache" in caplog.text


def test_obs_beats_magnitude_reconstruction_on_calibration_loss(setup, tmp_path):
    path, data, table_path = setup
    obs = run(path, data, table_path, tmp_path / "o.onnx", strategy="uniform", reconstruct="obs")
    mag = run(path, data, table_path, tmp_path / "mag.onnx", strategy="uniform", reconstruct="magnitude")
    assert obs["quality"]["calibration_loss"] < mag["quality"]["calibration_loss"]


def test_the_python_api_takes_arrays_and_is_exported_by_the_package(setup, tmp_path):
    """`spdy_onnx.optimize(..., data={"x": array})`: a raw TypeError before; and `spdy_onnx` did not
    export optimize at all."""
    import spdy_onnx
    path, data, table_path = setup
    arrays = dict(np.load(data))
    by_array = spdy_onnx.optimize(path, target=2.0, runtime="table", latency_table=table_path, data=arrays,
                                  output=tmp_path / "a.onnx", progress=False, cache_dir=tmp_path / "c",
                                  search_budget="40", seed=2)
    by_file = run(path, data, table_path, tmp_path / "b.onnx", search_budget="40", seed=2)
    assert by_array["quality"]["calibration_loss"] == pytest.approx(by_file["quality"]["calibration_loss"])
    with pytest.raises(spdy_onnx.SpdyError, match="lacks model input"):
        spdy_onnx.optimize(path, target=2.0, runtime="table", latency_table=table_path, output=tmp_path / "c.onnx",
                           data={"y": arrays["x"]}, progress=False, cache_dir=tmp_path / "c")
    assert spdy_onnx.profile is api.profile and spdy_onnx.benchmark is api.benchmark
    assert {"optimize", "profile", "benchmark"} <= set(dir(spdy_onnx))
    with pytest.raises(spdy_onnx.SpdyError, match="must be an .npz file, a folder of them, or"):
        spdy_onnx.optimize(path, target=2.0, runtime="table", latency_table=table_path, output=tmp_path / "d.onnx",
                           data=[("x", arrays["x"])], progress=False, cache_dir=tmp_path / "c")
    with pytest.raises(spdy_onnx.SpdyError, match=r"input 'x' \(given as arrays\) is empty"):
        spdy_onnx.optimize(path, target=2.0, runtime="table", latency_table=table_path, output=tmp_path / "e.onnx",
                           data={"x": arrays["x"][:0]}, progress=False, cache_dir=tmp_path / "c")


def test_samples_saved_with_a_batch_axis_of_one_are_taken_in_one_npz_as_in_a_folder(setup, tmp_path):
    """A folder's per-sample files may keep their batch axis of 1; one .npz of (N, 1, ...) was refused."""
    from spdy_onnx import calibrate
    path, data, table_path = setup
    x = np.load(data)["x"]
    np.savez(tmp_path / "axis.npz", x=x[:, None])
    specs = {"x": ((1,) + x.shape[1:], np.dtype(np.float32))}
    np.testing.assert_array_equal(calibrate.load_data(tmp_path / "axis.npz", specs)["x"], x)


def test_bad_calibration_data_writes_nothing(setup, tmp_path, capsys):
    path, data, table_path = setup
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=np.zeros((4, 8), np.int64))
    out = tmp_path / "x.onnx"
    code = main(["optimize", str(path), "--target", "2x", "--runtime", "table", "--latency-table", str(table_path),
                 "--data", str(bad), "-o", str(out), "-q"])
    assert code == 2
    assert "lacks model input" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "x.report.json").exists()


def test_ids_past_the_embedding_are_an_error_before_any_work(tmp_path, capsys):
    """Token ids from another tokenizer: onnxruntime failed on them only when calibration began, after
    profiling, and only on the batch that held one. Every id is checked against the table it indexes."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((50, 64)).astype(np.float32), "embedding"),
             numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")]
    nodes = [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
             helper.make_node("Gather", ["embedding", "ids64"], ["tok"], name="embed"),
             helper.make_node("MatMul", ["tok", "w"], ["out"], name="proj")]
    g = helper.make_graph(nodes, "ids", [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 64])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "ids.onnx"
    onnx.save(model, path)
    table = LatencyTable(levels=LEVELS, times={"proj": [1.0, 0.7, 0.45, 0.2]}, dense_total_ms=1.5,
                         runtime="table", meta={"cores": 1})
    table_path = table.save(tmp_path / "table.json")
    ids = rng.integers(0, 50, (16, 8)).astype(np.int32)
    base = ["optimize", str(path), "--target", "1.3x", "--runtime", "table", "--latency-table", str(table_path),
            "-q", "--cache-dir", str(tmp_path / "c"), "--search-budget", "20", "--min-weights", "0"]
    for bad_value in (50, -51):
        bad_ids = ids.copy()
        bad_ids[11, 3] = bad_value
        np.savez(tmp_path / "bad.npz", ids=bad_ids)
        out = tmp_path / "x.onnx"
        assert main(base + ["--data", str(tmp_path / "bad.npz"), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert "input 'ids' has values from" in err and "table of 50 rows (Gather 'embed')" in err
        assert not out.exists() and not (tmp_path / "c").exists()
    # timing and the engine check feed ids drawn over the table: all ones was the RoBERTa family's
    # padding token, whose outputs are identically zero
    from spdy_onnx import modelio
    example = modelio.example_inputs({"ids": ((1, 8), np.dtype(np.int32))}, rows=modelio.index_rows(model))["ids"]
    assert example.dtype == np.int32 and 0 <= example.min() and example.max() < 50 and len(set(example.ravel())) > 1
    assert (modelio.example_inputs({"mask": ((1, 8), np.dtype(np.int64))}, rows=modelio.index_rows(model))["mask"]
            == 1).all()
    ids[0, 0] = -1                      # counts from the end, as onnxruntime allows
    np.savez(tmp_path / "good.npz", ids=ids)
    assert main(base + ["--data", str(tmp_path / "good.npz"), "-o", str(tmp_path / "y.onnx")]) == 0


def _dynamic_batch_setup(tmp_path, seq):
    """A two-layer MLP with a dynamic batch axis (and `seq` tokens, a number or a dynamic name), 16
    calibration samples of 8 tokens, and a replayed table."""
    model = tiny.mlp(width=64, depth=2, seq=seq, batch="batch")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 8, 64)).astype(np.float32))
    sites, _ = graph.find_sites(model)
    table = LatencyTable(levels=LEVELS, times={s.name: [1.0, 0.7, 0.45, 0.2] for s in sites},
                         dense_total_ms=2.5, runtime="table", meta={"cores": 1})
    return path, data, table.save(tmp_path / "table.json")


def test_samples_under_the_batch_size_is_an_error_not_a_traceback(tmp_path, capsys):
    """The file has enough samples for -b 4; --samples 2 leaves fewer than one batch."""
    path, data, table_path = _dynamic_batch_setup(tmp_path, seq=8)
    out = tmp_path / "x.onnx"
    code = main(["optimize", str(path), "--target", "1.5x", "--runtime", "table", "--latency-table", str(table_path),
                 "--data", str(data), "--samples", "2", "-b", "4", "-o", str(out), "-q"])
    assert code == 2
    assert "--samples 2 is fewer than the batch size 4" in capsys.readouterr().err
    assert not out.exists()


def test_a_model_exported_at_a_fixed_batch_runs_at_it_unless_told_otherwise(tmp_path, caplog):
    """Inputs fixed at batch 4 were profiled and calibrated at batch 1 without a word, and a model
    exported at batch 64 was refused because sparsity did not pay at batch 1."""
    model = tiny.mlp(width=64, depth=2, seq=8, batch=4)
    path = tmp_path / "b4.onnx"
    onnx.save(model, path)
    sites, _ = graph.find_sites(model)
    table = LatencyTable(levels=LEVELS, times={s.name: [1.0, 0.7, 0.45, 0.2] for s in sites},
                         dense_total_ms=2.5, runtime="table", meta={"cores": 1})
    table_path = table.save(tmp_path / "table.json")
    kw = dict(target=1.5, runtime="table", latency_table=table_path, progress=False, cache_dir=tmp_path / "c")
    assert api.optimize(path, output=tmp_path / "a.onnx", **kw)["batch_size"] == 4
    # another batch is what the user asked for (DeepSparse runs the file at any batch), said out loud
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        assert api.optimize(path, output=tmp_path / "b.onnx", batch_size=8, **kw)["batch_size"] == 8
    assert "inputs fix the batch at 4; this run optimises for batch 8" in caplog.text


def test_dynamic_dimensions_come_from_the_calibration_data(tmp_path):
    """A model with a dynamic sequence axis and --data but no --input-shape: the data's shapes are the
    shapes to optimise for, instead of an error asking for what the data already says."""
    path, data, table_path = _dynamic_batch_setup(tmp_path, seq="seq")
    rep = run(path, data, table_path, tmp_path / "o.onnx", target=1.5, batch_size=2)
    assert rep["input_shapes"] == {"x": [2, 8, 64]}
    with pytest.raises(api.SpdyError, match=r"--input-shape x:1xNx64 .*or give calibration data"):
        run(path, None, table_path, tmp_path / "p.onnx", target=1.5)


def test_a_latency_table_of_another_batch_or_shape_is_refused(tmp_path, capsys):
    """A table profiled at batch 1 says nothing about batch 4: it was used silently, and the report
    showed batch-1 times as this run's."""
    model = tiny.mlp(width=64, depth=2, seq="seq", batch="batch")
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    sites, _ = graph.find_sites(model)
    table = LatencyTable(levels=LEVELS, times={s.name: [1.0, 0.7, 0.45, 0.2] for s in sites},
                         dense_total_ms=2.5, runtime="table",
                         meta={"cores": 1, "batch_size": 1, "input_shapes": {"x": [1, 8, 64]}})
    table_path = table.save(tmp_path / "table.json")
    base = ["optimize", str(path), "--target", "1.5x", "--runtime", "table", "--latency-table", str(table_path),
            "-o", str(tmp_path / "x.onnx"), "-q"]
    assert main(base + ["-b", "4", "--input-shape", "x:1x8x64"]) == 2
    assert "measured at batch 1, this run is at batch 4" in capsys.readouterr().err
    assert main(base + ["--input-shape", "x:1x16x64"]) == 2
    assert "input shapes" in capsys.readouterr().err
    assert main(base + ["--input-shape", "x:1x8x64"]) == 0


def test_data_for_an_input_with_a_default_is_named_as_unused(caplog):
    """An optional input (a graph input with an initializer default, like token_type_ids) is not fed:
    arrays the user gave for it are ignored with a warning, not called 'not model inputs'."""
    from spdy_onnx import calibrate, modelio
    model = tiny.mlp(width=16, depth=1, seq=2)
    extra = onnx.numpy_helper.from_array(np.zeros((1, 2), np.int64), "segment")
    model.graph.initializer.append(extra)
    model.graph.input.append(onnx.helper.make_tensor_value_info("segment", onnx.TensorProto.INT64, [1, 2]))
    specs = modelio.input_specs(model, 1)
    assert list(specs) == ["x"]
    data = {"x": np.zeros((3, 2, 16), np.float32), "segment": np.ones((3, 2), np.int64)}
    with caplog.at_level("INFO", logger="spdy_onnx"):
        calibrate.check_data(data, specs, defaults=modelio.inputs_with_defaults(model))
    assert "segment is a graph input(s) with a default value" in caplog.text
    assert "not model inputs" not in caplog.text


def test_without_data_warns_loudly(setup, tmp_path, caplog):
    path, _, table_path = setup
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        rep = api.optimize(path, target=2.0, runtime="table", latency_table=table_path,
                           output=tmp_path / "n.onnx", progress=False)
    assert "NO CALIBRATION DATA" in caplog.text and rep["predicted_speedup"] >= 2.0 - 1e-9
    assert rep["warnings"][0].startswith("NO CALIBRATION DATA")          # the report keeps it too
    # every strategy, not only spdy; and options that only steer calibration are named as ignored
    caplog.clear()
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        rep = api.optimize(path, target=2.0, runtime="table", latency_table=table_path, strategy="uniform",
                           output=tmp_path / "u.onnx", progress=False, refit=True, loss="kl", eval_samples=4)
    assert "NO CALIBRATION DATA" in caplog.text and rep["warnings"][0].startswith("NO CALIBRATION DATA")
    assert "--loss, --eval-samples, --refit only apply with calibration data (--data): ignored" in caplog.text


@pytest.mark.deepsparse
def test_deepsparse_with_data(tmp_path):
    pytest.importorskip("deepsparse")
    model = tiny.mlp(width=512, depth=3, seq=64)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 64, 512)).astype(np.float32))
    try:
        rep = api.optimize(path, target=1.4, cores=1, levels="0.5,0.7,0.9", output=tmp_path / "o.onnx", data=data,
                           cache_dir=tmp_path / "c", progress=False, search_budget="60", margin=-0.05,
                           runtime_options={"repeats": 1, "rounds": 5})
    except (api.TargetMissed, api.InfeasibleTarget) as exc:   # measured short on a busy machine
        assert exc.measured is not None and not (tmp_path / "o.onnx").exists()
        pytest.skip(f"machine too noisy here: {exc}")
    assert rep["status"] == "met" and rep["quality"]["loss"] == "mse"
    assert rep["measured_speedup"] >= 1.4 * 0.95


def test_sequential_refit_lowers_the_loss_and_keeps_the_masks(setup, tmp_path):
    path, data, table_path = setup
    plain = run(path, data, table_path, tmp_path / "plain.onnx", strategy="uniform", correct_epochs=0)
    fixed = run(path, data, table_path, tmp_path / "fixed.onnx", strategy="uniform", refit=True, correct_epochs=0)
    assert fixed["quality"]["calibration_loss"] < plain["quality"]["calibration_loss"]
    assert fixed["quality"]["calibration_loss_before_correction"] == pytest.approx(plain["quality"]["calibration_loss"])
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "plain.onnx").graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "fixed.onnx").graph.initializer}
    changed = 0
    for name in a:
        if name.startswith("w"):
            np.testing.assert_array_equal(a[name] == 0, b[name] == 0)     # same masks: same speed
            changed += not np.array_equal(a[name], b[name])
    assert changed >= 2   # later sites see the pruned model's inputs and are corrected


def test_search_from_measured_loss_curves_is_never_worse_than_dp_loss(setup, tmp_path):
    """With each site's measured loss curve as the error shape, c = 1 is dp-loss's own profile: the
    search starts there and keeps it unless it finds a lower calibration loss."""
    path, data, table_path = setup
    kw = dict(correct_epochs=0)
    dp = run(path, data, table_path, tmp_path / "dp.onnx", strategy="dp-loss", **kw)
    spdy = run(path, data, table_path, tmp_path / "s.onnx", strategy="spdy", search_prior="losses",
               search_budget="20", **kw)
    assert spdy["quality"]["search_prior"]["kind"] == "losses"
    assert spdy["quality"]["calibration_loss"] <= dp["quality"]["calibration_loss"] + 1e-12
    shape = run(path, data, table_path, tmp_path / "q.onnx", strategy="spdy", search_prior="shape", **kw)
    assert shape["quality"]["search_prior"]["kind"] == "shape"
    with pytest.raises(api.SpdyError, match="search-prior"):
        run(path, data, table_path, tmp_path / "x.onnx", search_prior="bogus")


def test_auto_prior_measures_the_curves_it_can_afford(setup, tmp_path):
    """auto (the default): every level when the curves fit 3/4 of the budget, evenly spaced levels with
    the sparsest when only some do, the quadratic shape when too few do."""
    path, data, table_path = setup
    kw = dict(correct_epochs=0, strategy="spdy")
    n_sites = len(graph.find_sites(onnx.load(path))[0])
    roomy = run(path, data, table_path, tmp_path / "a.onnx", search_budget=None, **kw)["quality"]["search_prior"]
    assert roomy["kind"] == "losses" and roomy["levels_measured"] == [1, 2, 3]
    # curves already in the evaluation journal cost nothing, so a tight budget still uses them
    cached = run(path, data, table_path, tmp_path / "b.onnx", search_budget=str(2 * n_sites), **kw)
    assert cached["quality"]["search_prior"]["kind"] == "losses"
    # cold: 1 sparse level per site fits in 3/4 of 2 evaluations per site, under the minimum of 2
    tight = run(path, data, table_path, tmp_path / "c.onnx", search_budget=str(2 * n_sites),
                cache_dir=tmp_path / "cold-1", **kw)["quality"]["search_prior"]
    assert tight["kind"] == "shape" and tight["affordable_levels_per_site"] == 1
    timed_out = run(path, data, table_path, tmp_path / "d.onnx", search_budget="0.001s",
                    cache_dir=tmp_path / "cold-2", **kw)["quality"]["search_prior"]
    assert timed_out["kind"] == "shape" and timed_out["seconds_per_evaluation"] > 0


def _siamese(width=64, seq=8):
    """Two inputs through one tower weight (w_tower, read by two MatMuls), summed, then a head of its own."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), n)
             for n in ("w_tower", "w_head")]
    nodes = [helper.make_node("MatMul", ["a", "w_tower"], ["ha"], name="tower_a"),
             helper.make_node("MatMul", ["b", "w_tower"], ["hb"], name="tower_b"),
             helper.make_node("Relu", ["ha"], ["ra"]), helper.make_node("Relu", ["hb"], ["rb"]),
             helper.make_node("Add", ["ra", "rb"], ["h"]),
             helper.make_node("MatMul", ["h", "w_head"], ["y"], name="head")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, seq, width]) for n in ("a", "b")]
    g = helper.make_graph(nodes, "siamese", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, width])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _siamese_files(tmp_path, *, seed, width=64, seq=8, samples=16, b_scale=1.0):
    """(model, its file, calibration .npz of `samples` pairs) for _siamese."""
    model = _siamese(width=width, seq=seq)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(seed)
    data = tmp_path / "calib.npz"
    np.savez(data, a=rng.standard_normal((samples, seq, width)).astype(np.float32),
             b=(b_scale * rng.standard_normal((samples, seq, width))).astype(np.float32))
    return model, path, data


def test_a_shared_tower_weight_is_pruned_once_at_one_level_by_every_strategy(tmp_path):
    """Both nodes of a siamese tower read one weight: every strategy gives them one level, the file holds
    one pruned array, the OBS reconstruction serves both towers (the sum of their Hessians), and the
    global correction tunes it as one parameter."""
    from spdy_onnx.reconstruct import _shared_hessians
    model, path, data = _siamese_files(tmp_path, seed=0, b_scale=3.0)
    sites, _ = graph.find_sites(model)
    assert [s.name for s in sites] == ["tower_a", "tower_b", "head"]
    table = LatencyTable(levels=LEVELS, times={s.name: [1.0, 0.7, 0.45, 0.2] for s in sites},
                         dense_total_ms=3.5, runtime="table", meta={"cores": 1})
    table_path = table.save(tmp_path / "table.json")
    for strategy in ("spdy", "uniform", "global-magnitude", "dp-loss"):
        rep = run(path, data, table_path, tmp_path / f"{strategy}.onnx", strategy=strategy, target=1.6,
                  min_weights=0, correct_epochs=1)
        levels = {s["name"]: s["sparsity"] for s in rep["sites"]}
        assert levels["tower_a"] == levels["tower_b"], strategy
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / f"{strategy}.onnx").graph.initializer}
        assert set(inits) == {"w_tower", "w_head"}
        assert float(np.mean(inits["w_tower"] == 0)) == pytest.approx(levels["tower_a"], abs=0.02)
        # the correction tunes the shared weight as one parameter, with the head: two weights
        assert rep["quality"]["global_correction"]["tuned_sites"] == 2
        assert rep["weighted_mean_sparsity"] == pytest.approx((levels["tower_a"] + levels["head"]) / 2)   # w once
    h = {"tower_a": np.eye(2), "tower_b": 2 * np.eye(2), "head": np.ones((2, 2))}
    shared = _shared_hessians(h, sites)
    np.testing.assert_array_equal(shared["tower_a"], 3 * np.eye(2))
    np.testing.assert_array_equal(shared["tower_b"], 3 * np.eye(2))
    np.testing.assert_array_equal(shared["head"], np.ones((2, 2)))
    assert "tower_b" not in _shared_hessians({"tower_a": np.eye(2), "head": np.eye(2)}, sites)


def test_a_node_the_engine_does_not_time_rides_along_with_the_twin_that_shares_its_weight(tmp_path):
    """DeBERTa applies its key projection to the relative positions too, and the engine times that node
    inside another layer. Its weight is pruned with the timed twin's, so it is kept, with no time of its
    own, at the twin's level, and reported as shared, not fused; a table saved later keeps no row for it."""
    model, path, data = _siamese_files(tmp_path, seed=2)
    table = LatencyTable(levels=LEVELS, times={n: [1.0, 0.7, 0.45, 0.2] for n in ("tower_a", "head")},
                         dense_total_ms=3.0, runtime="table", meta={"cores": 1})
    table_path = table.save(tmp_path / "table.json")
    rep = run(path, data, table_path, tmp_path / "o.onnx", strategy="spdy", target=1.6, min_weights=0,
              correct_epochs=0)
    levels = {s["name"]: s for s in rep["sites"]}
    assert levels["tower_b"]["sparsity"] == levels["tower_a"]["sparsity"] > 0
    assert "excluded" not in levels["tower_b"] and levels["tower_b"]["dense_ms"] == 0
    assert rep["shared_weight_groups"] == [["tower_a", "tower_b"]] and rep["fused_groups"] == []
    replay = LatencyTable.load(table_path)
    sites = graph.find_sites(model)[0]
    prep = SimpleNamespace(sites=sites, excluded={})
    assert [s.name for s in api._restrict_to_table(prep, replay)] == ["tower_a", "tower_b", "head"]
    assert "tower_b" not in replay.to_json()["times"] and replay.tied_groups(["tower_a", "tower_b"]) == [[0, 1]]


def test_deepsparse_runs_a_file_whose_shared_weight_was_pruned(tmp_path):
    """The engine compiles and checks the written file (its outputs against onnxruntime's)."""
    pytest.importorskip("deepsparse")
    _, path, data = _siamese_files(tmp_path, seed=1, width=512, seq=64, samples=8)
    try:
        rep = api.optimize(path, target=1.3, cores=1, levels="0.7,0.9", output=tmp_path / "o.onnx", data=data,
                           cache_dir=tmp_path / "c", progress=False, search_budget="30", margin=-0.05,
                           correct_epochs=0, runtime_options={"repeats": 1, "rounds": 5})
    except (api.TargetMissed, api.InfeasibleTarget) as exc:   # measured short on a busy machine
        assert exc.measured is not None and not (tmp_path / "o.onnx").exists()
        pytest.skip(f"machine too noisy here: {exc}")
    levels = {s["name"]: s["sparsity"] for s in rep["sites"]}
    assert levels["tower_a"] == levels["tower_b"]
    check = rep["engine_outputs"]
    assert check["checked"] and check["pruned"]["finite"] and check["pruned"]["max_rel_error"] < check["tolerance"]
