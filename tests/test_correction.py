"""Global correction: tunes kept weights and biases together, keeps every zero, never ends worse."""
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import tiny

from spdy_onnx import api, correct, graph
from spdy_onnx.errors import SpdyError
from spdy_onnx.runtimes import REGISTRY, Comparison
from spdy_onnx.tables import LatencyTable
from test_guarantee import ScriptedRuntime

torch = pytest.importorskip("torch")

LEVELS = [0.0, 0.5, 0.7, 0.9]


def _setup(tmp_path, model, data_arrays, times=(1.0, 0.7, 0.45, 0.2)):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "calib.npz"
    np.savez(data, **data_arrays)
    sites, _ = graph.find_sites(model)
    table = LatencyTable(levels=LEVELS, times={s.name: list(times) for s in sites},
                         dense_total_ms=len(sites) + 0.5, runtime="table", meta={"cores": 1})
    return path, data, table.save(tmp_path / "table.json")


def _inits(path):
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


@pytest.fixture
def mlp_setup(tmp_path):
    rng = np.random.default_rng(0)
    return _setup(tmp_path, tiny.mlp(width=64, depth=4, seq=8),
                  {"x": rng.standard_normal((48, 8, 64)).astype(np.float32)})


def _optimize(path, data, table_path, out, **kw):
    args = dict(target=2.0, runtime="table", latency_table=table_path, output=out, data=data, progress=False,
                cache_dir=out.parent / "cache", strategy="uniform")
    args.update(kw)
    return api.optimize(path, **args)


def test_correction_lowers_the_loss_keeps_the_zeros_and_tunes_biases(mlp_setup, tmp_path):
    path, data, table_path = mlp_setup
    plain = _optimize(path, data, table_path, tmp_path / "plain.onnx", correct_epochs=0)
    tuned = _optimize(path, data, table_path, tmp_path / "tuned.onnx", correct_epochs=3)
    q = tuned["quality"]
    assert "global_correction" not in plain["quality"]
    assert q["calibration_loss_before_correction"] == pytest.approx(plain["quality"]["calibration_loss"])
    assert q["calibration_loss"] < 0.9 * plain["quality"]["calibration_loss"]
    summary = q["global_correction"]
    assert summary["loss_after"] < summary["loss_before"] and summary["best_epoch"] >= 1
    assert summary["tuned_sites"] == 4
    a, b = _inits(tmp_path / "plain.onnx"), _inits(tmp_path / "tuned.onnx")
    sites, _ = graph.find_sites(onnx.load(path))
    for s in sites:
        np.testing.assert_array_equal(a[s.weight] == 0, b[s.weight] == 0)   # same zeros: same speed
        assert not np.array_equal(a[s.weight], b[s.weight])
    biases = [n for n in a if n.startswith("b")]
    assert biases and any(not np.array_equal(a[n], b[n]) for n in biases)
    assert [s["actual_sparsity"] for s in plain["sites"]] == [s["actual_sparsity"] for s in tuned["sites"]]


def test_a_short_time_budget_tunes_on_fewer_samples(mlp_setup, tmp_path):
    path, data, table_path = mlp_setup
    full = _optimize(path, data, table_path, tmp_path / "a.onnx", correct_epochs=1)
    short = _optimize(path, data, table_path, tmp_path / "b.onnx", correct_epochs=1, correct_budget="0.001s")
    n_full = full["quality"]["global_correction"]["train_batches"]
    assert n_full == 42                           # 48 samples, 6 held back
    cut = short["quality"]["global_correction"]
    # spent before the first step: no floor of batches overruns it, and the draft's weights stay
    assert cut["train_batches"] == 1 and cut["out_of_time"] and cut["epochs"] == [] and cut["best_epoch"] == 0
    assert short["quality"]["calibration_loss"] == pytest.approx(short["quality"]["calibration_loss_before_correction"])
    assert not full["quality"]["global_correction"]["out_of_time"]
    with pytest.raises(SpdyError, match="--correct-budget"):
        _optimize(path, data, table_path, tmp_path / "c.onnx", correct_budget="soon")
    assert not (tmp_path / "c.onnx").exists()


def test_a_budget_is_checked_batch_by_batch_and_a_cut_epoch_is_judged(mlp_setup, monkeypatch):
    """Steps slower than the trial steps said (a machine that got busy): training stops once the budget
    is spent, mid-epoch, and the cut epoch is judged on the held-back samples like a whole one."""
    import time
    path, data, _ = mlp_setup
    model = onnx.load(path)
    sites, _ = graph.find_sites(model)
    w = graph.read_weights(model, sites)
    pruned = {s.weight: np.where(np.abs(w[s.name]) > np.quantile(np.abs(w[s.name]), 0.7), w[s.name], 0)
              for s in sites}

    class SlowAdam(torch.optim.Adam):
        def step(self, closure=None):
            time.sleep(0.1)
            return super().step(closure)
    correct._adam([torch.zeros(1, requires_grad=True)], 1e-3)   # what an optimizer imports: not the budget's
    monkeypatch.setattr(correct, "_adam", lambda params, lr: SlowAdam(params, lr=lr))
    monkeypatch.setattr(correct, "_samples_in_time", lambda train, *a, **k: len(train))   # "all 42 fit"
    result, summary = correct.global_correction(model, sites, pruned, dict(np.load(data)), loss="mse",
                                                batch_size=1, epochs=2, max_seconds=2.0)
    assert summary["train_batches"] == 42 and summary["out_of_time"]
    assert len(summary["epochs"]) == 1 and 1 <= summary["epochs"][0]["batches"] < 42
    assert summary["seconds"] < 2.0 + 0.1 + 0.5      # one step past the check at most, and some slack
    assert summary["best_epoch"] in (0, 1) and (result == {}) == (summary["best_epoch"] == 0)
    assert summary["loss_after"] == min(summary["loss_before"], summary["epochs"][0]["held_back_loss"])
    assert all(np.array_equal(result[k] == 0, v == 0) for k, v in pruned.items() if k in result)


