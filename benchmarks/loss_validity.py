"""Does any label-free loss rank MiniLM-L6's pruning profiles the way the held-out probe does?

`benchmarks/probe_oracle.py` scored many profiles (SPDY's, the baselines', searches on other losses, SPDY's
runners-up) on the held-out probe, each with the same OBS database weights. At 2x uniform's profile beat
every searched one at its speed although SPDY's label-free loss ranks it worse. If some other label-free
loss ranked the profiles like the probe does, searching on it would be the fix. This script takes the
profiles from probe_oracle's JSON files and scores each on calibration sentences that no search used
(by default rows 512-639 of minilm_calib.npz; the search scores candidates on the first 16) with:

  - tokens-nmse:   the search's own loss (`--loss auto`: the normalised MSE of last_hidden_state over real
                   tokens), on the fresh sentences;
  - pooled-cos:    1 - cosine of each sentence embedding (mean over tokens, L2-normalised) to dense;
  - pooled-shift:  the length of the mean change of the sentence embeddings (a bias the probe would read);
  - pooled-white:  the embedding error in the dense embeddings' whitened coordinates, e' (S + l I)^-1 e, S
                   their covariance over --cov-samples calibration sentences, l = 0.1 x its mean variance:
                   every direction counts alike, as it would for a probe on a direction of low variance;
  - tokens-white:  the same for every token's state, S over the tokens of the fresh sentences.

It prints each profile's losses next to its held-out probe accuracy, and for every loss the Spearman
correlation with the accuracy over the profiles of each target (a useful loss has a clearly negative one:
lower loss, higher accuracy), and where uniform's profile falls in that loss's order at uniform's speed.

`--mean-fix NAME,...` also re-scores the named profiles on the held-out sentences with the mean change of
the output tokens on the calibration sentences taken off (what a label-free bias correction of the last
LayerNorm would do), to see whether a shift of the embeddings explains the probe's ranking.

    python benchmarks/loss_validity.py --models-dir out --table benchmarks/results/minilm_epyc_s30.table.json \\
        --cache-dir cache benchmarks/results/probe_oracle_minilm*.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, evaluate, graph, strategies  # noqa: E402
from spdy_onnx.tables import LatencyTable, write_json_atomic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import load_npz  # noqa: E402
from probe_oracle import Embedder, dense_train_embeddings  # noqa: E402

LOSSES = ("tokens-nmse", "pooled-cos", "pooled-shift", "pooled-white", "tokens-white")
SHRINK = 0.1


def whitener(samples: np.ndarray) -> np.ndarray:
    """(S + l I)^-1 of the rows' covariance, l = SHRINK x the mean variance (S alone is singular with
    fewer rows than dimensions, and its smallest directions are noise)."""
    cov = np.cov(samples.T)
    return np.linalg.inv(cov + SHRINK * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0]))


def quadratic(err: np.ndarray, inverse: np.ndarray) -> float:
    return float(np.mean(np.einsum("ij,jk,ik->i", err, inverse, err)))


def pooled(states: list[np.ndarray]) -> np.ndarray:
    """The accuracy benchmark's sentence embedding (mean over real tokens, L2-normalised) of token rows."""
    means = np.stack([t.mean(axis=0) for t in states])
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def read_profiles(paths: list[str]) -> list[dict]:
    """probe_oracle's rows and SPDY's runners-up (--spread), one entry per distinct profile."""
    out, seen = [], set()
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            found = [(f"{row['strategy']}@{row['predicted']:.3f}", row["predicted"], row["probe_acc"], row["picks"])]
            found += [(f"spdy runner-up {i + 1}@{row['predicted']:.3f}", row["predicted"], s["probe_acc"], s["picks"])
                      for i, s in enumerate(row.get("spread") or [])]
            for name, predicted, acc, picks in found:
                if tuple(picks) not in seen:
                    seen.add(tuple(picks))
                    if any(x["name"] == name for x in out):   # another run's profile of that strategy and speed
                        name = f"{name} ({Path(path).stem})"
                    out.append(dict(name=name, target=row["target"], predicted=predicted, probe_acc=acc, picks=picks))
    return out


def ranks(values) -> np.ndarray:
    """0-based ranks, tied values sharing their mean rank (what Spearman's correlation needs)."""
    v = np.asarray(values, dtype=np.float64)
    out = np.empty(len(v))
    out[np.argsort(v, kind="mergesort")] = np.arange(len(v))
    for u in np.unique(v):
        out[v == u] = out[v == u].mean()
    return out


def spearman(a, b) -> float:
    """Spearman's rank correlation; NaN for fewer than three values or a constant one."""
    if len(a) < 3:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def speed_class(predicted: float) -> str:
    """Profiles searched at one aim land within a few percent of it: groups 0.05x wide."""
    return f"{round(predicted * 20) / 20:.2f}x"


