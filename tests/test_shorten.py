"""Short copies of a fixed-length token model: exact where they are used, refused where they would not be."""
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spdy_onnx import calibrate, correct, graph, shorten
from spdy_onnx.ort_session import make_session, run

L, H, HEADS, VOCAB = 48, 64, 4, 50


def tiny_encoder(*, mask_attention=True, baked_position_bias=False, gather_nd_mask=False, seed=0) -> onnx.ModelProto:
    """One attention block and an MLP at a fixed length L, written the way exporters write BERT:
    position ids and head reshapes as constants that name L, padding masked out of the attention
    (`gather_nd_mask`: as torch's dynamo exporter writes mask[:, None, None, :], a GatherND whose
    constant indices are (1, 1, 1, L, 2))."""
    rng = np.random.default_rng(seed)
    d = H // HEADS

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr), name)

    inits = [init("word", rng.normal(0, 1, (VOCAB, H)).astype(np.float32)),
             init("pos_table", rng.normal(0, 1, (L + 16, H)).astype(np.float32)),
             init("pos_ids", np.arange(L, dtype=np.int64)[None]),
             init("heads", np.array([1, L, HEADS, d], np.int64)),
             init("merge", np.array([1, L, H], np.int64)),
             init("mask_shape", np.array([1, 1, 1, L], np.int64)),
             init("scale", np.array(1 / np.sqrt(d), np.float32)),
             init("one", np.array(1.0, np.float32)),
             init("neg", np.array(-10000.0, np.float32))]
    for w in ("wq", "wk", "wv", "wo", "w1", "w2"):
        inits.append(init(w, rng.normal(0, 1 / np.sqrt(H), (H, H)).astype(np.float32)))
    n = helper.make_node
    nodes = [n("Gather", ["word", "input_ids"], ["tok"]),
             n("Gather", ["pos_table", "pos_ids"], ["pos"]),
             n("Add", ["tok", "pos"], ["x"])]
    if baked_position_bias:   # a (L, H) constant: a length baked in a way the rewrite does not cut
        inits.append(init("pos_bias", rng.normal(0, 0.1, (L, H)).astype(np.float32)))
        nodes.append(n("Add", ["x", "pos_bias"], ["x0"]))
    else:
        nodes.append(n("Identity", ["x"], ["x0"]))
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [n("MatMul", ["x0", "w" + name], [name + "_lin"], name=f"{name}_proj"),
                  n("Reshape", [name + "_lin", "heads"], [name + "_4d"]),
                  n("Transpose", [name + "_4d"], [name + "_t"], perm=perm)]
    nodes += [n("MatMul", ["q_t", "k_t"], ["raw"]), n("Mul", ["raw", "scale"], ["scores0"])]
    if mask_attention and gather_nd_mask:
        index = np.stack(np.broadcast_arrays(np.zeros(L, np.int64), np.arange(L)), axis=-1)[None, None, None]
        inits.append(init("mask_index", index))
        nodes += [n("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
                  n("GatherND", ["mf", "mask_index"], ["m4"]),
                  n("Sub", ["one", "m4"], ["inv"]), n("Mul", ["inv", "neg"], ["madd"]),
                  n("Add", ["scores0", "madd"], ["scores"])]
    elif mask_attention:
        nodes += [n("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
                  n("Reshape", ["mf", "mask_shape"], ["m4"]),
                  n("Sub", ["one", "m4"], ["inv"]), n("Mul", ["inv", "neg"], ["madd"]),
                  n("Add", ["scores0", "madd"], ["scores"])]
    else:
        nodes.append(n("Identity", ["scores0"], ["scores"]))
    nodes += [n("Softmax", ["scores"], ["probs"], axis=-1),
              n("MatMul", ["probs", "v_t"], ["ctx4"]),
              n("Transpose", ["ctx4"], ["ctx_t"], perm=[0, 2, 1, 3]),
              n("Reshape", ["ctx_t", "merge"], ["ctx"]),
              n("MatMul", ["ctx", "wo"], ["att"], name="o_proj"),
              n("Add", ["att", "x0"], ["h"]),
              n("MatMul", ["h", "w1"], ["f1"], name="fc1"), n("Relu", ["f1"], ["f1r"]),
              n("MatMul", ["f1r", "w2"], ["f2"], name="fc2"),
              n("Add", ["f2", "h"], ["out"])]
    g = helper.make_graph(nodes, "tiny_encoder",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, L]),
                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, L])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, L, H])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def padded_sentences(count, seed=0, lengths=(3, 30)):
    rng = np.random.default_rng(seed)
    ids = np.zeros((count, L), np.int64)
    mask = np.zeros((count, L), np.int64)
    for i in range(count):
        k = int(rng.integers(*lengths))
        ids[i, :k] = rng.integers(1, VOCAB, k)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _runners(model):
    full = make_session(model)
    return (lambda f: run(full, None, f)), (lambda m, f: run(make_session(m), None, f))