def test_correction_never_ends_worse_than_its_input(mlp_setup, tmp_path):
    path, data, table_path = mlp_setup
    model = onnx.load(path)
    sites, _ = graph.find_sites(model)
    calib = dict(np.load(data))
    w = graph.read_weights(model, sites)
    pruned = {s.weight: np.where(np.abs(w[s.name]) > np.quantile(np.abs(w[s.name]), 0.7), w[s.name], 0)
              for s in sites}
    # a learning rate this large blows the weights up: the held-back loss rises, the input is kept
    result, summary = correct.global_correction(model, sites, pruned, calib, loss="mse", batch_size=1,
                                                epochs=2, lr=10.0)
    assert result == {} and summary["best_epoch"] == 0
    assert summary["loss_after"] == summary["loss_before"]
    assert all(e["held_back_loss"] > summary["loss_before"] for e in summary["epochs"])
    # a sane one improves it, and the same seed gives the same weights
    r1, s1 = correct.global_correction(model, sites, pruned, calib, loss="mse", batch_size=1, epochs=1, seed=5)
    r2, _ = correct.global_correction(model, sites, pruned, calib, loss="mse", batch_size=1, epochs=1, seed=5)
    assert s1["loss_after"] < s1["loss_before"]
    assert r1.keys() == r2.keys() and all(np.array_equal(r1[k], r2[k]) for k in r1)


def test_correction_on_a_cnn_with_kl(tmp_path):
    rng = np.random.default_rng(1)
    path, data, table_path = _setup(tmp_path, tiny.cnn(channels=16, size=8, classes=10),
                                    {"x": rng.standard_normal((24, 3, 8, 8)).astype(np.float32)})
    plain = _optimize(path, data, table_path, tmp_path / "p.onnx", correct_epochs=0, target=1.5, min_weights=0)
    tuned = _optimize(path, data, table_path, tmp_path / "t.onnx", correct_epochs=3, target=1.5, min_weights=0)
    assert tuned["quality"]["loss"] == "kl"
    assert tuned["quality"]["global_correction"]["tuned_sites"] >= 2
    assert tuned["quality"]["calibration_loss"] < plain["quality"]["calibration_loss"]
    a, b = _inits(tmp_path / "p.onnx"), _inits(tmp_path / "t.onnx")
    sites, _ = graph.find_sites(onnx.load(path))
    for s in sites:
        np.testing.assert_array_equal(a[s.weight] == 0, b[s.weight] == 0)


def _ending_in_softmax(model):
    """The same model with a Softmax after its output: probabilities, as many exported classifiers give."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0]
    m.graph.node.append(onnx.helper.make_node("Softmax", [out.name], ["probs"], name="softmax", axis=-1))
    out.name = "probs"
    return m


def test_a_softmax_output_is_scored_and_corrected_by_the_kl_of_its_probabilities(tmp_path):
    """KL of the probabilities equals KL of the logits they came from: the same model with and without a
    final Softmax gets the same calibration losses, not a softmax of probabilities that is near zero."""
    rng = np.random.default_rng(1)
    x = {"x": rng.standard_normal((24, 3, 8, 8)).astype(np.float32)}
    logits_model = tiny.cnn(channels=16, size=8, classes=10)
    runs = {}
    for name, model in (("logits", logits_model), ("probs", _ending_in_softmax(logits_model))):
        folder = tmp_path / name
        folder.mkdir()
        path, data, table_path = _setup(folder, model, x)
        runs[name] = _optimize(path, data, table_path, folder / "o.onnx", correct_epochs=3, target=1.5,
                               min_weights=0)["quality"]
    assert runs["logits"]["loss"] == "kl" and runs["probs"]["loss"] == "kl-probs"
    for key in ("calibration_loss_before_correction", "calibration_loss"):
        assert runs["probs"][key] == pytest.approx(runs["logits"][key], rel=0.05), key
    assert runs["probs"]["calibration_loss"] < runs["probs"]["calibration_loss_before_correction"]


def _ending_in_labels(model, as_float):
    """The same model with only the ArgMax of its scores as output (int64 labels, or cast to float)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0]
    m.graph.node.append(onnx.helper.make_node("ArgMax", [out.name], ["label"], axis=-1, keepdims=0))
    name, elem = "label", onnx.TensorProto.INT64
    if as_float:
        m.graph.node.append(onnx.helper.make_node("Cast", ["label"], ["label_f"], to=onnx.TensorProto.FLOAT))
        name, elem = "label_f", onnx.TensorProto.FLOAT
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, [1]))
    return m


def _ending_in_thresholds(model, constant_node):
    """The same model whose only output is sigmoid(scores) > 0.5, cast to int64: binary labels."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0]
    half = np.array(0.5, dtype=np.float32)
    if constant_node:
        m.graph.node.append(onnx.helper.make_node("Constant", [], ["half"], value=onnx.numpy_helper.from_array(half)))
    else:
        m.graph.initializer.append(onnx.numpy_helper.from_array(half, "half"))
    m.graph.node.extend([onnx.helper.make_node("Sigmoid", [out.name], ["p"]),
                         onnx.helper.make_node("Greater", ["p", "half"], ["yes"]),
                         onnx.helper.make_node("Cast", ["yes"], ["label"], to=onnx.TensorProto.INT64)])
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_tensor_value_info("label", onnx.TensorProto.INT64, [1, 10]))
    return m


@pytest.mark.parametrize("constant_node", [False, True])
def test_a_model_that_outputs_thresholded_labels_is_scored_on_the_score(tmp_path, constant_node):
    """A multi-label classifier exported with `sigmoid(x) > 0.5` as its output: 0/1 labels, piecewise
    constant in the weights. The loss compares the sigmoid's probabilities instead."""
    from spdy_onnx.evaluate import compared_tensors
    rng = np.random.default_rng(1)
    x = {"x": rng.standard_normal((24, 3, 8, 8)).astype(np.float32)}
    model = _ending_in_thresholds(tiny.cnn(channels=16, size=8, classes=10), constant_node)
    assert compared_tensors(model)[1]["label"][0] == "p"
    path, data, table_path = _setup(tmp_path, model, x)
    rep = _optimize(path, data, table_path, tmp_path / "o.onnx", correct_epochs=2, target=1.5, min_weights=0)
    quality = rep["quality"]
    assert quality["loss"] == "mse" and quality["calibration_loss"] > 0
    assert quality["global_correction"]["tuned_sites"] >= 2
    assert [o.name for o in onnx.load(tmp_path / "o.onnx").graph.output] == ["label"]
    # a comparison of two computed tensors is no fixed threshold: left as it is
    two = onnx.ModelProto()
    two.CopyFrom(model)
    for node in two.graph.node:
        if node.op_type == "Greater":
            node.input[1] = node.input[0]
    assert compared_tensors(two)[1] == {}


