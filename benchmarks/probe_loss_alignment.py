"""Which label-free loss ranks pruned MiniLM-L6 profiles the way the sentiment probe does?

Why: SPDY's search and correction minimise a label-free loss (normalised MSE of the token states
against dense). On MiniLM-L6 that wins clearly on cosine to dense but not on the probe. This script
asks whether another label-free loss would follow the probe more closely, and how much of the
probe's loss is a mean shift of the output (a label-free fix: match the mean token state to dense
on calibration data).

Random per-site sparsities with the same mean (plain magnitude pruning, no reconstruction, so that
profiles differ a lot at one budget), each scored on calibration sentences by several losses and on
held-out sentences by the probe (logistic regression fitted once on dense embeddings, as in
benchmarks/accuracy.py). Prints each profile and the Spearman correlation of each loss with the
probe's accuracy and with the mean squared change of its logits. Given pipeline files (--files),
it scores them too, with and without the mean shift matched.

    python benchmarks/probe_loss_alignment.py --models-dir out --profiles 15 --files spdy.onnx uniform.onnx

onnxruntime, one thread, batch 1; the dense embeddings are cached in --cache-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")   # before onnxruntime is imported

import numpy as np  # noqa: E402


def _session(model_or_path, threads: int = 1):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def hidden_states(sess, data: dict, n: int) -> np.ndarray:
    """(n, tokens, width) last hidden state, one sample at a time (the export fixes batch 1)."""
    names = [i.name for i in sess.get_inputs()]
    return np.stack([sess.run(None, {k: data[k][i:i + 1] for k in names})[0][0] for i in range(n)])


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over real tokens, L2-normalised: the sentence embedding the probe reads."""
    m = mask[..., None].astype(np.float32)
    p = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def random_profile(rng, n_sites: int, mean: float, spread: float) -> np.ndarray:
    """Per-site sparsities around `mean` with standard deviation `spread`, clipped to [0, 0.95], mean kept."""
    s = mean + rng.normal(0, spread, size=n_sites)
    for _ in range(20):
        s = np.clip(s, 0.0, 0.95)
        s += mean - s.mean()
    return np.clip(s, 0.0, 0.95)


