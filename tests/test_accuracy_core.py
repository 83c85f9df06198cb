"""Calibration, Hessians, OBS reconstruction, the evaluator and the SPDY search."""
import itertools
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny

from spdy_onnx import calibrate, graph, obs
from spdy_onnx.errors import SpdyError
from spdy_onnx.evaluate import Evaluator, kl_divergence, normalised_mse
from spdy_onnx.database import MagnitudeDatabase
from spdy_onnx.passes import magnitude_prune
from spdy_onnx.search import SpdySearch, curve_levels, error_shape, parse_budget, single_site_losses, spdy_search
from spdy_onnx.solver import solve_dp


def test_im2col_rows_reproduce_conv_output():
    model = tiny.cnn(channels=8, size=9, classes=5)
    sites, _ = graph.find_sites(model)
    conv = next(s for s in sites if s.name == "conv1")       # 3x3, stride 2, pad 1
    x = np.random.default_rng(0).standard_normal((2, 16, 9, 9)).astype(np.float32)
    w = graph.read_weights(model, [conv])["conv1"]
    rows = calibrate.site_rows(conv, x)
    y = rows @ conv.to_matrix(w).T                            # (b*ho*wo, out)
    g = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])],
                               "c", [onnx.helper.make_tensor_value_info("x", 1, list(x.shape))],
                               [onnx.helper.make_tensor_value_info("y", 1, None)], [onnx.numpy_helper.from_array(w, "w")])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)])
    m.ir_version = 8
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y.reshape(2, 5, 5, 8).transpose(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-4)


def _layer_problem(seed=0, rows=48, cols=96, n=2000):
    rng = np.random.default_rng(seed)
    # correlated inputs: the case where second-order information matters
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    x = rng.standard_normal((n, cols)) @ mix
    w = rng.standard_normal((rows, cols))
    return w, x, x.T @ x / n


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_obs_exact_zeros_and_beats_magnitude(sparsity):
    w, x, h = _layer_problem()
    chol, dead = obs.inverse_cholesky(h)
    p = obs.prune(w, chol, dead, sparsity)
    assert np.count_nonzero(p == 0) == round(sparsity * w.size)
    err_obs = obs.reconstruction_error(w, p, h)
    err_mag = obs.reconstruction_error(w, magnitude_prune(w, sparsity), h)
    assert err_obs < err_mag
    best = obs.best_reconstruction(w, h, chol, dead, sparsity)
    assert np.count_nonzero(best == 0) == round(sparsity * w.size)
    assert obs.reconstruction_error(w, best, h) < err_obs


def test_obs_n_m_pattern():
    w, x, h = _layer_problem(cols=64)
    chol, dead = obs.inverse_cholesky(h)
    p = obs.prune(w, chol, dead, n=2, m=4)
    groups = (p == 0).reshape(w.shape[0], -1, 4).sum(axis=-1)
    assert (groups >= 2).all()
    mag = w.copy().reshape(w.shape[0], -1, 4)
    order = np.argsort(np.abs(mag), axis=-1)[..., :2]
    np.put_along_axis(mag, order, 0.0, axis=-1)
    assert obs.reconstruction_error(w, p, h) < obs.reconstruction_error(w, mag.reshape(w.shape), h)


def test_refit_with_an_all_zero_hessian_stays_finite():
    """All-zero calibration inputs give H = 0: the preconditioner must not divide by zero."""
    w, _, h = _layer_problem(cols=32)
    p = magnitude_prune(w, 0.5)
    out = obs.refine(w, p, np.zeros_like(h))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out == 0, p == 0)


def test_dead_inputs_are_handled():
    w, x, h = _layer_problem(cols=32)
    h[5, :] = h[:, 5] = 0.0
    chol, dead = obs.inverse_cholesky(h)
    assert dead[5] and np.isfinite(chol).all()
    assert np.isfinite(obs.prune(w, chol, dead, 0.5)).all()


@pytest.mark.parametrize("scale", [1e-40, 1e30])
def test_reconstruction_does_not_depend_on_the_inputs_scale(scale):
    """Inputs of about 1e-20 (a randomly initialised MobileViT's) give H = XᵀX near 1e-40: its inverse
    is beyond float32's range. The site's reconstruction is the same at any scale of H."""
    from spdy_onnx.reconstruct import _reconstruct_site
    model = tiny.mlp(width=96, depth=1, seq=4)
    site = graph.find_sites(model)[0][0]
    w = graph.read_weights(model, [site])[site.name]
    _, _, h = _layer_problem(cols=96)
    levels = [0.0, 0.5, 0.8]
    ref = _reconstruct_site(site, w, h, levels, "unstructured", 0.01)
    with np.errstate(all="ignore"):
        out = _reconstruct_site(site, w, h * scale, levels, "unstructured", 0.01)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out == 0, ref == 0)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-5)


def test_a_hessian_that_is_not_finite_falls_back_to_magnitude(caplog):
    from spdy_onnx.reconstruct import _reconstruct_site
    model = tiny.mlp(width=96, depth=1, seq=4)
    site = graph.find_sites(model)[0][0]
    w = graph.read_weights(model, [site])[site.name]
    _, _, h = _layer_problem(cols=96)
    h[3, 3] = np.inf
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        out = _reconstruct_site(site, w, h, [0.0, 0.5], "unstructured", 0.01)
    assert "not finite" in caplog.text
    np.testing.assert_array_equal(out[1], MagnitudeDatabase([site], {site.name: w}, [0.0, 0.5]).weight(site.name, 1))


def _mlp_and_data(tmp_path, n=16):
    model = tiny.mlp(width=32, depth=3, seq=4)
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((n, 4, 32)).astype(np.float32))
    specs = {"x": ((1, 4, 32), np.dtype(np.float32))}
    return model, path, specs


def test_load_data_file_and_folder(tmp_path):
    model, path, specs = _mlp_and_data(tmp_path)
    data = calibrate.load_data(path, specs, samples=10)
    assert data["x"].shape == (10, 4, 32)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(5):
        np.savez(folder / f"{i:03d}.npz", x=data["x"][i:i + 1])   # with a batch axis of 1
    again = calibrate.load_data(folder, specs)
    np.testing.assert_array_equal(again["x"], data["x"][:5])