@pytest.mark.parametrize("gather_nd_mask", [False, True])
def test_a_short_copy_gives_the_full_models_real_token_outputs(gather_nd_mask):
    model = tiny_encoder(gather_nd_mask=gather_nd_mask)
    data = padded_sentences(12)
    feeds = list(calibrate.batches(data, 1))
    buckets = shorten.LengthBuckets(model, feeds[0])
    assert buckets.full == L
    full_run, short_run = _runners(model)
    used = set()
    for feed in feeds:
        n = buckets.length_of(feed)
        assert n % shorten.STEP == 0 and shorten.real_length(feed) <= n <= L
        short = buckets.model_for(n, feed, full_run, short_run)
        if n == L:
            assert short is None   # nothing to cut
            continue
        assert short is not None
        used.add(n)
        got = short_run(short, shorten.trim(feed, n, L))[0]
        want = full_run(feed)[0]
        real = feed["attention_mask"][0].astype(bool)
        assert got.shape == (1, n, H)
        np.testing.assert_allclose(got[0][real[:n]], want[0][real], rtol=1e-4, atol=1e-4)
    assert used == {16, 32}


@pytest.mark.parametrize("kind", ["unmasked attention", "baked position bias"])
def test_a_model_the_cut_would_change_runs_at_full_length(kind, caplog):
    model = tiny_encoder(mask_attention=kind != "unmasked attention",
                         baked_position_bias=kind == "baked position bias")
    feed = next(calibrate.batches(padded_sentences(1, lengths=(5, 6)), 1))
    buckets = shorten.LengthBuckets(model, feed)
    full_run, short_run = _runners(model)
    with caplog.at_level(logging.DEBUG, logger="spdy_onnx.shorten"):
        assert buckets.model_for(16, feed, full_run, short_run) is None
    assert buckets.model_for(16, feed, full_run, short_run) is None   # remembered, not re-tried


def test_feeds_without_a_padding_mask_are_never_cut():
    model = tiny_encoder()
    feed = {"input_ids": np.ones((1, L), np.int64), "attention_mask": np.ones((1, L), np.int64)}
    buckets = shorten.LengthBuckets(model, feed)
    assert buckets.length_of(feed) == L          # a full-length sentence
    feed = {"input_ids": np.ones((1, L), np.int64)}
    assert not shorten.LengthBuckets(model, feed).enabled


def test_left_padding_is_not_cut():
    feed = {"input_ids": np.ones((1, L), np.int64), "attention_mask": np.zeros((1, L), np.int64)}
    feed["attention_mask"][0, -5:] = 1
    assert shorten.real_length(feed) == L


def _prune_half(model):
    sites, _ = graph.select_sites(graph.find_sites(model)[0])
    weights = graph.read_weights(model, sites)
    pruned = {}
    for s in sites:
        w = weights[s.name].copy()
        w[np.abs(w) < np.median(np.abs(w))] = 0
        pruned[s.weight] = w
    return sites, pruned


def test_the_correction_on_cut_feeds_matches_the_correction_at_full_length(monkeypatch, caplog):
    pytest.importorskip("torch")
    model = tiny_encoder()
    data = padded_sentences(40, seed=1)
    sites, pruned = _prune_half(model)
    assert len(sites) == 6
    kw = dict(loss="mse", batch_size=1, epochs=2, lr=1e-3, max_seconds=None, seed=0)
    with caplog.at_level(logging.INFO, logger="spdy_onnx.correct"):
        cut_weights, cut = correct.global_correction(model, sites, pruned, data, **kw)
    assert "cut to 16, 32 tokens" in caplog.text
    monkeypatch.setattr(shorten, "padded_length", lambda model, feed: None)
    full_weights, full = correct.global_correction(model, sites, pruned, data, **kw)
    assert cut["loss_before"] == pytest.approx(full["loss_before"], rel=1e-4)
    assert cut["loss_after"] < 0.8 * cut["loss_before"]
    assert cut["loss_after"] == pytest.approx(full["loss_after"], rel=0.02)
    for name, w in pruned.items():
        assert np.array_equal(cut_weights[name] == 0, w == 0)   # the zeros stay
        np.testing.assert_allclose(cut_weights[name], full_weights[name], atol=2e-3)


