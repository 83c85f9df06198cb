"""How much does the global correction gain from more calibration data, on one fixed profile?

Why: the correction (spdy_onnx/correct.py) is the step that moves a pruned MiniLM-L6 furthest back
toward the dense model, and its cost is linear in the samples it tunes on. This fixes everything else:
one SPDY profile, chosen on a latency table at a predicted speedup (the `table` runtime: no engine
measurement, so the profile does not depend on the hour), its database ("draft") weights, then corrects
those same draft weights on the first N sentences of the probe-train part (the calibration file of
`models/make_data_minilm.py --calib N` holds exactly these) for E epochs, and scores each result with
the accuracy benchmark's MiniLM task (probe accuracy and cosine to dense on the held-out sentences).

    python benchmarks/correction_data.py --models-dir out --latency-table minilm.table.json \
        --speedup 1.6 --runs 1024x1,2048x1,1024x2,4096x1,1024x1:lr=1e-3

A run is SAMPLESxEPOCHS, optionally with :loss=NAME (the correction's loss; default: the search's),
:layers=W (the sites' own output errors in the training loss at weight W, optimize's --correct-layers) and
:lr=LR. `--loss` sets the loss the profile is chosen with (spdy-onnx's --loss).

The latency table is any MiniLM-L6 table `spdy-onnx profile` wrote. The profile's database and search
use the first 1,024 sentences (the Hessians' cap, reconstruct.HESSIAN_SAMPLES), whatever N is.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import MiniLMTask  # noqa: E402

from spdy_onnx import api, correct, graph  # noqa: E402
from spdy_onnx.passes.prune import write_weights  # noqa: E402

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


OPTIONS = {"loss": ("loss", str), "lr": ("lr", float), "layers": ("layer_weight", float)}


def parse_runs(text: str) -> list[tuple[int, int, dict]]:
    """'1024x1,1024x1:loss=kl:lr=1e-3' -> [(1024, 1, {}), (1024, 1, {'loss': 'kl', 'lr': 0.001})]"""
    runs = []
    for part in text.split(","):
        head, *opts = part.strip().split(":")
        n, _, epochs = head.partition("x")
        kwargs = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key not in OPTIONS:
                raise SystemExit(f"unknown run option '{key}' (known: {', '.join(OPTIONS)})")
            name, kind = OPTIONS[key]
            kwargs[name] = kind(value)
        runs.append((int(n), int(epochs or 1), kwargs))
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", type=Path, required=True, help="folder of models/make_data_minilm.py's files")
    p.add_argument("--latency-table", required=True, help="a MiniLM-L6 latency table (spdy-onnx profile)")
    p.add_argument("--speedup", type=float, default=1.6, help="the profile's predicted speedup")
    p.add_argument("--runs", default="1024x1,2048x1,1024x2,4096x1",
                   help="comma-separated SAMPLESxEPOCHS corrections of the same draft weights")
    p.add_argument("--cache-dir", default=None, help="spdy-onnx cache (database, dense embeddings)")
    p.add_argument("--cores", type=int, default=1, help="DeepSparse cores for the held-out embeddings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", default="auto", help="the search's loss (spdy-onnx --loss)")
    p.add_argument("--search-budget", default=None,
                   help="the search's budget (spdy-onnx --search-budget); a number of evaluations makes the "
                        "profile independent of the machine's speed")
    args = p.parse_args(argv)

    dense_path = args.models_dir / "minilm-l6.onnx"
    pool = np.load(args.models_dir / "minilm_probe_train.npz")
    pool = {k: pool[k] for k in INPUTS if k in pool.files}
    runs = parse_runs(args.runs)
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="spdy-corrdata-"))
    task = MiniLMTask(args.models_dir, dense_path, engine="deepsparse", cores=args.cores,
                      cache=cache / "accuracy", heldout=None, seed=args.seed)
    dense = onnx.load(str(dense_path))
    sites, _ = graph.find_sites(dense)

    with tempfile.TemporaryDirectory(prefix="spdy-corrdata-") as work:
        work = Path(work)
        first = {k: v[:1024] for k, v in pool.items()}
        np.savez(work / "calib1024.npz", **first)
        t0 = time.perf_counter()
        rep = api.optimize(str(dense_path), target=args.speedup, margin=0.0, runtime="table",
                           latency_table=args.latency_table, data=str(work / "calib1024.npz"), strategy="spdy",
                           loss=args.loss, search_budget=args.search_budget, correct_epochs=0, cache_dir=cache,
                           seed=args.seed, output=work / "draft.onnx", progress=False)
        choose_s = time.perf_counter() - t0
        drafted = onnx.load(str(work / "draft.onnx"))
        draft = graph.read_weights(drafted, sites)
        draft = {s.weight: draft[s.name] for s in sites}
        loss = rep["quality"].get("loss", "mse")
        rows = [("draft (no correction)", "-", task.evaluate(work / "draft.onnx"), None)]
        for n, epochs, kwargs in runs:
            if n > len(next(iter(pool.values()))):
                raise SystemExit(f"the probe-train part has fewer than {n} sentences")
            data = {k: v[:n] for k, v in pool.items()}
            t0 = time.perf_counter()
            options = {"loss": loss, **kwargs}    # a run's own :loss= replaces the search's
            tuned, summary = correct.global_correction(dense, sites, draft, data, batch_size=1, epochs=epochs,
                                                       max_samples=n, max_seconds=None, seed=args.seed, **options)
            seconds = time.perf_counter() - t0
            label = f"{n} sentences x {epochs} epoch(s)" + "".join(f", {k} {v}" for k, v in kwargs.items())
            out = work / f"corrected_{len(rows)}.onnx"
            onnx.save(write_weights(dense, {**draft, **tuned}), str(out))
            rows.append((label, f"{seconds:.0f}", task.evaluate(out), summary))
            print(f"{label}: {seconds:.0f} s, probe {rows[-1][2]['probe_acc']:.1%}, cos {rows[-1][2]['cos_mean']:.4f}",
                  flush=True)

    print(f"MiniLM-L6, SPDY profile ({loss} loss) at a predicted {rep['predicted_speedup']:.2f}x "
          f"(weighted sparsity {rep['weighted_mean_sparsity']:.0%}; chosen in {choose_s:.0f} s on "
          f"{args.latency_table}), batch 1, seed {args.seed}; held-out: {task.describe()}")
    print(f"dense: probe {task.dense_metrics['probe_acc']:.1%}")
    print("| correction | seconds | train batches | probe acc | cos to dense |")
    print("|---|---|---|---|---|")
    for name, seconds, metrics, summary in rows:
        batches = summary["train_batches"] if summary else "-"
        print(f"| {name} | {seconds} | {batches} | {metrics['probe_acc']:.1%} | {metrics['cos_mean']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