def summarise(profiles: list[dict]) -> dict:
    """Per speed class: how many profiles, and per loss the Spearman correlation with held-out accuracy and
    uniform's place in the loss's order (None where uniform has no profile in the class)."""
    out = {}
    for speed in sorted({speed_class(x["predicted"]) for x in profiles}, key=lambda c: float(c[:-1])):
        group = [x for x in profiles if speed_class(x["predicted"]) == speed]
        uni = next((x for x in group if x["name"].startswith("uniform@")), None)
        out[speed] = {"profiles": len(group)}
        for k in LOSSES:
            out[speed][k] = {"spearman": spearman([x[k] for x in group], [x["probe_acc"] for x in group]),
                             "uniform_place": None if uni is None else 1 + sum(x[k] < uni[k] for x in group)}
    return out


def open_database(models_dir: Path, table_path, cache_dir):
    """MiniLM-L6 prepared on the table runtime, its sites in the table, and a uniform chooser whose database
    and evaluator (weights_of) are the ones probe_oracle.py's runs used (read from cache_dir)."""
    prep = api.Prepared(models_dir / "minilm-l6.onnx", runtime="table", batch_size=1, cores=1, input_shapes=None,
                        exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS, progress=False)
    table = LatencyTable.load(table_path)
    sites = [s for s in prep.sites if s.name in table.times]
    base = strategies.make_chooser("uniform", prep=prep, sites=sites, table=table,
                                   data=str(models_dir / "minilm_calib.npz"), samples=None, reconstruct="obs",
                                   loss="auto", search_budget="10s", seed=0, cache_dir=cache_dir, progress=False)
    return prep, sites, base