@pytest.mark.parametrize("arrays,match", [
    ({"y": np.zeros((4, 4, 32), np.float32)}, "lacks model input"),
    ({"x": np.zeros((4, 4, 31), np.float32)}, "expects (4, 32)"),
    ({"x": np.zeros((4, 4, 32), np.int64)}, "expects float32"),
    ({"x": np.zeros((0, 4, 32), np.float32)}, "empty"),
    ({"x": np.full((4, 4, 32), np.nan, np.float32)}, "NaN"),
])
def test_bad_calibration_data(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(SpdyError, match=match.replace("(", r"\(").replace(")", r"\)")):
        calibrate.load_data(p, {"x": ((1, 4, 32), np.dtype(np.float32))})


def test_corrupt_calibration_file(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SpdyError, match="cannot read calibration file"):
        calibrate.load_data(p, {"x": ((1, 4, 32), np.dtype(np.float32))})


@pytest.mark.parametrize("flush_elements", [calibrate.FLUSH_ELEMENTS, 100])
def test_hessians_match_direct_computation(tmp_path, monkeypatch, flush_elements):
    # 100 elements: every sample's rows go through their own GEMM and are summed in float64
    monkeypatch.setattr(calibrate, "FLUSH_ELEMENTS", flush_elements)
    model, path, specs = _mlp_and_data(tmp_path)
    data = calibrate.load_data(path, specs)
    sites, _ = graph.find_sites(model)
    hs = calibrate.hessians(model, sites, data, 1, progress=False)
    x = data["x"].reshape(-1, 32).astype(np.float64)
    np.testing.assert_allclose(hs["matmul_0"], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    assert hs["matmul_1"].shape == (32, 32)


def test_a_gemm_with_trans_a_gets_the_hessian_of_its_rows(tmp_path):
    """Gemm(transA=1) reads its activation as (K, M): the reduction runs down its columns."""
    from onnx import TensorProto, helper
    k, m, n = 32, 32, 48           # K == M: a transposed H would have the right shape and be wrong
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [k, n], rng.standard_normal(k * n).astype(np.float32))
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [k, m])
    g = helper.make_graph([helper.make_node("Reshape", ["a", "shape"], ["a2"], name="flat"),
                           helper.make_node("Gemm", ["a2", "w"], ["y"], name="gemm", transA=1)], "ta",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k, m])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w, shape])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    scales = np.geomspace(0.01, 10, k).astype(np.float32)[:, None]      # per-K-row scales
    a = (rng.standard_normal((8, k, m)) * scales).astype(np.float32)
    np.savez(tmp_path / "c.npz", a=a)
    data = calibrate.load_data(tmp_path / "c.npz", {"a": ((1, k, m), np.dtype(np.float32))})
    sites, _ = graph.find_sites(model)
    assert sites[0].trans_a
    h = calibrate.hessians(model, sites, data, 1, progress=False)["gemm"]
    rows = a.transpose(0, 2, 1).reshape(-1, k).astype(np.float64)      # (samples * M, K)
    np.testing.assert_allclose(h, rows.T @ rows / rows.shape[0], rtol=1e-4, atol=1e-6)


def test_evaluator_single_session_and_losses(tmp_path):
    model, path, specs = _mlp_and_data(tmp_path)
    data = calibrate.load_data(path, specs)
    sites, _ = graph.find_sites(model)
    levels = [0.0, 0.5, 0.9]
    db = MagnitudeDatabase(sites, graph.read_weights(model, sites), levels)
    ev = Evaluator(model, sites, db, data, loss="auto", specs=specs, eval_samples=8)
    assert ev.loss_name == "mse"
    assert ev.loss([0, 0, 0]) == pytest.approx(0.0, abs=1e-12)
    light, heavy = ev.loss([1, 0, 0]), ev.loss([2, 2, 2])
    assert 0 < light < heavy
    session = ev.session
    ev.loss([1, 1, 1])
    assert ev.session is session and ev.evaluations == 4
    ev.loss([1, 1, 1])
    assert ev.evaluations == 4  # memoised



@pytest.mark.parametrize("eval_samples,batch,expected_feeds", [(8, 1, 8), (3, 2, 1), (1, 4, 1), (12, 4, 3)])
def test_evaluator_scores_the_requested_samples(tmp_path, eval_samples, batch, expected_feeds):
    """--eval-samples sets how many calibration samples a candidate is scored on (at least one batch),
    and the loss is the mean over exactly those samples."""
    model, path, _ = _mlp_and_data(tmp_path)
    model = tiny.mlp(width=32, depth=3, seq=4, batch=batch)
    specs = {"x": ((batch, 4, 32), np.dtype(np.float32))}
    data = calibrate.load_data(path, specs)
    sites, _ = graph.find_sites(model)
    db = MagnitudeDatabase(sites, graph.read_weights(model, sites), [0.0, 0.5, 0.9])
    ev = Evaluator(model, sites, db, data, loss="mse", specs=specs, eval_samples=eval_samples)
    assert len(ev.feeds) == expected_feeds
    n = expected_feeds * batch
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    from spdy_onnx.passes.prune import write_weights
    pruned = write_weights(pruned, {s.weight: db.weight(s.name, 2) for s in sites})
    psess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    losses = [normalised_mse(sess.run(None, {"x": data["x"][i:i + batch]})[0],
                             psess.run(None, {"x": data["x"][i:i + batch]})[0]) for i in range(0, n, batch)]
    assert ev.loss([2, 2, 2]) == pytest.approx(float(np.mean(losses)), rel=1e-5)