@pytest.mark.parametrize("as_float", [False, True])
def test_a_model_that_outputs_labels_is_scored_on_the_scores_behind_them(tmp_path, as_float):
    """A classifier exported with ArgMax as its output: the labels are piecewise constant in the
    weights, so the search saw no difference between profiles and the correction crashed with no
    gradient. The calibration loss compares the scores the labels are taken from."""
    rng = np.random.default_rng(1)
    x = {"x": rng.standard_normal((24, 3, 8, 8)).astype(np.float32)}
    path, data, table_path = _setup(tmp_path, _ending_in_labels(tiny.cnn(channels=16, size=8, classes=10), as_float), x)
    rep = _optimize(path, data, table_path, tmp_path / "o.onnx", correct_epochs=2, target=1.5, min_weights=0)
    quality = rep["quality"]
    assert quality["loss"] == "kl" and quality["calibration_loss"] > 0
    assert quality["global_correction"]["tuned_sites"] >= 2
    written = onnx.load(tmp_path / "o.onnx")
    assert [o.name for o in written.graph.output] == [o.name for o in onnx.load(path).graph.output]


def test_without_torch_the_correction_is_skipped_with_a_warning(mlp_setup, tmp_path, monkeypatch, caplog):
    path, data, table_path = mlp_setup
    monkeypatch.setattr(correct, "available", lambda: False)
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        rep = _optimize(path, data, table_path, tmp_path / "o.onnx")
    assert "PyTorch is not installed" in caplog.text
    assert "global_correction" not in rep["quality"]


def test_a_graph_the_executor_cannot_run_skips_the_correction_not_the_run(mlp_setup, tmp_path, monkeypatch, caplog):
    """An op the PyTorch executor lacks must not throw away a profile that was searched and measured:
    the reconstructed weights are written, with a warning and the reason in the report."""
    from spdy_onnx.runtimes import torch_onnx
    path, data, table_path = mlp_setup

    def refuse(*a, **k):
        raise torch_onnx.Unsupported("the PyTorch executor does not run op Frobnicate (node 'f')")
    monkeypatch.setattr(torch_onnx, "GraphExecutor", refuse)
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        rep = _optimize(path, data, table_path, tmp_path / "o.onnx")
    assert rep["status"] == "not_measured" and (tmp_path / "o.onnx").exists()
    assert "global correction is skipped" in caplog.text and "Frobnicate" in caplog.text
    assert "Frobnicate" in rep["quality"]["global_correction_skipped"]
    assert any("global correction was skipped" in w and "Frobnicate" in w for w in rep["warnings"])
    assert "global_correction" not in rep["quality"]
    plain = _optimize(path, data, table_path, tmp_path / "p.onnx", correct_epochs=0)
    a, b = _inits(tmp_path / "o.onnx"), _inits(tmp_path / "p.onnx")
    assert all(np.array_equal(a[k], b[k]) for k in b)     # exactly the uncorrected weights


def test_negative_epochs_are_refused(mlp_setup, tmp_path):
    path, data, table_path = mlp_setup
    with pytest.raises(api.SpdyError, match="epochs"):
        _optimize(path, data, table_path, tmp_path / "o.onnx", correct_epochs=-1)


# --- the guarantee with a correction: drafts first, the corrected file measured before it is written ---

class SparsityClock(ScriptedRuntime):
    """The scripted engine (speed from the zeros only), also recording the weights it measured."""
    name = "sparsity-clock"
    measured: list = []

    def compare(self, baseline_path, candidate_path, *, batch_size, feeds):
        model = onnx.load(candidate_path)
        sites, _ = graph.find_sites(model)
        w = graph.read_weights(model, sites)
        type(self).measured.append({s.weight: w[s.name].copy() for s in sites})
        return super().compare(baseline_path, candidate_path, batch_size=batch_size, feeds=feeds)


@pytest.fixture
def clock(monkeypatch):
    monkeypatch.setitem(REGISTRY, "sparsity-clock", (__name__, "SparsityClock", None))
    SparsityClock.measured = []
    return SparsityClock


def test_the_corrected_file_is_the_one_measured_and_written(clock, mlp_setup, tmp_path):
    path, data, _ = mlp_setup
    clock.efficiency = 0.9    # the first profile's draft misses: re-solved before any correction is paid for
    out = tmp_path / "o.onnx"
    rep = api.optimize(path, target=1.7, runtime="sparsity-clock", output=out, data=data, progress=False,
                       cache_dir=tmp_path / "c", strategy="uniform", correct_epochs=1)
    kinds = [a["weights"] for a in rep["attempts"]]
    assert rep["status"] == "met"
    assert kinds[-2:] == ["draft", "corrected"] and kinds.count("corrected") == 1
    assert rep["attempts"][0]["weights"] == "draft" and rep["attempts"][0]["measured_speedup"] < 1.7 * 1.02
    assert "correct_s_" + str(rep["attempts"][-1]["attempt"]) in rep["phases_s"]
    written = _inits(out)
    last = clock.measured[-1]
    assert all(np.array_equal(written[k], v) for k, v in last.items())        # measured == written
    draft = clock.measured[-2]
    assert any(not np.array_equal(draft[k], v) for k, v in last.items())       # and it is not the draft


