"""Does SPDY's profile fit the few samples its candidates are scored on?

Why: every search candidate is scored on the same --eval-samples calibration samples (default 16), and
the search compares hundreds to thousands of candidates on them. The profile it keeps may then be the
one that suits those samples rather than the model. This chooses profiles at fixed predicted speedups
on one latency table (the `table` runtime: no engine measurement, so the profile does not depend on the
hour), with each number of eval samples, no correction (the search alone), and scores the database
("draft") weights on data none of it saw: the accuracy benchmark's task (MobileNetV2: the 20 labelled
images and the held-out photos; MiniLM-L6: the probe and the cosine on held-out sentences).

    python benchmarks/eval_samples.py --models-dir out --model mobilenetv2 \
        --latency-table benchmarks/results/mobilenetv2_b16_xeon.table.json --speedups 1.1,1.25,1.5 \
        --eval-samples 16,64,256 --seeds 0,1 --search-budget 40s

The search budget is the tool's default (40 s) unless given: more samples per candidate then mean
fewer candidates, which is the trade a user makes with --eval-samples.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import MODELS, TASKS  # noqa: E402

from spdy_onnx import api  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", type=Path, required=True, help="folder of the models/ scripts' files")
    p.add_argument("--model", choices=sorted(MODELS), default="mobilenetv2")
    p.add_argument("--latency-table", required=True, help="a latency table of the model at its batch size")
    p.add_argument("--speedups", default="1.1,1.25,1.5", help="the profiles' predicted speedups")
    p.add_argument("--eval-samples", default="16,64,256", help="comma-separated --eval-samples to compare")
    p.add_argument("--seeds", default="0,1", help="comma-separated search seeds")
    p.add_argument("--search-budget", default="40s", help="each search's budget (spdy-onnx --search-budget)")
    p.add_argument("--cache-dir", default=None, help="spdy-onnx cache (database, evaluations)")
    p.add_argument("--engine", choices=("deepsparse", "onnxruntime"), default="deepsparse",
                   help="runs the held-out data")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)

    spec = MODELS[args.model]
    dense_path = args.models_dir / spec["onnx"]
    calib_path = args.models_dir / spec["calib"]
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="spdy-evalsamples-"))
    task = TASKS[args.model](args.models_dir, dense_path, engine=args.engine, cores=args.cores,
                             cache=cache / "accuracy", heldout=None, seed=0)
    keys = [key for _, key, _ in task.metrics]
    rows = []
    with tempfile.TemporaryDirectory(prefix="spdy-evalsamples-") as work:
        for speedup in (float(s) for s in args.speedups.split(",")):
            for n in (int(s) for s in args.eval_samples.split(",")):
                for seed in (int(s) for s in args.seeds.split(",")):
                    out = Path(work) / f"{speedup}_{n}_{seed}.onnx"
                    t0 = time.perf_counter()
                    rep = api.optimize(str(dense_path), target=speedup, margin=0.0, runtime="table",
                                       latency_table=args.latency_table, data=str(calib_path), strategy="spdy",
                                       batch_size=spec["batch"], search_budget=args.search_budget,
                                       eval_samples=n, correct_epochs=0, cache_dir=cache, seed=seed,
                                       output=out, progress=False)
                    seconds = time.perf_counter() - t0
                    search = rep["quality"].get("search") or [{}]
                    row = {"speedup": speedup, "eval_samples": n, "seed": seed,
                           "predicted": rep["predicted_speedup"], "sparsity": rep["weighted_mean_sparsity"],
                           "search_loss": rep["quality"]["calibration_loss"],
                           "evaluations": sum(s.get("evaluations", 0) for s in search), "seconds": seconds,
                           **task.evaluate(out)}
                    rows.append(row)
                    print(f"{speedup}x eval {n} seed {seed}: loss {row['search_loss']:.4f}, "
                          + ", ".join(f"{k} {row[k]}" for k in keys), flush=True)

    print(f"\n{spec['title']}, batch {spec['batch']}, SPDY profiles chosen on {args.latency_table} (table runtime, "
          f"search budget {args.search_budget}, no correction); calibration {calib_path.name}; {task.describe()}")
    names = [name for name, _, _ in task.metrics]
    print("| predicted | eval samples | seed | evaluations | sparsity | loss on its eval samples | "
          + " | ".join(names) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(names))
    for r in rows:
        cells = [_fmt(r, key, kind) for _, key, kind in task.metrics]
        print(f"| {r['predicted']:.3f}x | {r['eval_samples']} | {r['seed']} | {r['evaluations']} | {r['sparsity']:.0%} "
              f"| {r['search_loss']:.4f} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


def _fmt(r, key, kind) -> str:
    v = r[key]
    if kind == "frac":
        return f"{v}/{r.get('n_labelled', '?')}"
    if kind == "pct":
        return f"{v:.1%}"
    if kind.startswith("f"):
        return f"{v:.{kind[1:]}f}"
    return str(v)


if __name__ == "__main__":
    raise SystemExit(main())