def test_losses():
    ref = np.random.default_rng(0).standard_normal((4, 10))
    assert kl_divergence(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(ref, ref + 1.0) == pytest.approx(0.0, abs=1e-12)   # softmax shift invariance
    assert kl_divergence(ref, -ref) > 0
    assert normalised_mse(ref, ref) == 0 and normalised_mse(ref, 0 * ref) == pytest.approx(1.0)


def test_search_finds_brute_force_optimum_on_small_instance():
    rng = np.random.default_rng(3)
    n_sites, n_levels = 4, 4
    times = np.sort(rng.uniform(0.2, 1.0, (n_sites, n_levels)), axis=1)[:, ::-1]
    sensitivity = rng.uniform(0.1, 5.0, n_sites)
    budget = times[:, 0].sum() * 0.6

    def true_loss(picks):  # a separable, site-dependent loss the search must discover
        return float(sum(sensitivity[i] * (j / 3) ** 1.5 for i, j in enumerate(picks)))

    shape = error_shape(n_levels)

    def profile_of(c):
        return solve_dp(np.asarray(c)[:, None] * shape[None, :], times, budget)

    c, picks, loss, stats = spdy_search(n_sites, n_levels, profile_of, true_loss, seed=0, progress=False)
    feasible = [p for p in itertools.product(range(n_levels), repeat=n_sites)
                if times[np.arange(n_sites), p].sum() <= budget]
    best = min(true_loss(p) for p in feasible)
    assert times[np.arange(n_sites), picks].sum() <= budget
    assert loss <= best * 1.02 + 1e-9
    assert stats["evaluations"] >= 100
    # seeded: the same seed gives the same result
    c2, picks2, loss2, _ = spdy_search(n_sites, n_levels, profile_of, true_loss, seed=0, progress=False)
    assert list(picks2) == list(picks) and np.array_equal(c, c2)


def test_search_budget():
    assert parse_budget("600") == (600, None)
    assert parse_budget("5m") == (None, 300)
    assert parse_budget("90s") == (None, 90)
    for bad in ["abc", "-3", "0", "0.5", "10.5"]:
        with pytest.raises(SpdyError):
            parse_budget(bad)
    calls = []
    spdy_search(5, 3, lambda c: np.argsort(c) % 3, lambda p: calls.append(1) or float(np.sum(p)), max_evals=37,
                progress=False)
    assert len(calls) <= 37


def _rugged_instance(seed=5, n_sites=8, n_levels=6, share=0.55):
    """A non-separable loss with many local optima under a tight budget: where local search stalls."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.2, 1.0, (n_sites, n_levels)), axis=1)[:, ::-1]
    budget = times[:, 0].sum() * share
    pair = rng.normal(0, 1, (n_sites, n_sites))
    base = rng.uniform(0.1, 3.0, n_sites)

    def loss(picks):
        x = np.asarray(picks, dtype=np.float64) / (n_levels - 1)
        return float(base @ x ** 2 + 0.8 * np.abs(np.sin(3 * x @ pair @ x)))

    shape = error_shape(n_levels)

    def profile_of(c):
        return solve_dp(np.asarray(c)[:, None] * shape[None, :], times, budget)

    return n_sites, n_levels, profile_of, loss


def test_budget_left_after_the_local_search_goes_to_restarts_that_only_improve():
    n_sites, n_levels, profile_of, loss = _rugged_instance()
    common = dict(seed=1, n_init=20, patience=20, max_evals=400, progress=False)
    _, _, stop_loss, stop = spdy_search(n_sites, n_levels, profile_of, loss, restarts=False, **common)
    _, picks, more_loss, more = spdy_search(n_sites, n_levels, profile_of, loss, **common)
    assert stop["restarts"] == 0 and stop["evaluations"] < 400      # converged early: budget left unused
    assert more["restarts"] > 0 and stop["evaluations"] < more["evaluations"] <= 400   # budget went to restarts
    assert more_loss < stop_loss and more_loss == pytest.approx(loss(picks))   # never worse; here better
    # without any budget there is nothing to spend: the paper's schedule, run to its end
    _, _, _, free = spdy_search(n_sites, n_levels, profile_of, loss, seed=1, n_init=20, patience=20, progress=False)
    assert free["restarts"] == 0
    # a space the search has exhausted ends the restarts long before a large budget does
    small = _rugged_instance(n_sites=2, n_levels=3, share=0.9)
    _, _, _, done = spdy_search(*small, seed=1, n_init=5, patience=5, max_evals=100_000, progress=False)
    assert 1 <= done["restarts"] and done["evaluations"] < 1_000


def test_a_re_solve_gets_a_share_of_the_first_search():
    """After a draft moves the aim, the re-solve starts from the best c and gets resolve_evaluations(first)."""
    from spdy_onnx import search as search_mod
    curves = np.tile((np.arange(5) / 4.0) ** 2, (6, 1)) * np.linspace(0.5, 3, 6)[:, None]
    times = np.tile(np.linspace(1.0, 0.3, 5), (6, 1))
    s = SpdySearch(search_budget="400", progress=False, prior="shape", sites=[_Named(i) for i in range(6)],
                   levels=list(np.linspace(0, 0.9, 5)), database=None, evaluator=_CurveEvaluator(curves))
    first = s.choose(times, 4.5)
    second = s.choose(times, 3.5)
    assert times[np.arange(6), second].sum() <= 3.5 < times[np.arange(6), first].sum() + 1e-9
    n_first = s.info["search"][0]["evaluations"]
    assert s.info["search"][1]["evaluations"] == search_mod.resolve_evaluations(n_first)
    assert search_mod.resolve_evaluations(10) == search_mod.RESOLVE_EVALS          # never fewer than this
    assert search_mod.resolve_evaluations(4000) == round(search_mod.RESOLVE_SHARE * 4000)


def _masked_model():
    """x (1,4,32) * mask -> MatMul: a stand-in for an encoder fed padded sentences."""
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Mul", ["x", "m3"], ["xm"]),
             helper.make_node("MatMul", ["xm", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32]),
                                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([2], np.int64), "axes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_padding_tokens_are_left_out_of_hessians_and_losses():
    model = _masked_model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4, 32)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], np.int64)
    data = {"x": x, "attention_mask": mask}
    sites, _ = graph.find_sites(model)
    h = calibrate.hessians(model, sites, data, 1, progress=False)["mm"]
    real = x[mask.astype(bool)].astype(np.float64)
    np.testing.assert_allclose(h, real.T @ real / real.shape[0], rtol=1e-4, atol=1e-6)
    specs = {"x": ((1, 4, 32), np.dtype(np.float32)), "attention_mask": ((1, 4), np.dtype(np.int64))}
    db = MagnitudeDatabase(sites, graph.read_weights(model, sites), [0.0, 0.5])
    ev = Evaluator(model, sites, db, data, specs=specs)
    assert all(m is not None for m in ev.masks)
    # a loss computed over real tokens only equals the one computed by hand
    out = [ev._run(f, {"w": db.weight("mm", 1)})[0] for f in ev.feeds]
    by_hand = np.mean([normalised_mse(r[0][m], o[m]) for r, o, m in zip(ev.reference, out, ev.masks)])
    assert ev.loss([1]) == pytest.approx(by_hand)
    assert calibrate.token_mask({"x": x[:1]}) is None


@pytest.mark.parametrize("case", ["plain", "stacked", "cross"])
def test_sparse_refit_matches_the_dense_one(monkeypatch, case):
    """The refit of sparse masks on the kept weights alone (a sparse product) gives the dense GEMM path's
    weights: the same conjugate-gradient iterates, for a plain refit, stacked levels and the sequential
    correction's cross term."""
    w, x, h = _layer_problem(rows=24, cols=80)
    h[7, :] = h[:, 7] = 0.0                          # a dead input
    chol, dead = obs.inverse_cholesky(h)
    p = obs.prune_levels(w, chol, dead, [0.9, 0.95])
    stack = p.reshape(-1, w.shape[1]) if case == "stacked" else p[0]
    cross = None
    if case == "cross":
        rng = np.random.default_rng(3)
        xp = x + 0.1 * rng.standard_normal(x.shape)
        cross = x.T @ xp / x.shape[0]
        h = xp.T @ xp / x.shape[0]
    monkeypatch.setattr(obs, "_ON_KEPT", False)
    dense = obs.refine(w, stack, h, cross=cross)
    monkeypatch.setattr(obs, "_ON_KEPT", True)
    monkeypatch.setattr(obs, "SPARSE_REFIT_DENSITY", 1.0)
    sparse = obs.refine(w, stack, h, cross=cross)
    np.testing.assert_array_equal(sparse == 0, stack == 0)
    np.testing.assert_allclose(sparse, dense, rtol=1e-4, atol=1e-5)
    assert not np.allclose(sparse, stack)            # the refit moved the kept weights


def test_levels_swept_together_match_one_at_a_time(monkeypatch):
    """The stacked sweep (all levels at once, in chunks) gives each level's own single sweep."""
    w, _, h = _layer_problem(rows=24, cols=80)
    chol, dead = obs.inverse_cholesky(h)
    levels = [0.3, 0.6, 0.9]
    one_by_one = [obs.prune_levels(w, chol, dead, [s])[0] for s in levels]
    # a chunk of two levels, then one: the chunking must not change anything
    monkeypatch.setattr(obs, "STACK_BYTES", 2 * w.size * 4)
    stacked = obs.prune_levels(w, chol, dead, levels)
    for s, a, b in zip(levels, one_by_one, stacked):
        np.testing.assert_array_equal(a == 0, b == 0)
        assert np.count_nonzero(b == 0) == round(s * w.size)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    fitted = obs.best_reconstruction_levels(w, h, chol, dead, levels)
    for s, b, f in zip(levels, stacked, fitted):
        np.testing.assert_array_equal(b == 0, f == 0)
        np.testing.assert_allclose(f, obs.best_reconstruction(w, h, chol, dead, s), rtol=1e-4, atol=1e-5)
        assert obs.reconstruction_error(w, f, h) <= obs.reconstruction_error(w, b, h)


def _two_head_model():
    """x -> (x @ wa, x @ wb, argmax(x @ wa)): two float heads and an integer output."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    wa = (rng.standard_normal((32, 8)) / 6).astype(np.float32)
    wb = (rng.standard_normal((32, 16)) / 6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="head_a"),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="head_b"),
             helper.make_node("ArgMax", ["a"], ["cls"], axis=-1, keepdims=0)]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32])],
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4, 8]),
                           helper.make_tensor_value_info("cls", TensorProto.INT64, [1, 4]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 16])],
                          [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_every_float_output_counts_in_the_loss():
    """A second head (a QA model's end logits, a detector's boxes) must not be invisible to the search:
    pruning only the site that feeds it raises the loss, by the mean of the per-output losses."""
    model = _two_head_model()
    data = {"x": np.random.default_rng(0).standard_normal((8, 4, 32)).astype(np.float32)}
    specs = {"x": ((1, 4, 32), np.dtype(np.float32))}
    sites, _ = graph.find_sites(model)
    assert [s.name for s in sites] == ["head_a", "head_b"]
    db = MagnitudeDatabase(sites, graph.read_weights(model, sites), [0.0, 0.5, 0.9])
    ev = Evaluator(model, sites, db, data, specs=specs, eval_samples=8)
    assert ev.outputs == ["a", "b"] and ev.loss_name == "mse+mse"     # the integer output is left out
    assert ev.loss([0, 0]) == pytest.approx(0.0, abs=1e-12)
    only_b = ev.loss([0, 2])
    assert only_b > 0
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wb = db.weight("head_b", 2)
    by_hand = np.mean([0.5 * (0.0 + normalised_mse(sess.run(["b"], {"x": data["x"][i:i + 1]})[0],
                                                   data["x"][i:i + 1] @ wb)) for i in range(8)])
    assert only_b == pytest.approx(by_hand, rel=1e-4)
    # each head's own loss: the pruned one carries it all, and their mean is the search's loss
    per_output = ev.output_losses(ev.weights_of([0, 2]))
    assert per_output["a"] == pytest.approx(0.0, abs=1e-12) and per_output["b"] == pytest.approx(2 * only_b)
    assert ev.loss_of_weights(ev.weights_of([0, 2])) == pytest.approx(only_b)


def test_the_correction_tunes_for_every_float_output():
    pytest.importorskip("torch")
    from spdy_onnx import correct
    model = _two_head_model()
    data = {"x": np.random.default_rng(0).standard_normal((64, 4, 32)).astype(np.float32)}
    sites, _ = graph.find_sites(model)
    db = MagnitudeDatabase(sites, graph.read_weights(model, sites), [0.0, 0.5, 0.9])
    weights = {"wa": db.weight("head_a", 0), "wb": db.weight("head_b", 2)}   # only the second head pruned
    tuned, summary = correct.global_correction(model, sites, weights, data, loss="mse+mse", batch_size=1,
                                               epochs=2, max_seconds=None, seed=0)
    assert summary["loss_before"] > 0 and summary["loss_after"] < summary["loss_before"]
    assert "wb" in tuned and np.array_equal(tuned["wb"] == 0, weights["wb"] == 0)   # zeros kept


def test_auto_loss_reads_the_output_shape_and_name():
    from spdy_onnx.evaluate import choose_loss
    assert choose_loss("auto", (4, 1000)) == "kl"                        # class scores
    assert choose_loss("auto", (4, 1)) == "mse"                          # one regression value
    assert choose_loss("auto", (4, 1000), "output") == "kl"
    # pooled vectors are kept, not scored as classes
    for name in ("sentence_embedding", "pooler_output", "image_embeds", "features", "last_hidden_state"):
        assert choose_loss("auto", (1, 384), name) == "mse", name
    assert choose_loss("auto", (1, 10), "pooled_logits") == "kl"
    # a generic name: unit-length rows are an L2-normalised embedding, others class scores
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((4, 384))
    assert choose_loss("auto", rows.shape, "out", rows / np.linalg.norm(rows, axis=1, keepdims=True)) == "mse"
    assert choose_loss("auto", rows.shape, "out", rows) == "kl"
    assert choose_loss("auto", (1, 128, 384), "last_hidden_state") == "mse"
    assert choose_loss("auto", (1, 64, 8000), "logits") == "kl"          # a language model, per token
    assert choose_loss("auto", (1, 64, 8000), "out") == "mse"
    assert choose_loss("mse", (4, 1000)) == "mse" and choose_loss("kl", (1, 8, 3), "x") == "kl"


def _softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_auto_loss_reads_probabilities_and_sigmoids():
    """A graph that ends in Softmax gives distributions: KL of those, not of their softmax; one that ends
    in Sigmoid gives independent probabilities: MSE, not a softmax across them."""
    from spdy_onnx.evaluate import choose_loss
    rng = np.random.default_rng(0)
    logits = 3 * rng.standard_normal((4, 1000))
    probs = _softmax(logits)
    assert choose_loss("auto", probs.shape, "output", probs) == "kl-probs"
    assert choose_loss("kl", probs.shape, "output", probs) == "kl-probs"      # kl means the distributions' KL
    assert choose_loss("mse", probs.shape, "output", probs) == "mse"
    tokens = _softmax(rng.standard_normal((1, 8, 50)))                         # per-token probabilities
    assert choose_loss("auto", tokens.shape, "probs", tokens) == "kl-probs"
    assert choose_loss("auto", logits.shape, "output", logits) == "kl"
    sig = 1 / (1 + np.exp(-logits[:, :20]))
    assert choose_loss("auto", sig.shape, "output", sig) == "mse"
    assert choose_loss("auto", (4, 1), "p", sig[:, :1]) == "mse"               # one column: no distribution
    relu = np.maximum(logits[:, :20], 0)                                       # non-negative, not bounded
    assert choose_loss("auto", relu.shape, "output", relu) == "kl"


def test_auto_loss_reads_what_made_the_output():
    """A rank-2 output under a generic name is class scores only when a linear op made it: after
    LayerNorm, Tanh or pooling it is a vector to keep (CLIP's pooled output, BERT's pooler)."""
    from onnx import TensorProto, helper, numpy_helper

    from spdy_onnx.evaluate import choose_loss, producer_op
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["scores"]),
             helper.make_node("Identity", ["scores"], ["out"]),
             helper.make_node("Tanh", ["scores"], ["t"]),
             helper.make_node("Flatten", ["t"], ["pooled"]),
             helper.make_node("GlobalAveragePool", ["img"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["feats"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                                       helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 2, 2])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                           for n in ("out", "pooled", "feats", "x")], [w])
    m = helper.make_model(g)
    assert [producer_op(m, n) for n in ("out", "pooled", "feats", "x")] == ["MatMul", "Tanh", "GlobalAveragePool", None]
    rows = np.random.default_rng(0).standard_normal((4, 384))
    assert choose_loss("auto", rows.shape, "out", rows, "MatMul") == "kl"
    assert choose_loss("auto", rows.shape, "out", rows, "Gemm") == "kl"
    for op in ("LayerNormalization", "Tanh", "GlobalAveragePool", "ReduceMean", "Relu"):
        assert choose_loss("auto", rows.shape, "out", rows, op) == "mse", op
    assert choose_loss("auto", rows.shape, "logits", rows, "Tanh") == "kl"   # the name says so
    assert choose_loss("kl", rows.shape, "out", rows, "Tanh") == "kl"         # as asked


def test_a_head_with_an_offset_that_lost_every_sample_scores_about_one():
    """A regression head around 3 (spread 0.3) collapsed to its mean: over its raw energy the loss was
    0.01 and looked fine; over its spread around the mean it is about 1, all of it lost."""
    from spdy_onnx.evaluate import centred_scale, combined_loss
    rng = np.random.default_rng(4)
    feeds = [3 + 0.3 * rng.standard_normal((4, 1)) for _ in range(8)]
    collapsed = [np.full_like(r, 3.0) for r in feeds]
    scale = centred_scale(feeds)
    assert scale == pytest.approx(np.var(np.concatenate(feeds)), rel=1e-9)
    raw = np.mean([combined_loss(["mse"], [r], [c], None) for r, c in zip(feeds, collapsed)])
    centred = np.mean([combined_loss(["mse"], [r], [c], None, [scale]) for r, c in zip(feeds, collapsed)])
    assert raw < 0.02 and 0.8 < centred < 1.2
    assert centred_scale([np.ones((4, 3))] * 3) is None                  # a constant output: raw energy


def test_the_evaluator_centres_per_sample_outputs_only():
    """(batch, k) MSE outputs get a spread to normalise by; token states (batch, seq, width) and KL
    outputs keep theirs, so MiniLM-like models score as before."""
    model = _two_head_model()
    data = {"x": np.random.default_rng(0).standard_normal((8, 4, 32)).astype(np.float32)}
    specs = {"x": ((1, 4, 32), np.dtype(np.float32))}
    sites, _ = graph.find_sites(model)
    db = MagnitudeDatabase(sites, graph.read_weights(model, sites), [0.0, 0.5, 0.9])
    ev = Evaluator(model, sites, db, data, specs=specs, eval_samples=8)
    assert ev.scales == [None, None]                                    # rank-3 outputs
    from spdy_onnx.evaluate import centred_scale
    pooled = [np.asarray(r[0]).mean(axis=1) for r in ev.reference]       # what a (batch, k) head would give
    assert centred_scale(pooled) > 0


def test_bounded_outputs_of_any_rank_are_centred_too():
    """A detector's (batch, anchors, 4) sigmoid boxes sit near 0.5: over their energy, boxes that lost
    85% of what each sample says scored 2.6e-07 and looked untouched."""
    from onnx import TensorProto, helper, numpy_helper

    from spdy_onnx.evaluate import combined_loss
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array((rng.standard_normal((32, 16)) / 60).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"], name="box_head"),
             helper.make_node("Sigmoid", ["z"], ["boxes"])]
    g = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32])],
                          [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 16])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = {"x": rng.standard_normal((8, 4, 32)).astype(np.float32)}
    sites, _ = graph.find_sites(model)
    db = MagnitudeDatabase(sites, graph.read_weights(model, sites), [0.0, 0.5, 0.9])
    ev = Evaluator(model, sites, db, data, specs={"x": ((1, 4, 32), np.dtype(np.float32))}, eval_samples=8)
    assert ev.loss_names == ["mse"] and ev.scales[0] is not None
    # every sample's boxes collapsed to the offset: about 1 with the spread, nothing over the energy
    refs = [r[0] for r in ev.reference]
    flat = [np.full_like(r, 0.5) for r in refs]
    centred = np.mean([combined_loss(["mse"], [r], [f], None, ev.scales) for r, f in zip(refs, flat)])
    raw = np.mean([combined_loss(["mse"], [r], [f], None, [None]) for r, f in zip(refs, flat)])
    assert raw < 0.01 and centred > 0.5


def test_segmentation_scores_are_compared_per_pixel_over_their_classes():
    """(N, classes, H, W) logits: KL over axis 1, per pixel. Over the last axis (the width) a change that
    flips most pixels' classes, the same along each row, was invisible."""
    from spdy_onnx.evaluate import choose_loss, combined_loss, kl_divergence
    rng = np.random.default_rng(2)
    ref = 3 * rng.standard_normal((2, 5, 4, 1)).repeat(6, axis=3)       # constant along the width
    out = np.roll(ref, 1, axis=1)                                        # every pixel's classes permuted
    kind = choose_loss("auto", ref.shape, "logits", ref)
    assert kind == "kl-channels"
    per_pixel = kl_divergence(np.moveaxis(ref, 1, -1), np.moveaxis(out, 1, -1))
    assert combined_loss([kind], [ref], [out], None) == pytest.approx(per_pixel) and per_pixel > 1
    assert kl_divergence(ref, out) < 1e-9                                # what the width axis saw
    probs = _softmax(ref, axis=1)
    assert choose_loss("auto", probs.shape, "out", probs) == "kl-probs-channels"
    assert choose_loss("kl", ref.shape, "out", ref) == "kl-channels"
    assert choose_loss("auto", ref.shape, "out", ref) == "mse"          # a feature map
    assert choose_loss("mse", probs.shape, "out", probs) == "mse"


def _graph_ending_in(*nodes, inits=()):
    from onnx import TensorProto, helper
    g = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(g)


def test_the_class_axis_follows_what_made_the_output():
    """Classes on axis 1 after a conv ((N, C, H, W), and (N, C, T) from a Conv1d); last after a matmul
    or a Transpose to channels-last (an NHWC export). KL over the wrong axis was blind to class flips."""
    from onnx import helper, numpy_helper

    from spdy_onnx.evaluate import choose_loss, class_axis
    w = numpy_helper.from_array(np.ones((4, 4, 1), np.float32), "w")
    conv1d = _graph_ending_in(helper.make_node("Conv", ["x", "w"], ["logits"]), inits=[w])
    nhwc = _graph_ending_in(helper.make_node("Conv", ["x", "w"], ["c"]),
                            helper.make_node("Transpose", ["c"], ["logits"], perm=[0, 2, 3, 1]), inits=[w])
    tokens = _graph_ending_in(helper.make_node("MatMul", ["x", "w"], ["logits"]), inits=[w])
    other = _graph_ending_in(helper.make_node("Relu", ["x"], ["logits"]))
    assert class_axis(conv1d, "logits", 3) == 1 and class_axis(nhwc, "logits", 4) == -1
    assert class_axis(tokens, "logits", 3) == -1
    assert class_axis(other, "logits", 3) == -1 and class_axis(other, "logits", 4) == 1
    rng = np.random.default_rng(3)
    frames = rng.standard_normal((2, 5, 30))                           # (N, classes, T)
    assert choose_loss("auto", frames.shape, "logits", frames, "Conv", 1) == "kl-channels"
    pixels = rng.standard_normal((2, 6, 6, 5))                         # (N, H, W, classes)
    assert choose_loss("auto", pixels.shape, "logits", pixels, "Transpose", -1) == "kl"
    assert choose_loss("auto", pixels.shape, "out", _softmax(pixels), "Transpose", -1) == "kl-probs"


def test_log_probabilities_get_kl_and_kl_needs_a_class_axis(caplog):
    from spdy_onnx.evaluate import choose_loss
    rng = np.random.default_rng(5)
    logp = np.log(_softmax(rng.standard_normal((4, 1, 10))))
    assert choose_loss("auto", logp.shape, "out", logp, "LogSoftmax") == "kl"   # any name, any rank
    assert choose_loss("auto", logp[:, 0].shape, "log_probs", logp[:, 0], "LogSoftmax") == "kl"
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        assert choose_loss("kl", (4, 1), "score", np.ones((4, 1))) == "mse"      # KL of one column is 0
        assert choose_loss("kl", (4,), "score", np.ones(4)) == "mse"             # not a softmax over the batch
    assert "has no class axis" in caplog.text


def test_kl_of_probabilities_is_the_kl_of_the_logits_they_came_from():
    """Brute force: the distributions' KL equals the logits' KL; the softmax of probabilities hides it."""
    from spdy_onnx.evaluate import kl_divergence, kl_of_probabilities
    rng = np.random.default_rng(1)
    a, b = 3 * rng.standard_normal((6, 100)), 3 * rng.standard_normal((6, 100))
    expected = kl_divergence(a, b)
    assert kl_of_probabilities(_softmax(a), _softmax(b)) == pytest.approx(expected, rel=1e-6)
    assert kl_divergence(_softmax(a), _softmax(b)) < expected / 20
    assert kl_of_probabilities(_softmax(a), _softmax(a)) == 0
    zero = _softmax(b)
    zero[:, 0] = 0.0                                                           # an underflowed probability
    assert np.isfinite(kl_of_probabilities(_softmax(a), zero))


def test_the_correction_minimises_the_centred_loss_the_search_scores():
    torch = pytest.importorskip("torch")
    from spdy_onnx.correct import torch_loss
    from spdy_onnx.evaluate import combined_loss
    rng = np.random.default_rng(0)
    ref, out = 2 + rng.standard_normal((5, 3)), 2 + rng.standard_normal((5, 3))
    expected = combined_loss(["mse"], [ref], [out], None, [0.7])
    got = torch_loss("mse", torch.from_numpy(out), torch.from_numpy(ref), None, 0.7)
    assert float(got) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind,shape,masked", [("kl", (3, 10), False), ("kl", (2, 5, 7), True),
                                               ("kl", (2, 5, 7), False), ("mse", (2, 5, 7), True),
                                               ("mse", (3, 10), False), ("kl-probs", (3, 10), False),
                                               ("kl-probs", (2, 5, 7), True), ("kl-channels", (2, 5, 3, 4), False),
                                               ("kl-probs-channels", (2, 5, 3, 4), False)])