def test_weights_the_correction_cannot_tune_leave_the_measured_draft_as_the_file(clock, tmp_path, caplog):
    """fp16 weights reach their MatMuls through a Cast, which the correction does not tune: it says so
    once, and the draft it measured is written without a second, identical measurement."""
    rng = np.random.default_rng(0)
    path, data, _ = _setup(tmp_path, tiny.mlp(width=64, depth=4, seq=8, weight_form="fp16"),
                           {"x": rng.standard_normal((48, 8, 64)).astype(np.float32)})
    clock.efficiency = 1.0
    out = tmp_path / "o.onnx"
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        rep = api.optimize(path, target=1.5, runtime="sparsity-clock", output=out, data=data, progress=False,
                           cache_dir=tmp_path / "c", strategy="uniform", correct_epochs=1)
    assert rep["status"] == "met"
    assert [a["weights"] for a in rep["attempts"]] == ["draft"]     # no second measurement of the same file
    assert "Cast" in rep["quality"]["global_correction_skipped"] and "global_correction" not in rep["quality"]
    assert caplog.text.count("global correction is skipped") == 1
    written = _inits(out)
    assert all(np.array_equal(written[k], v) for k, v in clock.measured[-1].items())


def test_the_report_splits_the_calibration_setup_and_a_cached_database_skips_its_hessians(clock, mlp_setup, tmp_path):
    path, data, _ = mlp_setup
    clock.efficiency = 1.0
    kw = dict(target=1.5, runtime="sparsity-clock", data=data, progress=False, cache_dir=tmp_path / "c",
              strategy="uniform", correct_epochs=0)
    rep = api.optimize(path, output=tmp_path / "a.onnx", **kw)
    first = rep["quality"]["calibration_phases_s"]
    assert {"database_s", "hessians_s", "reconstruction_s", "evaluator_s"} <= set(first)
    assert "load_data_s" in rep["phases_s"]
    assert first["database_s"] >= first["hessians_s"] + first["reconstruction_s"] > 0
    again = api.optimize(path, output=tmp_path / "b.onnx", **kw)["quality"]["calibration_phases_s"]
    assert "hessians_s" not in again and "reconstruction_s" not in again    # read from the cache
    assert again["database_s"] < first["database_s"]


def test_bad_calibration_data_fails_before_anything_is_profiled(clock, mlp_setup, tmp_path, monkeypatch):
    """A wrong key in --data costs a second, not a profiling pass."""
    path, _, _ = mlp_setup
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=np.zeros((4, 8, 64), dtype=np.float32))
    profiled = []
    monkeypatch.setattr(clock, "measure", lambda self, *a, **k: profiled.append(1))
    with pytest.raises(SpdyError, match="lacks model input"):
        api.optimize(path, target=1.5, runtime="sparsity-clock", output=tmp_path / "o.onnx", data=bad,
                     progress=False, cache_dir=tmp_path / "c")
    assert profiled == [] and not (tmp_path / "o.onnx").exists()
    with pytest.raises(SpdyError, match="search-budget"):
        api.optimize(path, target=1.5, runtime="sparsity-clock", output=tmp_path / "o.onnx", data=mlp_setup[1],
                     progress=False, cache_dir=tmp_path / "c", search_budget="0.5")
    assert profiled == []


class NoisyClock(SparsityClock):
    """Measurements read from a script, one per call, as compile-to-compile noise would give them."""
    name = "noisy-clock"
    speedups: list = []

    def compare(self, baseline_path, candidate_path, *, batch_size, feeds):
        base = super().compare(baseline_path, candidate_path, batch_size=batch_size, feeds=feeds)
        if Path(candidate_path).stem == "fastest":
            return base      # the up-front check of the table's fastest profile is not part of the script
        return Comparison(baseline_ms=base.baseline_ms, candidate_ms=base.baseline_ms / type(self).speedups.pop(0),
                          rounds=5, iterations_per_round=1)


