"""How much probe accuracy can any profile buy at a given speed? SPDY's search against a labelled oracle.

The accuracy benchmark finds SPDY level with uniform and global magnitude on MiniLM-L6's sentiment probe
at 1.5x and 2x although its label-free loss is much lower. Every strategy uses the same database
weights, so they differ only in the profile. This script asks whether a better profile exists at all:
it runs SPDY's own search (the same DP, table, database, seed and budget) with the label-free loss
replaced by what the held-out metric rewards, and scores every profile's database weights (no
correction) on sentences no search saw:

  - spdy:        the default label-free loss on the calibration sentences (what `optimize` uses);
  - probe-logit: the mean squared change of the dense probe's logit, on probe-train sentences that are
                 not calibration sentences (no labels, but the probe: a task-aware, label-free loss);
  - oracle:      the probe's cross-entropy against the true labels on those sentences (labels used);
  - uniform, global-magnitude: the baselines, as `optimize` chooses them;
  - spdy-pooled: 1 - cosine of each calibration sentence's embedding to dense (label-free, no probe);
  - spdy-capped (--cap), spdy-band (--band): SPDY's search with some levels ruled out.

If the oracle's profile is no better on held-out sentences than uniform's at the same predicted speed,
no choice of levels beats the baselines there, whatever the loss. No engine is run: speeds are the
table's predictions (`spdy-onnx profile -o table.json`, or a cached table).

    python benchmarks/probe_oracle.py --models-dir out --table benchmarks/results/minilm_epyc_s30.table.json \\
        --targets 1.5,2 --seconds 150 --oracle-samples 192 --seed 0 --cache-dir cache --out probe_oracle_minilm.json
    python benchmarks/probe_oracle.py --models-dir out --table benchmarks/results/minilm_epyc_s30.table.json \\
        --targets 2 --strategies uniform,global-magnitude,spdy --seconds 150 --spread 8 --seed 0 --cache-dir cache
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, calibrate, evaluate, graph, search, strategies  # noqa: E402
from spdy_onnx.tables import LatencyTable, write_json_atomic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import embed, load_npz  # noqa: E402

STRATEGIES = ("spdy", "probe-logit", "oracle", "uniform", "global-magnitude")


class Embedder:
    """Sentence embeddings (mean over real tokens, L2-normalised) of a fixed set of sentences for any
    weights, through the evaluator's weights-as-inputs sessions cut to each sentence's length."""

    def __init__(self, prep, sites, database, data: dict, loss: str = "mse"):
        self.ev = evaluate.Evaluator(prep.calibration_model, sites, database, data, loss=loss, specs=prep.specs,
                                     eval_samples=calibrate.n_samples(data))
        self.dense = self._pool(self.ev.reference)

    def _pool(self, outputs) -> np.ndarray:
        # the accuracy benchmark's embedding, over each sentence's cut length
        return np.stack([embed(outs[0], {"attention_mask": mask}) for outs, mask in zip(outputs, self.ev.masks)])

    def embeddings(self, weights: dict) -> np.ndarray:
        return self._pool(self.outputs(weights))

    def outputs(self, weights: dict) -> list:
        """Each sentence's graph outputs for these weights (the first is last_hidden_state, cut length)."""
        return [self.ev._run(item, weights) for item in self.ev.feeds]

    def token_states(self, outputs) -> list[np.ndarray]:
        """Each sentence's real-token rows of last_hidden_state, (tokens, hidden)."""
        return [outs[0][0][np.asarray(mask[0], dtype=bool)] for outs, mask in zip(outputs, self.ev.masks)]


class ProbeLoss:
    """The search's evaluator interface (loss, is_cached, evaluations, sites) over sentence embeddings:
    1 - cosine to dense (w None), the probe's logit change (labels None), or its cross-entropy."""

    def __init__(self, embedder: Embedder, weights_of, w: np.ndarray, b: float, labels: np.ndarray | None):
        self.embedder, self.weights_of, self.w, self.b, self.labels = embedder, weights_of, w, b, labels
        self.sites = embedder.ev.sites
        self.dense_logit = None if w is None else embedder.dense @ w + b
        self._memo: dict[tuple, float] = {}
        self.evaluations = 0

    def is_cached(self, picks) -> bool:
        return tuple(int(j) for j in picks) in self._memo

    def loss(self, picks) -> float:
        key = tuple(int(j) for j in picks)
        if key not in self._memo:
            emb = self.embedder.embeddings(self.weights_of(key))
            if self.w is None:          # how far each sentence's embedding turned (no probe, no labels)
                value = float(np.mean(1.0 - np.sum(emb * self.embedder.dense, axis=1)))
            elif self.labels is None:   # how far the probe's logit moved
                value = float(np.mean((emb @ self.w + self.b - self.dense_logit) ** 2))
            else:                       # the probe's cross-entropy against the labels
                sign = np.where(self.labels == 1, 1.0, -1.0)
                value = float(np.mean(np.logaddexp(0.0, -sign * (emb @ self.w + self.b))))
            self._memo[key] = value
            self.evaluations += 1
        return self._memo[key]