def test_the_correction_minimises_the_loss_the_search_scores(kind, shape, masked):
    """The torch loss of the global correction equals the evaluator's numpy loss on the same outputs."""
    torch = pytest.importorskip("torch")
    from spdy_onnx.correct import torch_loss
    from spdy_onnx.evaluate import combined_loss
    rng = np.random.default_rng(0)
    ref, out = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    if kind.startswith("kl-probs"):
        axis = 1 if kind.endswith("-channels") else -1
        ref, out = _softmax(ref, axis).astype(np.float32), _softmax(out, axis).astype(np.float32)
    mask = (rng.random(shape[:2]) < 0.6) if masked else None
    if mask is not None:
        mask[:, 0] = True
    expected = combined_loss([kind], [ref], [out], mask)
    got = torch_loss(kind, torch.from_numpy(out), torch.from_numpy(ref),
                     None if mask is None else torch.from_numpy(mask))
    assert float(got) == pytest.approx(expected, rel=1e-4)


class _CurveEvaluator:
    """Loss = sum over sites of a known per-site curve; counts what it is asked."""

    def __init__(self, curves):
        self.curves = np.asarray(curves, dtype=np.float64)
        self.sites = list(range(self.curves.shape[0]))
        self.asked = []

    def is_cached(self, picks):
        return False

    @property
    def evaluations(self):
        return len(self.asked)

    def loss(self, picks):
        self.asked.append(tuple(int(j) for j in picks))
        return 0.25 + float(self.curves[np.arange(len(picks)), picks].sum())