@pytest.mark.parametrize("script,corrections,measured", [
    # draft 1.80x, corrected 1.70x: the file is at the target, the pooled 1.749x meets 1.7 x 1.02
    ([1.80, 1.70], 1, (1.80 * 1.70) ** 0.5),
    # corrected 1.69x is under the target itself: measured again (1.68x), the three pool to 1.723x, under
    # the 1.728x three compiles need: searched again, and the next corrected file meets 1.734x alone
    ([1.80, 1.69, 1.68, 1.80, 1.75], 2, 1.75),
    # a thin draft (1.74x, under 1.734 x 1.03) is measured again (1.75x) before it is corrected; the
    # corrected 1.69x is under the target: measured again (1.69x), the four pool to 1.717x, under the
    # 1.727x four compiles need: searched again
    ([1.74, 1.75, 1.69, 1.69, 1.80, 1.76], 2, 1.76),
    # the same thin draft, corrected 1.70x: the three pool to 1.730x, short of one measurement's 1.734x
    # but over the 1.728x that three compiles need: kept, with no further measurement
    ([1.74, 1.75, 1.70], 1, (1.74 * 1.75 * 1.70) ** (1 / 3)),
    # corrected 1.69x, measured again 1.76x: the three (with the 1.79x draft) pool to 1.746x: kept
    ([1.79, 1.69, 1.76], 1, (1.79 * 1.69 * 1.76) ** (1 / 3)),
    # a thin draft that pools under the requirement (1.74x, then 1.70x) is a miss: the aim goes up, and
    # only the next profile is corrected
    ([1.74, 1.70, 1.85, 1.72], 1, (1.85 * 1.72) ** 0.5),
])
def test_a_corrected_file_is_pooled_with_its_draft(monkeypatch, mlp_setup, tmp_path, script, corrections, measured):
    monkeypatch.setitem(REGISTRY, "noisy-clock", (__name__, "NoisyClock", None))
    NoisyClock.measured, NoisyClock.speedups = [], list(script)
    path, data, _ = mlp_setup
    rep = api.optimize(path, target=1.7, runtime="noisy-clock", output=tmp_path / "o.onnx", data=data,
                       progress=False, cache_dir=tmp_path / "c", strategy="uniform", correct_epochs=1)
    paid = [k for k in rep["phases_s"] if k.startswith("correct_s_")]
    assert rep["status"] == "met" and len(paid) == corrections
    assert NoisyClock.speedups == []
    assert rep["measured_speedup"] == pytest.approx(measured, rel=1e-6)
    assert ("pooled_speedup" in rep["attempts"][-1]) == (corrections == 1)
    # the kept measurement says how many compiles it stands on, and met what that many need
    assert (rep["compiles_pooled"] > 1) == ("pooled_speedup" in rep["attempts"][-1])
    assert rep["measured_speedup"] >= rep["required_speedup_applied"] >= 1.7
    if rep["compiles_pooled"] > 1:
        from spdy_onnx.cli import _pooled
        assert f"pooled over {rep['compiles_pooled']} compiles" in _pooled(rep)
    rows = rep["attempts"]
    for i, a in enumerate(rows):   # every thin draft was measured again, and the two pooled
        if a["weights"] == "draft" and "pooled_speedup" not in a and \
                1.7 * 1.02 <= a["measured_speedup"] < 1.7 * 1.02 * (1 + api.NEAR_HIT):
            assert rows[i + 1]["weights"] == "draft" and "pooled_speedup" in rows[i + 1]


def test_a_corrected_file_is_recorded_under_its_drafts_attempt(monkeypatch, mlp_setup, tmp_path):
    """Draft 1 meets with speed to spare, the lower aim's draft 2 misses, and draft 1 is corrected: the
    corrected file's record and correction time belong to attempt 1, not to the missed attempt 2."""
    monkeypatch.setitem(REGISTRY, "noisy-clock", (__name__, "NoisyClock", None))
    NoisyClock.measured, NoisyClock.speedups = [], [3.00, 1.20, 1.80]
    path, data, _ = mlp_setup
    rep = api.optimize(path, target=1.7, runtime="noisy-clock", output=tmp_path / "o.onnx", data=data,
                       progress=False, cache_dir=tmp_path / "c", strategy="uniform", correct_epochs=1,
                       max_attempts=2)
    rows = rep["attempts"]
    assert NoisyClock.speedups == [] and rep["status"] == "met" and rep["measured_speedup"] == 1.80
    assert [(a["attempt"], a["weights"]) for a in rows] == [(1, "draft"), (2, "draft"), (1, "corrected")]
    assert rows[2]["aimed_speedup"] == rows[0]["aimed_speedup"] > rows[1]["aimed_speedup"]
    assert [k for k in rep["phases_s"] if k.startswith("correct_s_")] == ["correct_s_1"]


def test_a_model_exported_at_batch_1_calibrates_at_a_larger_batch(tmp_path):
    """Timing at --batch-size 4 means calibration batches of 4 through onnxruntime and PyTorch too."""
    rng = np.random.default_rng(2)
    model = tiny.cnn(channels=16, size=8, classes=10, batch=1)
    path, data, table_path = _setup(tmp_path, model, {"x": rng.standard_normal((40, 3, 8, 8)).astype(np.float32)})
    rep = _optimize(path, data, table_path, tmp_path / "b4.onnx", target=1.5, min_weights=0, batch_size=4,
                    correct_epochs=2)
    assert rep["batch_size"] == 4 and rep["quality"]["global_correction"]["train_batches"] >= 8
    assert rep["quality"]["calibration_loss"] <= rep["quality"]["calibration_loss_before_correction"]
    written = onnx.load(tmp_path / "b4.onnx")
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1   # the user's graph, as given


def test_cli_reports_the_loss_before_and_after_the_correction(mlp_setup, tmp_path, capsys):
    from spdy_onnx.cli import main
    path, data, table_path = mlp_setup
    base = ["optimize", str(path), "--target", "2x", "--runtime", "table", "--latency-table", str(table_path),
            "--data", str(data), "--strategy", "uniform", "-q", "--cache-dir", str(tmp_path / "c")]
    assert main(base + ["-o", str(tmp_path / "a.onnx"), "--correct-epochs", "1"]) == 0
    assert "before the correction" in capsys.readouterr().out
    assert main(base + ["-o", str(tmp_path / "b.onnx"), "--correct-epochs", "0"]) == 0
    assert "before the correction" not in capsys.readouterr().out
    assert main(base + ["-o", str(tmp_path / "c.onnx"), "--correct-epochs", "-1"]) == 2
    assert not (tmp_path / "c.onnx").exists()


class FineNoisyClock(NoisyClock):
    """The scripted measurements on a finer grid, so the aim search meets two different profiles."""
    name = "fine-noisy-clock"
    levels = [0.0, 0.5, 0.7, 0.75, 0.8, 0.9]

    def default_levels(self):
        return self.levels

    def measure(self, model_path, sites, *, levels, batch_size, feeds, aliases, checkpoint=None):
        times = {s.name: [1.0, 0.8, 0.6, 0.52, 0.45, 0.25] for s in sites}
        return LatencyTable(levels=levels, times=times, dense_total_ms=len(sites) + 0.5, runtime=self.name,
                            meta={"cores": 1})