def losses(ref_tok: np.ndarray, out_tok: np.ndarray, ref_emb: np.ndarray, out_emb: np.ndarray) -> dict:
    """Label-free losses on calibration data: token states (per token, real tokens only) and sentence embeddings."""
    err = out_tok - ref_tok
    std = ref_tok.std(0) + 1e-6
    return {"nmse": float((err ** 2).sum() / (ref_tok ** 2).sum()),                      # the default loss
            "std_mse": float(((err / std) ** 2).mean()),                                    # every width channel weighed alike
            "pooled_nmse": float(((out_emb - ref_emb) ** 2).sum() / (ref_emb ** 2).sum())}  # the sentence embedding only


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", type=Path, required=True, help="folder of models/make_data_minilm.py's files")
    p.add_argument("--calib", type=int, default=256, help="calibration sentences for the losses")
    p.add_argument("--profiles", type=int, default=15)
    p.add_argument("--mean-sparsity", type=float, default=0.55)
    p.add_argument("--files", nargs="*", default=[], help="pruned MiniLM-L6 files to score with and without the mean matched")
    p.add_argument("--cache-dir", type=Path, default=None, help="dense outputs cached here (default: the spdy-onnx cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON of every row")
    args = p.parse_args()

    import onnx
    from onnx import numpy_helper
    from scipy.stats import spearmanr
    from sklearn.linear_model import LogisticRegression

    from spdy_onnx.cache import default_cache_dir
    from spdy_onnx.passes.prune import magnitude_prune, write_weights

    d = args.models_dir
    model = onnx.load(str(d / "minilm-l6.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    sites = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    dense_w = {s: numpy_helper.to_array(inits[s]) for s in sites}
    cal = {k: v[:args.calib] for k, v in np.load(d / "minilm_calib.npz").items()}
    held = dict(np.load(d / "minilm_heldout.npz"))
    train = dict(np.load(d / "minilm_probe_train.npz"))
    mask = cal["attention_mask"].astype(bool)

    cache_dir = (args.cache_dir or Path(default_cache_dir())) / "probe_alignment"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / f"dense_{args.calib}.npz"
    t0 = time.perf_counter()
    if cache.exists():
        z = np.load(cache)
        dcal, dheld, dtrain = z["cal"], z["held"], z["train"]
    else:
        dense = _session(str(d / "minilm-l6.onnx"))
        dcal = hidden_states(dense, cal, args.calib)
        dheld = pooled(hidden_states(dense, held, len(held["labels"])), held["attention_mask"])
        dtrain = pooled(hidden_states(dense, train, len(train["labels"])), train["attention_mask"])
        np.savez(cache, cal=dcal, held=dheld, train=dtrain)
    probe = LogisticRegression(C=1.0, max_iter=5000, random_state=args.seed).fit(dtrain, train["labels"])
    dense_logit = probe.decision_function(dheld)
    ref_tok = dcal[mask].astype(np.float64)
    ref_emb = pooled(dcal, cal["attention_mask"])
    print(f"MiniLM-L6, {len(sites)} MatMul sites, {args.calib} calibration sentences, {len(held['labels'])} held-out; "
          f"dense probe {probe.score(dheld, held['labels']):.1%} (dense pass {time.perf_counter() - t0:.0f} s)", flush=True)

    def score(sess) -> dict:
        pc = hidden_states(sess, cal, args.calib)
        row = losses(ref_tok, pc[mask].astype(np.float64), ref_emb, pooled(pc, cal["attention_mask"]))
        delta = (dcal[mask] - pc[mask]).mean(0)      # label-free: the mean token state matched to dense
        hh = hidden_states(sess, held, len(held["labels"]))
        for tag, h in (("", hh), ("_mean_matched", hh + delta)):
            emb = pooled(h, held["attention_mask"])
            lg = probe.decision_function(emb)
            row[f"probe_acc{tag}"] = float(probe.score(emb, held["labels"]))
            row[f"logit_shift{tag}"] = float((lg - dense_logit).mean())
            row[f"logit_mse{tag}"] = float(((lg - dense_logit) ** 2).mean())
            row[f"cos{tag}"] = float((emb * dheld).sum(1).mean())
        return row

    rows = []
    rng = np.random.default_rng(args.seed)
    for i in range(args.profiles):
        spread = (0.1, 0.2, 0.3)[i % 3]
        sp = random_profile(rng, len(sites), args.mean_sparsity, spread)
        pruned = write_weights(model, {name: magnitude_prune(w, x) for (name, w), x in zip(dense_w.items(), sp)})
        row = {"profile": i, "spread": spread, **score(_session(pruned))}
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if len(rows) >= 3:
        print(f"\nSpearman correlation over {len(rows)} profiles at mean sparsity {args.mean_sparsity:.0%}:")
        print("| loss on calibration data | vs probe acc | vs logit change (MSE) | vs 1 - cos |")
        print("|---|---|---|---|")
        for key in ("nmse", "std_mse", "pooled_nmse"):
            x = [r[key] for r in rows]
            print(f"| {key} | {spearmanr(x, [r['probe_acc'] for r in rows])[0]:+.2f} | "
                  f"{spearmanr(x, [r['logit_mse'] for r in rows])[0]:+.2f} | {spearmanr(x, [1 - r['cos'] for r in rows])[0]:+.2f} |")
        print(f"| (1 - cos, held-out) | {spearmanr([1 - r['cos'] for r in rows], [r['probe_acc'] for r in rows])[0]:+.2f} | | |")
        print(f"\nmean matched: probe acc {np.mean([r['probe_acc'] for r in rows]):.1%} -> "
              f"{np.mean([r['probe_acc_mean_matched'] for r in rows]):.1%} (mean over profiles); "
              f"mean |logit shift| {np.mean([abs(r['logit_shift']) for r in rows]):.3f} -> "
              f"{np.mean([abs(r['logit_shift_mean_matched']) for r in rows]):.3f}")
    for f in args.files:
        row = {"file": f, **score(_session(str(f)))}
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