def test_curve_levels_spread_evenly_and_keep_the_sparsest():
    assert curve_levels(13, 4) == [3, 6, 9, 12]
    assert curve_levels(13, 6) == [2, 4, 6, 8, 10, 12]
    assert curve_levels(13, 12) == list(range(1, 13))
    for n, k in itertools.product(range(3, 15), range(1, 14)):
        levels = curve_levels(n, k)
        assert levels[-1] == n - 1 and levels == sorted(set(levels)) and 1 <= len(levels) <= k


def test_loss_curves_on_some_levels_are_exact_there_and_linear_between():
    rng = np.random.default_rng(0)
    curves = np.cumsum(rng.uniform(0, 1, (3, 7)), axis=1)
    curves[:, 0] = 0
    full = single_site_losses(_CurveEvaluator(curves), 7, progress=False)
    np.testing.assert_allclose(full, curves)
    ev = _CurveEvaluator(curves)
    some = single_site_losses(ev, 7, levels=[3, 6], progress=False)
    assert len(ev.asked) == 1 + 3 * 2                      # the dense base, then 2 levels per site
    np.testing.assert_allclose(some[:, [0, 3, 6]], curves[:, [0, 3, 6]])
    np.testing.assert_allclose(some[:, 1], curves[:, 3] / 3)
    np.testing.assert_allclose(some[:, 5], (curves[:, 3] + 2 * curves[:, 6]) / 3)
    with pytest.raises(ValueError):
        single_site_losses(ev, 7, levels=[2, 4], progress=False)   # the sparsest is missing