def test_a_corrected_miss_falls_back_to_a_profile_that_met_as_a_draft(monkeypatch, mlp_setup, tmp_path):
    """Drafts: 70% misses (1.30x), 80% meets with room (1.90x), 75% meets (1.58x) and is kept; its
    corrected file then measures 1.45x and 1.46x. Instead of a new search, the 80% profile, already
    measured above the requirement, is corrected and measured (1.85x)."""
    monkeypatch.setitem(REGISTRY, "fine-noisy-clock", (__name__, "FineNoisyClock", None))
    FineNoisyClock.measured, FineNoisyClock.speedups = [], [1.30, 1.90, 1.58, 1.45, 1.46, 1.85]
    path, data, _ = mlp_setup
    rep = api.optimize(path, target=1.5, runtime="fine-noisy-clock", output=tmp_path / "o.onnx", data=data,
                       progress=False, cache_dir=tmp_path / "c", strategy="uniform", correct_epochs=1)
    assert FineNoisyClock.speedups == []
    kinds = [a["weights"] for a in rep["attempts"]]
    assert kinds == ["draft"] * 3 + ["corrected"] * 3
    # no new draft was searched; the 80% profile's corrected file is recorded under its draft's attempt
    assert [a["attempt"] for a in rep["attempts"]] == [1, 2, 3, 3, 3, 2]
    assert rep["status"] == "met" and rep["measured_speedup"] == pytest.approx(1.85)
    assert rep["attempts"][-1]["aimed_speedup"] == rep["attempts"][1]["aimed_speedup"]
    assert {s["sparsity"] for s in rep["sites"]} == {0.8}


def test_the_time_budget_is_judged_on_the_timed_batch_and_the_mean_cost():
    """Batch `probe` is the one timed; the count is what the budget leaves after the held-back work."""
    timed = []
    train = [("short", None), ("mean", None), ("long", None)] * 10
    hold = [("hold", None)] * 2

    def target(feed):
        timed.append(("target", feed[0]))
        return None

    def forward(feed):
        timed.append(("forward", feed[0]))

    def step_seconds(feed, ref):
        timed.append(("step", feed[0]))
        return 0.5

    # each training batch costs ~0.5 s (a step; targets and forwards take ~0): 10 s fit about 20 of 30
    n = correct._samples_in_time(train, hold, 10.0, 1, target, forward, step_seconds, cost=1.0, probe=1)
    assert {name for _, name in timed} == {"mean"}
    assert 18 <= n <= 20
    # twice the cost per batch (longer batches on average): about half as many fit
    n2 = correct._samples_in_time(train, hold, 10.0, 1, target, forward, step_seconds, cost=2.0, probe=1)
    assert 9 <= n2 <= 10
    # a budget that fits nothing sizes one batch (the training loop stops when it is spent), never more
    # than there are
    assert correct._samples_in_time(train, hold, 0.0, 1, target, forward, step_seconds, probe=1) == 1
    assert correct._samples_in_time(train[:3], hold, 1e6, 1, target, forward, step_seconds, probe=1) == 3


def test_the_database_uses_the_first_hessian_samples_only(mlp_setup, tmp_path, monkeypatch):
    """More calibration data than the Hessians' cap reuses the database of its first samples, and the
    pruned weights are the same; the correction still sees every sample."""
    from spdy_onnx import reconstruct
    monkeypatch.setattr(reconstruct, "HESSIAN_SAMPLES", 16)
    path, data, table_path = mlp_setup
    first = tmp_path / "first16.npz"
    np.savez(first, x=np.load(data)["x"][:16])
    out = tmp_path / "runs"
    out.mkdir()
    _optimize(path, first, table_path, out / "a.onnx", correct_epochs=0)
    _optimize(path, data, table_path, out / "b.onnx", correct_epochs=0)
    assert len(list((out / "cache" / "databases").iterdir())) == 1
    a, b = _inits(out / "a.onnx"), _inits(out / "b.onnx")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    tuned = _optimize(path, data, table_path, out / "c.onnx", correct_epochs=1)
    summary = tuned["quality"]["global_correction"]
    assert summary["train_batches"] + summary["held_back_batches"] == 48


def test_validation_data_is_what_the_correction_judges_its_epochs_on(mlp_setup, tmp_path):
    path, data, table_path = mlp_setup
    rng = np.random.default_rng(7)
    val = tmp_path / "val.npz"
    np.savez(val, x=rng.standard_normal((20, 8, 64)).astype(np.float32))
    plain = _optimize(path, data, table_path, tmp_path / "a.onnx", correct_epochs=1)["quality"]["global_correction"]
    rep = _optimize(path, data, table_path, tmp_path / "b.onnx", correct_epochs=1, validation_data=val)
    judged = rep["quality"]["global_correction"]
    assert plain["held_back"] == "calibration slice" and plain["train_batches"] == 42
    assert judged["held_back"] == "validation data"
    assert judged["train_batches"] == 48 and judged["held_back_batches"] == 20   # every calibration sample trains
    assert judged["loss_before"] != plain["loss_before"]   # another set of samples
    # the check itself: on all-zero inputs the draft is already close to dense (only the biases reach
    # the first layer's output) and tuning the biases for the calibration data moves it away (a 15-fold
    # rise here), so judged on them no epoch is kept; judged on seen samples, the same tuning is
    model = onnx.load(path)
    sites, _ = graph.find_sites(model)
    w = graph.read_weights(model, sites)
    pruned = {s.weight: np.where(np.abs(w[s.name]) > np.quantile(np.abs(w[s.name]), 0.7), w[s.name], 0)
              for s in sites}
    calib = dict(np.load(data))
    kw = dict(loss="mse", batch_size=1, epochs=2, seed=3)
    kept, summary = correct.global_correction(model, sites, pruned, calib, validation={"x": np.zeros_like(calib["x"][:8])},
                                              **kw)
    assert kept == {} and summary["best_epoch"] == 0 and summary["held_back_batches"] == 8
    assert all(e["held_back_loss"] > summary["loss_before"] for e in summary["epochs"])
    tuned, summary = correct.global_correction(model, sites, pruned, calib, validation={"x": calib["x"][:8]}, **kw)
    assert tuned and summary["best_epoch"] >= 1 and summary["loss_after"] < summary["loss_before"]