def print_tables(profiles: list[dict], fixes: dict, header: str) -> dict:
    """The tables of a run (also of a saved one, --reprint); returns the per-speed summary."""
    print(header)
    print("| profile | predicted | held-out probe acc | " + " | ".join(LOSSES) + " |")
    print("|---|---|---|" + "---|" * len(LOSSES))
    for prof in sorted(profiles, key=lambda x: (x["target"], x["predicted"], -x["probe_acc"])):
        print(f"| {prof['name']} | {prof['predicted']:.3f}x | {prof['probe_acc']:.1%} | "
              + " | ".join(f"{prof[k]:.4g}" for k in LOSSES) + " |")
    print("\nSpearman correlation of each loss with held-out probe accuracy among the profiles of about the same "
          "predicted speed (negative: the loss ranks like the probe), and where uniform's profile falls in the "
          "loss's order there (1 = lowest loss)")
    print("| predicted speed | profiles | " + " | ".join(LOSSES) + " |")
    print("|---|---|" + "---|" * len(LOSSES))
    summary = summarise(profiles)
    for speed, row in summary.items():
        cells = [f"{row[k]['spearman']:+.2f}" + (f", uniform {row[k]['uniform_place']} of {row['profiles']}"
                                                  if row[k]["uniform_place"] else "") for k in LOSSES]
        print(f"| {speed} | {row['profiles']} | " + " | ".join(cells) + " |")
    if fixes:
        print("\nHeld-out probe accuracy with the calibration sentences' mean change of the output tokens taken off")
        print("| profile | as is | mean shift removed |")
        print("|---|---|---|")
        for name, row in fixes.items():
            print(f"| {name} | " + " | ".join(f"{v['probe_acc']:.1%} (logit shift {v['logit_shift']:+.3f})"
                                              for v in row.values()) + " |")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", help="probe_oracle.py JSON files (their profiles and held-out accuracies)")
    p.add_argument("--models-dir", type=Path)
    p.add_argument("--table", help="the latency table those runs used")
    p.add_argument("--cache-dir", default=None, help="the cache folder those runs used (the OBS database)")
    p.add_argument("--first", type=int, default=512, help="first calibration row of the fresh sentences")
    p.add_argument("--samples", type=int, default=128, help="how many fresh calibration sentences")
    p.add_argument("--cov-samples", type=int, default=512, help="calibration sentences for pooled-white's covariance")
    p.add_argument("--mean-fix", default="", help="comma-separated profile names to re-score with the mean shift removed")
    p.add_argument("--out", default=None, help="JSON with every profile's losses")
    p.add_argument("--reprint", default=None, metavar="JSON", help="print the tables of a saved --out file and stop")
    args = p.parse_args(argv)
    if args.reprint:
        saved = json.loads(Path(args.reprint).read_text())
        print_tables(saved["profiles"], saved.get("mean_fix") or {}, f"(saved run {args.reprint}: {saved['args']})")
        return
    if not (args.results and args.models_dir and args.table):
        p.error("give probe_oracle.py result files, --models-dir and --table (or --reprint)")
    from sklearn.linear_model import LogisticRegression

    t_start = time.perf_counter()
    d = args.models_dir
    prep, sites, base = open_database(d, args.table, args.cache_dir)
    database = base.database
    calib = load_npz(d / "minilm_calib.npz")
    if args.first + args.samples > len(next(iter(calib.values()))):
        raise SystemExit("--first + --samples runs past the calibration sentences")
    fresh_data = {k: v[args.first:args.first + args.samples] for k, v in calib.items()}
    # an evaluator with the search's own loss (`--loss auto`) on the fresh sentences
    fresh = Embedder(prep, sites, database, fresh_data, loss="auto")
    cov_set = Embedder(prep, sites, database, load_npz(d / "minilm_calib.npz", args.cov_samples))
    pooled_inverse = whitener(cov_set.dense)
    dense_states = fresh.token_states(fresh.ev.reference)
    token_inverse = whitener(np.concatenate(dense_states))
    dense_pooled = pooled(dense_states)

    profiles = read_profiles(args.results)
    print(f"{len(profiles)} profiles; fresh sentences {args.first}-{args.first + args.samples - 1}, "
          f"covariance of {args.cov_samples} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    ev = fresh.ev
    shifts = {}   # each profile's mean change of the output tokens on the fresh sentences (--mean-fix)
    for prof in profiles:
        outputs = fresh.outputs(base.evaluator.weights_of(prof["picks"]))
        states = fresh.token_states(outputs)
        shifts[prof["name"]] = np.concatenate(states).mean(axis=0) - np.concatenate(dense_states).mean(axis=0)
        emb = pooled(states)
        err = emb - dense_pooled
        # what the search's evaluator computes for a candidate (Evaluator.loss), from these outputs
        prof["tokens-nmse"] = float(np.mean([
            evaluate.combined_loss(ev.loss_names, ref, outs, mask, ev.scales, ev.output_weights)
            for ref, outs, mask in zip(ev.reference, outputs, ev.masks)]))
        prof["pooled-cos"] = float(np.mean(1.0 - np.sum(emb * dense_pooled, axis=1)))
        prof["pooled-shift"] = float(np.linalg.norm(err.mean(axis=0)))
        prof["pooled-white"] = quadratic(err, pooled_inverse)
        prof["tokens-white"] = float(np.mean([quadratic(s - r, token_inverse) for s, r in zip(states, dense_states)]))
        print(f"  {prof['name']}: acc {prof['probe_acc']:.2%}, " + ", ".join(f"{k} {prof[k]:.4g}" for k in LOSSES),
              flush=True)

    fixes = {}
    wanted = [n.strip() for n in args.mean_fix.split(",") if n.strip()]
    if wanted:
        train = load_npz(d / "minilm_probe_train.npz")
        train_labels = train.pop("labels")
        heldout = load_npz(d / "minilm_heldout.npz")
        labels = heldout.pop("labels")
        test_set = Embedder(prep, sites, database, heldout)
        train_dense = dense_train_embeddings(prep, sites, database, train, args.cache_dir)
        probe = LogisticRegression(C=1.0, max_iter=5000, random_state=0).fit(train_dense, train_labels)
        w, b = probe.coef_[0].astype(np.float64), float(probe.intercept_[0])
        dense_logit = test_set.dense @ w + b
        for prof in profiles:
            if prof["name"] not in wanted:
                continue
            shift = shifts[prof["name"]]
            states = test_set.token_states(test_set.outputs(base.evaluator.weights_of(prof["picks"])))
            row = {}
            for kind, emb in (("as is", pooled(states)), ("mean shift removed", pooled([s - shift for s in states]))):
                logit = emb @ w + b
                row[kind] = dict(probe_acc=float(np.mean((logit > 0) == (labels == 1))),
                                 logit_shift=float(np.mean(logit - dense_logit)))
            fixes[prof["name"]] = row
            print(f"  mean fix {prof['name']}: " + ", ".join(f"{k} {v['probe_acc']:.2%} (logit shift "
                                                              f"{v['logit_shift']:+.3f})" for k, v in row.items()),
                  flush=True)
    prep.close()

    header = (f"\nmodel minilm-l6.onnx | batch 1 | 128 tokens | table {Path(args.table).name} | OBS database weights, "
              f"no correction | losses on calibration sentences {args.first}-{args.first + args.samples - 1} | "
              f"held-out probe accuracy from {', '.join(Path(r).name for r in args.results)}")
    summary = print_tables(profiles, fixes, header)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        write_json_atomic(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "profiles": profiles,
                                     "by_speed": summary, "mean_fix": fixes})


if __name__ == "__main__":
    main()