def test_auto_prior_spends_three_quarters_of_an_evaluation_budget_on_curves():
    curves = np.tile((np.arange(13) / 12.0) ** 2, (4, 1))
    ev = _CurveEvaluator(curves)
    search = SpdySearch(search_budget="40", progress=False, sites=[_Named(i) for i in range(4)],
                        levels=list(np.linspace(0, 0.9, 13)), database=None, evaluator=ev)
    shape = search._error_shape(4, 13)
    # 3/4 of 40 evaluations = 30: 7 sparse levels per site of the 12
    assert search.info["search_prior"]["levels_measured"] == curve_levels(13, 7)
    assert len(ev.asked) == 1 + 4 * len(curve_levels(13, 7))
    assert search.max_evals == 40 - len(ev.asked)               # what was run comes out of the budget
    np.testing.assert_allclose(shape[:, curve_levels(13, 7)], curves[:, curve_levels(13, 7)])


def test_curves_from_the_journal_do_not_come_out_of_an_evaluation_budget():
    """Every curve already journaled (an earlier run with a bigger budget): all levels are used, free. The
    search was left 40 - 48 -> 1 evaluation, so the same command searched differently on a warm cache."""
    class Journaled(_CurveEvaluator):
        def is_cached(self, picks):
            return True

        @property
        def evaluations(self):      # memoised: nothing is run
            return 0
    curves = np.tile((np.arange(13) / 12.0) ** 2, (4, 1))
    search = SpdySearch(search_budget="40", progress=False, sites=[_Named(i) for i in range(4)],
                        levels=list(np.linspace(0, 0.9, 13)), database=None, evaluator=Journaled(curves))
    search._error_shape(4, 13)
    assert search.info["search_prior"]["levels_measured"] == list(range(1, 13))
    assert search.max_evals == 40