def test_bad_validation_data_is_refused_before_anything_is_written(mlp_setup, tmp_path, capsys):
    from spdy_onnx.cli import main
    path, data, table_path = mlp_setup
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, y=np.zeros((4, 8, 64), np.float32))
    with pytest.raises(SpdyError, match="validation data .* lacks model input"):
        _optimize(path, data, table_path, tmp_path / "a.onnx", validation_data=wrong)
    shape = tmp_path / "shape.npz"
    np.savez(shape, x=np.zeros((4, 8, 32), np.float32))
    with pytest.raises(SpdyError, match="validation input 'x' has samples of shape"):
        _optimize(path, data, table_path, tmp_path / "a.onnx", validation_data=shape)
    with pytest.raises(SpdyError, match="needs --data"):
        _optimize(path, None, table_path, tmp_path / "a.onnx", validation_data=data)
    assert not (tmp_path / "a.onnx").exists()
    base = ["optimize", str(path), "--target", "2x", "--runtime", "table", "--latency-table", str(table_path),
            "--data", str(data), "--strategy", "uniform", "-q", "--cache-dir", str(tmp_path / "c")]
    assert main(base + ["-o", str(tmp_path / "b.onnx"), "--validation-data", str(tmp_path / "missing.npz")]) == 2
    assert "no such validation data" in capsys.readouterr().err
    assert not (tmp_path / "b.onnx").exists()
    assert main(base + ["-o", str(tmp_path / "c.onnx"), "--validation-data", str(data)]) == 0
    assert "global correction on validation data" in capsys.readouterr().out
    # validation samples no epoch can help (see above): the CLI says the draft was kept
    zeros = tmp_path / "zeros.npz"
    np.savez(zeros, x=np.zeros((8, 8, 64), np.float32))
    assert main(base + ["-o", str(tmp_path / "d.onnx"), "--validation-data", str(zeros)]) == 0
    out = capsys.readouterr().out
    assert "the global correction kept no epoch" in out and "no epoch beat the draft: not applied" in out


def _cache_model():
    """x (1, 4, 64), past (1, 28, 64) -> new = x @ w; present = Concat(past, new); logits = new @ head."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "w")
    head = numpy_helper.from_array((rng.standard_normal((64, 10)) / 8).astype(np.float32), "head")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["new"], name="proj"),
             helper.make_node("Concat", ["past", "new"], ["present"], axis=1),
             helper.make_node("MatMul", ["new", "head"], ["logits"], name="lm_head")]
    g = helper.make_graph(nodes, "kv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 64]),
                                        helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, 28, 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 10]),
                           helper.make_tensor_value_info("present", TensorProto.FLOAT, [1, 32, 64])], [w, head])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_a_cache_output_is_compared_on_what_this_step_computed(tmp_path):
    """A KV cache's present = Concat(past, new): the past is copied through (28 of 32 positions here), so
    the whole output's MSE hid the new positions' error. The loss compares the new part."""
    from spdy_onnx.evaluate import compared_tensors
    model = _cache_model()
    m, replaced = compared_tensors(model)
    assert {o: t for o, (t, _) in replaced.items()} == {"present": "new"}
    assert [o.name for o in m.graph.output] == ["logits", "new"]
    rng = np.random.default_rng(3)
    x = {"x": rng.standard_normal((16, 4, 64)).astype(np.float32),
         "past": rng.standard_normal((16, 28, 64)).astype(np.float32)}
    path, data, table_path = _setup(tmp_path, model, x)
    rep = _optimize(path, data, table_path, tmp_path / "o.onnx", correct_epochs=0, target=1.5, min_weights=0)
    per_output = rep["quality"]["calibration_loss_per_output"]
    assert set(per_output) == {"logits", "present"} and per_output["present"] > 0.01   # under the output's name
    written = onnx.load(tmp_path / "o.onnx")
    assert [o.name for o in written.graph.output] == ["logits", "present"]     # the file itself is untouched


def test_a_cache_whose_past_passes_other_ops_is_compared_on_what_this_step_computed():
    """The past may reach the Concat through ops other than reshapes (a transpose to heads-first, a
    repeat of grouped heads, a scale): no pruning changes it, so it is still left out of the loss. A Concat
    of two computed parts is compared whole."""
    from onnx import helper, numpy_helper
    from spdy_onnx.evaluate import compared_tensors
    model = _cache_model()
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.float32(0.5).reshape(()), "half"))
    g.node[1].input[0] = "past_scaled"
    g.node.insert(1, helper.make_node("Transpose", ["past"], ["past_t"], perm=[0, 1, 2]))
    g.node.insert(2, helper.make_node("Mul", ["past_t", "half"], ["past_scaled"]))
    assert {o: t for o, (t, _) in compared_tensors(model)[1].items()} == {"present": "new"}
    g.node.insert(1, helper.make_node("MatMul", ["past", "w"], ["past_w"], name="past_proj"))
    g.node[2].input[0] = "past_w"      # the "past" now goes through a weight: both parts computed
    assert compared_tensors(model)[1] == {}


def _first_step_decoder(layers=3):
    """x (1, 4, 32) -> logits = (x @ wq) @ head, and per layer present.{i}.key / .value = x @ wk_i / wv_i:
    a decoder's first step, whose caches have no past to concatenate."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(4)
    inits, nodes = [], []
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 10])]

    def weight(name, shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / 6).astype(np.float32), name))
    weight("wq", (32, 32))
    weight("head", (32, 10))
    nodes += [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
              helper.make_node("MatMul", ["q", "head"], ["logits"], name="lm_head")]
    for i in range(layers):
        for part in ("key", "value"):
            weight(f"w{part}{i}", (32, 32))
            nodes.append(helper.make_node("MatMul", ["x", f"w{part}{i}"], [f"present.{i}.{part}"], name=f"{part}{i}"))
            outs.append(helper.make_tensor_value_info(f"present.{i}.{part}", TensorProto.FLOAT, [1, 4, 32]))
    g = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32])],
                          outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_cache_outputs_share_one_share_of_the_loss():
    """Two caches per layer counted one by one made a decoder's logits 1/(2L+1) of the loss. The caches
    together weigh as much as the logits: named like a cache, or cut to this step's part of a Concat."""
    from spdy_onnx.evaluate import compared_tensors, output_weights
    model = _first_step_decoder(layers=3)
    names = [o.name for o in model.graph.output]
    assert output_weights(model, names) == pytest.approx([0.5] + [0.5 / 6] * 6)
    assert output_weights(model, ["logits", "start_logits"]) == pytest.approx([0.5, 0.5])   # no cache: equal
    assert output_weights(model, ["present.0.key"]) == pytest.approx([1.0])
    assert output_weights(model, ["logits", "presentation"]) == pytest.approx([0.5, 0.5])  # not a cache name
    cut, _ = compared_tensors(_cache_model())     # present = Concat(past, new): 'new' is the cache part
    assert output_weights(cut, ["logits", "new", "other"]) == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    cut.graph.output.append(onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, None))
    assert output_weights(cut, ["logits", "new", "present.1.value", "scores"]) == pytest.approx(
        [1 / 3, 1 / 6, 1 / 6, 1 / 3])