def dense_train_embeddings(prep, sites, database, train: dict, cache_dir) -> np.ndarray:
    """Dense embeddings of every probe-train sentence, the probes' fit (a few minutes on one core), cached
    in cache_dir by the model's digest."""
    cached = Path(cache_dir or ".") / f"probe_oracle_train_dense_{prep.digest[:16]}.npy"
    if cached.exists():
        return np.load(cached)
    dense = Embedder(prep, sites, database, train).dense
    cached.parent.mkdir(parents=True, exist_ok=True)
    np.save(cached, dense)
    return dense


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Sentences right only with a, right only with b, and the exact (binomial) two-sided p of the
    difference; accuracy.py's mcnemar is the normal approximation, which its committed tables used."""
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return only_a, only_b, float(min(1.0, 2 * tail / 2 ** n))


def score_spread(evaluator, times, budget, k, test_set, w, b, labels) -> list[dict]:
    """The k lowest-loss profiles the search evaluated whose time is within 3% under the budget."""
    rows = np.arange(times.shape[0])
    known = [(loss, picks) for picks, loss in evaluator._memo.items()
             if 0.97 * budget <= times[rows, list(picks)].sum() <= budget]
    known.sort(key=lambda lp: lp[0])
    out = []
    for loss, picks in known[:k]:
        logit = test_set.embeddings(evaluator.weights_of(picks)) @ w + b
        acc = float(np.mean((logit > 0) == (labels == 1)))
        out.append({"calib_loss": float(loss), "probe_acc": acc, "picks": [int(j) for j in picks],
                    "probe_logit_mse": float(np.mean((logit - (test_set.dense @ w + b)) ** 2)),
                    "logit_shift": float(np.mean(logit - (test_set.dense @ w + b)))})
        print(f"    spread: calib loss {loss:.4f}, held-out probe acc {acc:.2%}, logit MSE "
              f"{out[-1]['probe_logit_mse']:.4f}, mean logit shift {out[-1]['logit_shift']:+.3f}", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", required=True, type=Path)
    p.add_argument("--table", required=True, help="latency table JSON of minilm-l6.onnx")
    p.add_argument("--targets", default="1.5,2", help="comma-separated predicted speedups")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seconds", type=float, default=150.0, help="search budget of every search, in seconds")
    p.add_argument("--oracle-samples", type=int, default=128,
                   help="probe-train sentences (after the calibration ones) the probe losses are computed on")
    p.add_argument("--pooled-samples", type=int, default=32,
                   help="calibration sentences the label-free pooled loss (spdy-pooled: 1 - cosine of each "
                        "sentence's embedding to dense) is computed on")
    p.add_argument("--calib-rows", type=int, default=1024, help="how many probe-train rows are calibration data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--cap", default=None, metavar="REGEX:SPARSITY",
                   help="adds spdy-capped: SPDY's search with the sites matching REGEX held at or under SPARSITY")
    p.add_argument("--band", type=int, default=None, metavar="K",
                   help="adds spdy-band: SPDY's search with every site within K grid levels of uniform's level")
    p.add_argument("--spread", type=int, default=0,
                   help="also score the K lowest-loss distinct profiles of SPDY's search within 3%% of the aim's "
                        "time: how far the probe moves among profiles the label-free loss can hardly tell apart")
    p.add_argument("--out", default=None, help="JSON with every row and each profile")
    args = p.parse_args(argv)
    from sklearn.linear_model import LogisticRegression

    targets = [float(t) for t in args.targets.split(",")]
    wanted = [s.strip() for s in args.strategies.split(",") if s.strip()]
    d = args.models_dir
    t_start = time.perf_counter()
    prep = api.Prepared(d / "minilm-l6.onnx", runtime="table", batch_size=1, cores=1, input_shapes=None,
                        exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS, progress=False)
    table = LatencyTable.load(args.table)
    sites = [s for s in prep.sites if s.name in table.times]
    names = [s.name for s in sites]
    times = table.matrix(names)
    groups = table.tied_groups(names)

    def chooser(strategy):
        return strategies.make_chooser(strategy, prep=prep, sites=sites, table=table, data=str(d / "minilm_calib.npz"),
                                       samples=None, reconstruct="obs", loss="auto",
                                       search_budget=f"{args.seconds}s", seed=args.seed, cache_dir=args.cache_dir,
                                       progress=False)

    base = chooser("uniform")              # builds (or reads) the database every strategy shares
    database = base.database
    train = load_npz(d / "minilm_probe_train.npz")
    train_labels = train.pop("labels")
    heldout = load_npz(d / "minilm_heldout.npz")
    heldout_labels = heldout.pop("labels")
    lo, hi = args.calib_rows, args.calib_rows + args.oracle_samples
    if hi > len(train_labels):
        raise SystemExit(f"--oracle-samples: only {len(train_labels) - lo} probe-train rows follow the calibration ones")
    t0 = time.perf_counter()
    oracle_set = Embedder(prep, sites, database, {k: v[lo:hi] for k, v in train.items()})
    test_set = Embedder(prep, sites, database, heldout)
    train_dense = dense_train_embeddings(prep, sites, database, train, args.cache_dir)
    print(f"dense embeddings: {time.perf_counter() - t0:.0f} s", flush=True)
    probe = LogisticRegression(C=1.0, max_iter=5000, random_state=args.seed).fit(train_dense, train_labels)
    w, b = probe.coef_[0].astype(np.float64), float(probe.intercept_[0])
    dense_right = (test_set.dense @ w + b > 0) == (heldout_labels == 1)
    print(f"dense: probe acc {dense_right.mean():.2%} on {len(heldout_labels)} held-out sentences", flush=True)

    def budget(aim):
        return table.dense_total_ms / aim - table.fixed_ms(names)

    searched = ("spdy", "spdy-capped", "spdy-band", "spdy-pooled", "probe-logit", "oracle")
    pooled_set = None
    if "spdy-pooled" in wanted:
        pooled_set = Embedder(prep, sites, database, load_npz(d / "minilm_calib.npz", args.pooled_samples))
    if args.band is not None and "spdy-band" not in wanted:
        wanted.append("spdy-band")
    capped_times = times
    if args.cap:
        import re
        pattern, _, limit = args.cap.rpartition(":")
        capped_times = times.copy()
        over = np.asarray(table.levels) > float(limit) + 1e-9
        hit = [i for i, n in enumerate(names) if re.search(pattern, n)]
        capped_times[np.ix_(hit, np.flatnonzero(over))] = 1e6   # never within a budget
        print(f"spdy-capped: {len(hit)} sites held at or under {float(limit):.0%}", flush=True)
        if "spdy-capped" not in wanted:
            wanted.append("spdy-capped")
    n_w = np.array([s.n_weights for s in sites], dtype=np.float64)

    def predicted_of(picks):
        return float(table.dense_total_ms / (times[np.arange(len(names)), picks].sum() + table.fixed_ms(names)))

    rows, right = [], {}
    for target in targets:
        # uniform's grid usually lands well above the target: the searches run again at its speed, so that
        # every comparison has a row at equal predicted speed
        aims = [target]
        for strategy in [s for s in wanted if s not in searched] + [s for s in wanted if s in searched]:
            for aim in (aims if strategy in searched else [target]):
                t0 = time.perf_counter()
                if strategy in ("probe-logit", "oracle", "spdy-pooled"):
                    ch = search.SpdySearch(search_budget=f"{args.seconds}s", seed=args.seed, progress=False,
                                           prior="auto", sites=sites, levels=list(table.levels),
                                           database=database, groups=groups, evaluator=None)
                    if strategy == "spdy-pooled":
                        ch.evaluator = ProbeLoss(pooled_set, base.evaluator.weights_of, None, 0.0, None)
                    else:
                        ch.evaluator = ProbeLoss(oracle_set, base.evaluator.weights_of, w, b,
                                                 None if strategy == "probe-logit" else train_labels[lo:hi])
                else:
                    ch = chooser("spdy" if strategy in ("spdy-capped", "spdy-band") else strategy)
                these_times = capped_times if strategy == "spdy-capped" else times
                if strategy == "spdy-band":   # a trust region around uniform's level at the target
                    u = int(strategies.Uniform(sites=sites, levels=list(table.levels), database=database)
                            .choose(times, budget(target))[0])
                    these_times = times.copy()
                    far = np.abs(np.arange(times.shape[1]) - u) > args.band
                    these_times[:, far] = 1e6
                picks = ch.choose(these_times, budget(aim))
                seconds = time.perf_counter() - t0
                logit = test_set.embeddings(base.evaluator.weights_of(picks)) @ w + b
                ok = (logit > 0) == (heldout_labels == 1)
                right[(target, aim, strategy)] = ok
                predicted = predicted_of(picks)
                if strategy == "uniform" and predicted > 1.01 * target:
                    aims.append(round(predicted, 4))
                row = dict(target=target, aim=aim, strategy=strategy, predicted=predicted,
                           sparsity=float(np.dot(n_w, np.asarray(table.levels)[picks]) / n_w.sum()),
                           calib_loss=float(base.evaluator.loss(picks)),
                           probe_logit_mse=float(np.mean((logit - (test_set.dense @ w + b)) ** 2)),
                           logit_shift=float(np.mean(logit - (test_set.dense @ w + b))),
                           probe_acc=float(ok.mean()),
                           agree_with_dense=float(np.mean((logit > 0) == (test_set.dense @ w + b > 0))),
                           search_s=seconds, evaluations=(ch.info.get("search") or [{}])[0].get("evaluations"),
                           picks=[int(j) for j in picks])
                rows.append(row)
                if strategy == "spdy" and args.spread and aim == target:
                    row["spread"] = score_spread(ch.evaluator, times, budget(aim), args.spread, test_set, w, b,
                                                 heldout_labels)
                print(f"{target:g}x (aim {aim:g}x) {strategy}: predicted {predicted:.3f}x, sparsity {row['sparsity']:.0%}, "
                      f"calib loss {row['calib_loss']:.4f}, held-out probe acc {ok.mean():.2%}, logit MSE "
                      f"{row['probe_logit_mse']:.4f} ({seconds:.0f} s, {row['evaluations']} evaluations)", flush=True)
    prep.close()

    print(f"\nmodel minilm-l6.onnx | batch 1 | 128 tokens | {len(names)} sites | table {Path(args.table).name} | "
          f"search budget {args.seconds:g} s, seed {args.seed} | probe losses on {args.oracle_samples} probe-train "
          f"sentences | scored on {len(heldout_labels)} held-out sentences, database weights, no correction | "
          f"dense {dense_right.mean():.1%}")
    print("| target | aim | strategy | predicted | sparsity | calib loss | probe logit MSE | logit shift | probe acc | vs uniform (p) | vs global magnitude (p) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for other in ("uniform", "global-magnitude"):
            mine = right[(r["target"], r["aim"], r["strategy"])]
            theirs = right.get((r["target"], r["target"], other))
            if theirs is None or other == r["strategy"]:
                cells.append("-")
                continue
            _, _, pv = mcnemar_exact(mine, theirs)
            cells.append(f"{100 * (mine.mean() - theirs.mean()):+.1f} ({pv:.2g})")
        print(f"| {r['target']:g}x | {r['aim']:g}x | {r['strategy']} | {r['predicted']:.3f}x | {r['sparsity']:.0%} | "
              f"{r['calib_loss']:.4f} | {r['probe_logit_mse']:.4f} | {r['logit_shift']:+.3f} | {r['probe_acc']:.1%} | {cells[0]} | {cells[1]} |")
    for r in rows:
        if r.get("spread"):
            accs = [x["probe_acc"] for x in r["spread"]]
            losses = [x["calib_loss"] for x in r["spread"]]
            print(f"{r['target']:g}x: SPDY's {len(accs)} lowest-loss profiles within 3% of the aim's time: calib loss "
                  f"{min(losses):.4f}-{max(losses):.4f}, held-out probe acc {min(accs):.1%}-{max(accs):.1%} "
                  f"(sd {100 * np.std(accs):.2f} points)")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        write_json_atomic(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                     "dense_probe_acc": float(dense_right.mean())})


if __name__ == "__main__":
    main()