def test_one_slow_evaluation_does_not_decide_the_prior():
    """auto times several evaluations and takes the median: one stall (a noisy machine) must not
    switch a model whose curves fit the budget to the quadratic shape."""
    class StallsOnce(_CurveEvaluator):
        def loss(self, picks):
            if len(self.asked) == 1:          # the first evaluation after the dense base
                time.sleep(0.5)
            return super().loss(picks)
    ev = StallsOnce(np.tile((np.arange(13) / 12.0) ** 2, (4, 1)))
    search = SpdySearch(search_budget="2s", progress=False, sites=[_Named(i) for i in range(4)],
                        levels=list(np.linspace(0, 0.9, 13)), database=None, evaluator=ev)
    search._error_shape(4, 13)
    assert search.info["search_prior"]["kind"] == "losses"
    assert search.info["search_prior"]["seconds_per_evaluation"] < 0.1


def test_measured_curves_leave_most_of_a_small_budget_to_local_search():
    """The random starts take at most a third of the evaluations the budget affords."""
    def search(budget, per_eval=None):
        s = SpdySearch(search_budget=budget, progress=False, sites=[_Named(i) for i in range(4)],
                       levels=[0.0, 0.5, 0.9], database=None, evaluator=_CurveEvaluator(np.zeros((4, 3))))
        if per_eval is not None:
            s.info["search_prior"] = {"seconds_per_evaluation": per_eval}
        return s._random_starts()
    assert search("64") == 21
    assert search("3000") == 100                   # the paper's 100 when the budget is large
    assert search("30s", per_eval=0.25) == 40      # 120 evaluations fit in 30 s
    assert search("30s") == 100                    # no timing known: the paper's schedule