def test_the_search_loss_on_cut_feeds_matches_the_loss_at_full_length(monkeypatch):
    from spdy_onnx.database import MagnitudeDatabase
    from spdy_onnx.evaluate import Evaluator
    model = tiny_encoder()
    data = padded_sentences(16, seed=2)
    sites, _ = graph.select_sites(graph.find_sites(model)[0])
    db = MagnitudeDatabase(sites, graph.read_weights(model, sites), [0.0, 0.5, 0.8])
    specs = {"input_ids": ((1, L), np.dtype(np.int64)), "attention_mask": ((1, L), np.dtype(np.int64))}
    cut = Evaluator(model, sites, db, data, specs=specs)
    assert {n for n, _ in cut.feeds} == {16, 32}
    monkeypatch.setattr(shorten, "padded_length", lambda model, feed: None)
    full = Evaluator(model, sites, db, data, specs=specs)
    assert {n for n, _ in full.feeds} == {None}
    rng = np.random.default_rng(0)
    for _ in range(4):
        picks = rng.integers(0, 3, len(sites))
        assert cut.loss(picks) == pytest.approx(full.loss(picks), rel=1e-4, abs=1e-7)
    biased = {s.weight: db.weight(s.name, 2) for s in sites}
    assert cut.loss_of_weights(biased) == pytest.approx(full.loss_of_weights(biased), rel=1e-4)


def test_a_correction_on_a_graph_that_cannot_be_cut_runs_at_full_length(caplog):
    pytest.importorskip("torch")
    model = tiny_encoder(mask_attention=False)   # its real-token outputs depend on the padding
    data = padded_sentences(24, seed=3)
    sites, pruned = _prune_half(model)
    with caplog.at_level(logging.INFO, logger="spdy_onnx.correct"):
        tuned, summary = correct.global_correction(model, sites, pruned, data, loss="mse", batch_size=1,
                                                   epochs=1, lr=1e-3, max_seconds=None, seed=0)
    assert "cut to" not in caplog.text
    assert summary["loss_after"] < summary["loss_before"]
    assert all(np.array_equal(tuned[k] == 0, w == 0) for k, w in pruned.items())


@pytest.mark.parametrize("mask_attention", [True, False])
def test_hessians_on_cut_feeds_match_the_hessians_at_full_length(monkeypatch, mask_attention):
    """The rows are the real tokens either way: cutting may change the cost, never H. A graph whose
    real-token activations depend on the padding (unmasked attention) must run in full."""
    model = tiny_encoder(mask_attention=mask_attention)
    data = padded_sentences(20, seed=4)
    sites, _ = graph.select_sites(graph.find_sites(model)[0], min_weights=1)
    lengths = []
    real_run = calibrate.run
    monkeypatch.setattr(calibrate, "run", lambda sess, out, feed: lengths.append(feed["input_ids"].shape[1])
                        or real_run(sess, out, feed))
    cut = calibrate.hessians(model, sites, data, 1, progress=False)
    short_runs = sum(n < L for n in lengths)
    if mask_attention:
        assert short_runs >= 20          # every sentence (3 to 29 tokens) ran cut, at 16 or 32
    else:
        assert short_runs <= 2           # only the checks of the two copies, which refused them
    # by hand, at full length: the real-token rows of each site's input
    sess = make_session(calibrate.with_outputs(model, sorted({s.input for s in sites})), optimize=False)
    names = [o.name for o in sess.get_outputs()]
    for site in sites:
        rows = []
        for feed in calibrate.batches(data, 1):
            x = dict(zip(names, run(sess, names, feed)))[site.input]
            rows.append(x[0][feed["attention_mask"][0].astype(bool)])
        x = np.concatenate(rows).astype(np.float64)
        np.testing.assert_allclose(cut[site.name], x.T @ x / len(x), rtol=1e-4, atol=1e-6)
