"""Held-out quality of the OBS database against its dampening (a share of the Hessian's mean diagonal).

Why: the database's reconstruction leans on the correlations of the calibration inputs; with narrow
calibration data (MobileNetV2: views of nine photos) it can fit those photos rather than the task. A
larger dampening pulls H^-1 toward a scaled identity, so the masks and updates lean less on them. This
runs the pipeline (`api.optimize` on the `table` runtime: a fixed latency table and a search budget in
evaluations, so the profile does not depend on the hour) once per dampening and predicted speedup, and
scores each written file on the accuracy benchmark's held-out task: MobileNetV2 top-1 on the 20
labelled images and KL to dense on them and on the held-out photos; MiniLM-L6 the linear probe on the
2,530 held-out sentences and the cosine of the embeddings to dense. Not a test.

    python benchmarks/obs_damping.py --models-dir out --model mobilenetv2 \
        --latency-table mobilenetv2.table.json --damps 0.01,0.1 --speedups 1.25,1.5
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
from accuracy import MiniLMTask, MobileNetTask  # noqa: E402

from spdy_onnx import api, reconstruct  # noqa: E402

MODELS = {"minilm": ("minilm-l6.onnx", "minilm_calib.npz", MiniLMTask, 1),
          "mobilenetv2": ("mobilenetv2.onnx", "mobilenetv2_calib.npz", MobileNetTask, 16)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", type=Path, required=True, help="folder of models/'s exports and data")
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--latency-table", required=True, help="the model's latency table (from `spdy-onnx profile`)")
    p.add_argument("--damps", default="0.01,0.1", help="comma-separated dampenings")
    p.add_argument("--speedups", default="1.25,1.5", help="comma-separated predicted speedups (on the table)")
    p.add_argument("--strategies", default="spdy")
    p.add_argument("--search-budget", default="600")
    p.add_argument("--correct-epochs", type=int, default=None, help="default: optimize's")
    p.add_argument("--cores", type=int, default=1, help="engine cores for the held-out metrics")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)

    onnx_name, calib_name, task_class, batch = MODELS[args.model]
    dense = args.models_dir / onnx_name
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="spdy-damp-"))
    task = task_class(args.models_dir, dense, engine="deepsparse", cores=args.cores, cache=cache / "accuracy",
                      heldout=None, seed=args.seed)
    rows = []
    default_damp = reconstruct.DEFAULT_DAMP
    try:
        with tempfile.TemporaryDirectory(prefix="spdy-damp-") as work:
            for strategy in args.strategies.split(","):
                for speedup in (float(s) for s in args.speedups.split(",")):
                    for damp in (float(d) for d in args.damps.split(",")):
                        reconstruct.DEFAULT_DAMP = damp
                        out = Path(work) / f"{strategy}_{speedup}_{damp}.onnx"
                        t0 = time.perf_counter()
                        kwargs = {} if args.correct_epochs is None else {"correct_epochs": args.correct_epochs}
                        rep = api.optimize(str(dense), target=speedup, margin=0.0, runtime="table",
                                           latency_table=args.latency_table, data=str(args.models_dir / calib_name),
                                           strategy=strategy, batch_size=batch, search_budget=args.search_budget,
                                           cache_dir=cache, seed=args.seed, output=out, progress=False, **kwargs)
                        metrics = {k: v for k, v in task.evaluate(out).items() if not isinstance(v, (list, str))}
                        rows.append({"strategy": strategy, "speedup": speedup, "damp": damp,
                                     "predicted": rep["predicted_speedup"], "sparsity": rep["weighted_mean_sparsity"],
                                     "calib_loss": rep["quality"].get("calibration_loss"),
                                     "seconds": time.perf_counter() - t0, **metrics})
                        print(json.dumps(rows[-1]), flush=True)
    finally:
        reconstruct.DEFAULT_DAMP = default_damp
    print(f"\n{args.model}, batch {batch}, table {args.latency_table}, search budget {args.search_budget}, "
          f"seed {args.seed}, correction epochs {args.correct_epochs if args.correct_epochs is not None else 'default'}; "
          f"{task.describe()}")
    if args.model == "minilm":
        d = task.dense_metrics
        print(f"dense: probe {d['probe_acc']:.1%}\n")
        print("| strategy | predicted | damp | sparsity | calib loss | probe acc | cos to dense | probe logit MSE |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['strategy']} | {r['predicted']:.2f}x | {r['damp']:g} | {r['sparsity']:.0%} | {r['calib_loss']:.4f} "
                  f"| {r['probe_acc']:.1%} | {r['cos_mean']:.4f} | {r['probe_logit_mse']:.4f} |")
    else:
        print("| strategy | predicted | damp | sparsity | calib loss | top-1 (labelled) | KL to dense (labelled) "
              "| agree w/ dense (photos) | KL to dense (photos) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['strategy']} | {r['predicted']:.2f}x | {r['damp']:g} | {r['sparsity']:.0%} | {r['calib_loss']:.4f} "
                  f"| {r['top1']}/{r['n_labelled']} | {r['kl_labelled']:.2f} | {r['agree'] * r['n_photos']:.0f}/{r['n_photos']} "
                  f"| {r['kl_photos']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