def test_the_search_and_the_correction_weigh_cache_outputs_alike(tmp_path):
    """The evaluator's loss is the weighted mean of its per-output losses, and the correction, scored on
    the same samples, starts from that same loss."""
    from spdy_onnx.database import MagnitudeDatabase
    from spdy_onnx.evaluate import Evaluator
    model = _first_step_decoder(layers=2)
    rng = np.random.default_rng(5)
    data = {"x": rng.standard_normal((8, 4, 32)).astype(np.float32)}
    specs = {"x": ((1, 4, 32), np.dtype(np.float32))}
    sites, _ = graph.find_sites(model)
    db = MagnitudeDatabase(sites, graph.read_weights(model, sites), [0.0, 0.5, 0.9])
    ev = Evaluator(model, sites, db, data, loss="mse", specs=specs, eval_samples=8)
    picks = [2] * len(sites)
    per_output = list(ev.output_losses(ev.weights_of(picks)).values())
    assert ev.loss(picks) == pytest.approx(float(np.dot(ev.output_weights, per_output)), rel=1e-6)
    assert ev.loss(picks) != pytest.approx(float(np.mean(per_output)), rel=1e-3)
    _, summary = correct.global_correction(model, sites, ev.weights_of(picks), data, loss=ev.loss_name,
                                           batch_size=1, epochs=1, seed=0, validation=data,
                                           loss_scales=ev.scales)
    assert summary["loss_before"] == pytest.approx(ev.loss(picks), rel=1e-4)


def test_the_reported_loss_of_a_corrected_decoder_is_the_weighted_one(tmp_path):
    """The loss a report gives for the written file weighs the outputs as the search and the correction
    do, and its per-output figures carry the graph outputs' names."""
    model = _first_step_decoder(layers=2)
    rng = np.random.default_rng(6)
    path, data, table_path = _setup(tmp_path, model, {"x": rng.standard_normal((16, 4, 32)).astype(np.float32)})
    rep = _optimize(path, data, table_path, tmp_path / "o.onnx", correct_epochs=1, target=1.5, min_weights=0)
    q = rep["quality"]
    per_output = q["calibration_loss_per_output"]
    assert list(per_output) == [o.name for o in model.graph.output]
    values = list(per_output.values())
    assert q["calibration_loss"] == pytest.approx(0.5 * values[0] + 0.5 * float(np.mean(values[1:])), rel=1e-6)


def test_the_sites_own_outputs_can_join_the_training_loss(mlp_setup, tmp_path, caplog):
    """With --correct-layers W > 0 every pruned site's output (after its fused bias) is matched to the
    dense one as well: the biases stay tunable, the zeros stay, and the training differs from the
    output-only correction's while the held-back check still judges the output loss."""
    path, data, table_path = mlp_setup
    model = onnx.load(path)
    sites, _ = graph.find_sites(model)
    tensors = correct._layer_tensors(model, sites)
    adds = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "Add"}
    assert len(tensors) == len(sites)
    assert all(t == adds.get(s.output, s.output) for s, t in zip(sites, tensors))
    assert any(t != s.output for s, t in zip(sites, tensors))   # the MLP's biases: the Add's output

    plain = _optimize(path, data, table_path, tmp_path / "plain.onnx", correct_epochs=2)
    layered = _optimize(path, data, table_path, tmp_path / "layered.onnx", correct_epochs=2, correct_layers=1.0)
    summary = layered["quality"]["global_correction"]
    assert summary["layer_outputs"] == len(sites) and summary["layer_weight"] == 1.0
    assert plain["quality"]["global_correction"]["layer_outputs"] == 0
    assert summary["best_epoch"] >= 1 and summary["loss_after"] < summary["loss_before"]
    a, b = _inits(tmp_path / "plain.onnx"), _inits(tmp_path / "layered.onnx")
    for s in sites:
        np.testing.assert_array_equal(a[s.weight] == 0, b[s.weight] == 0)
        assert not np.allclose(a[s.weight], b[s.weight])
    dense = _inits(path)
    biases = [n for n in b if n.startswith("b")]
    assert biases and any(not np.array_equal(dense[n], b[n]) for n in biases)
    caplog.set_level("WARNING")
    _optimize(path, data, table_path, tmp_path / "off.onnx", correct_epochs=0, correct_layers=5.0)
    assert "--correct-layers" in caplog.text and "ignored" in caplog.text
    for bad in (-1.0, float("nan")):
        with pytest.raises(SpdyError, match="--correct-layers"):
            _optimize(path, data, table_path, tmp_path / "bad.onnx", correct_layers=bad)
    assert not (tmp_path / "bad.onnx").exists()