class _Named:
    def __init__(self, i):
        self.name = f"s{i}"


def test_per_site_losses_price_a_shared_weight_once():
    """Sites that share a weight are one pruning: its loss curve sits on the first of them, and the others'
    are zero, so that the solver's sum over the tied group counts it once (and nothing is evaluated twice)."""
    from types import SimpleNamespace

    class SharedEvaluator:
        sites = [SimpleNamespace(weight="w"), SimpleNamespace(weight="w"), SimpleNamespace(weight="v")]
        calls = []

        def loss(self, picks):
            self.calls.append(tuple(int(j) for j in picks))
            return float(max(picks[0], picks[1]) + 2 * picks[2])

    ev = SharedEvaluator()
    errors = single_site_losses(ev, 3, progress=False)
    np.testing.assert_array_equal(errors, [[0, 1, 2], [0, 0, 0], [0, 2, 4]])
    assert not any(c[1] for c in ev.calls)


def test_a_shared_weight_is_priced_once_by_the_shape_prior_its_budget_and_the_error_dp():
    """Four sites, the last three of one weight: the quadratic shape and the DP's fixed errors price that
    weight on its first site only, and the auto prior divides its budget over the two curves it measures
    (dividing over four sites it fell back to the shape)."""
    from types import SimpleNamespace

    from spdy_onnx.strategies import ErrorDP

    sites = [SimpleNamespace(name=f"s{i}", weight=w) for i, w in enumerate("avvv")]
    levels = list(np.linspace(0, 0.9, 13))

    class Shared(_CurveEvaluator):
        pass
    ev = Shared(np.tile((np.arange(13) / 12.0) ** 2, (4, 1)))
    ev.sites = sites
    shape = SpdySearch(search_budget="400", progress=False, prior="shape", sites=sites, levels=levels,
                       database=None, evaluator=ev)._error_shape(4, 13)
    assert shape[:2].sum() > 0 and not shape[2:].any()
    search = SpdySearch(search_budget="12", progress=False, sites=sites, levels=levels, database=None, evaluator=ev)
    search._error_shape(4, 13)     # 3/4 of 12 = 9 evaluations: 4 levels for each of 2 curves, 2 for 4 sites
    assert search.info["search_prior"]["kind"] == "losses"
    assert search.info["search_prior"]["levels_measured"] == curve_levels(13, 4)
    dp = ErrorDP(np.ones((4, 3)), sites=sites, levels=[0.0, 0.5, 0.9], database=None)
    np.testing.assert_array_equal(dp.errors, [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]])
