"""Does MobileNetV2's global correction generalise beyond its calibration photos?

Why: the correction (spdy_onnx/correct.py) tunes every kept weight against the dense model's outputs
and keeps the epoch with the lowest loss on a held-back slice of the calibration data. MobileNetV2's
calibration data is 512 augmented views of 9 photos (models/make_data_mobilenetv2.py), so the held-back
slice is views of the same photos: it cannot see the correction fitting those photos. This scores the
same profiles with and without the correction on images the calibration never saw: the 20 labelled
images and the held-out photos (the accuracy benchmark's MobileNetV2 task).

Each profile is chosen on a latency table at a predicted speedup (the `table` runtime: no engine
measurement, so the profile does not depend on the hour), its database ("draft") weights are written,
and each correction variant tunes those same draft weights.

    python benchmarks/correction_generalisation.py --models-dir out --latency-table mobilenetv2.table.json \
        --speedups 1.1,1.25 --strategies spdy,uniform --runs default,lr=1e-4,samples=128

A run is `default` (the correction as `optimize` runs it) or options joined by ':' — lr=LR,
epochs=E, samples=N (training views per epoch), layers=W (the sites' own output errors in the training loss
at weight W, optimize's --correct-layers), val (judge the epochs on --validation-views augmented
views of the held-out photos, as `optimize --validation-data` does, instead of a slice of the calibration
views). A `val` run has seen the held-out photos (to choose an epoch, not to train): only the 20 labelled
images judge it cleanly.
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

import numpy as np  # noqa: E402
import onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import MobileNetTask, load_npz  # noqa: E402

from spdy_onnx import api, correct, graph  # noqa: E402
from spdy_onnx.passes.prune import write_weights  # noqa: E402

OPTIONS = {"lr": float, "epochs": int, "samples": int, "layers": float}


def parse_runs(text: str) -> list[tuple[str, dict]]:
    """'default,lr=1e-4:val' -> [('default', {}), ('lr=1e-4:val', {'lr': 0.0001, 'val': True})]"""
    runs = []
    for part in (p.strip() for p in text.split(",")):
        kwargs: dict = {}
        if part != "default":
            for opt in part.split(":"):
                key, _, value = opt.partition("=")
                if key == "val" and not value:
                    kwargs["val"] = True
                elif key in OPTIONS:
                    kwargs[key] = OPTIONS[key](value)
                else:
                    raise SystemExit(f"unknown run option '{opt}' (known: default, val, "
                                     f"{', '.join(k + '=' for k in OPTIONS)})")
        runs.append((part, kwargs))
    return runs


def correct_weights(dense, sites, draft, calib, *, loss, batch_size, seed, lr=correct.DEFAULT_LR,
                    epochs=correct.DEFAULT_EPOCHS, samples=correct.MAX_TRAIN_SAMPLES, validation=None, layers=0.0):
    """The correction of `draft` with these settings, without a time limit (the profile's own, not the hour's)."""
    return correct.global_correction(dense, sites, draft, calib, loss=loss, batch_size=batch_size, epochs=epochs,
                                     lr=lr, max_samples=samples, max_seconds=None, seed=seed, validation=validation,
                                     layer_weight=layers)


def heldout_photo_views(models_dir: Path, n: int, seed: int) -> dict:
    """`n` strongly augmented views of the held-out photos (models/make_data_mobilenetv2.py's manifest),
    made the way the calibration views are: what a user would keep apart as --validation-data."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from _images import augmented_view, load_rgb, photo_files
    names = json.loads((models_dir / "mobilenetv2_data.json").read_text())["heldout_photos"]
    by_name = {p.name: p for p in photo_files()}
    ims = [load_rgb(by_name[n]) for n in names]
    rng = np.random.default_rng(seed)
    return {"input": np.stack([augmented_view(ims, rng, i) for i in range(n)]).astype(np.float32)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", type=Path, required=True, help="folder of models/make_data_mobilenetv2.py's files")
    p.add_argument("--latency-table", required=True, help="a MobileNetV2 latency table at --batch-size")
    p.add_argument("--speedups", default="1.1,1.25", help="the profiles' predicted speedups")
    p.add_argument("--strategies", default="spdy,uniform", help="profiles to correct (optimize's --strategy)")
    p.add_argument("--runs", default="default", help="comma-separated correction variants (see the docstring)")
    p.add_argument("--batch-size", type=int, default=16, help="the table's batch size")
    p.add_argument("--cache-dir", default=None, help="spdy-onnx cache (database, dense outputs)")
    p.add_argument("--engine", choices=("deepsparse", "onnxruntime"), default="deepsparse",
                   help="runs the held-out images")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--search-budget", default="600",
                   help="the search's budget; a number of evaluations makes the profile independent of the machine")
    p.add_argument("--validation-views", type=int, default=64,
                   help="augmented views of the held-out photos for `val` runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)

    dense_path = args.models_dir / "mobilenetv2.onnx"
    calib_path = args.models_dir / "mobilenetv2_calib.npz"
    calib = load_npz(calib_path)
    runs = parse_runs(args.runs)
    validation = None
    if any(kw.get("val") for _, kw in runs):
        validation = heldout_photo_views(args.models_dir, args.validation_views, seed=1000 + args.seed)
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="spdy-corrgen-"))
    task = MobileNetTask(args.models_dir, dense_path, engine=args.engine, cores=args.cores,
                         cache=cache / "accuracy", heldout=None, seed=args.seed)
    # the dense model at the batch size of the calibration batches, as optimize's correction sees it
    dense = api.Prepared(dense_path, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores, input_shapes=None,
                         exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS, progress=False,
                         runtime_options=None).calibration_model
    rows = []
    with tempfile.TemporaryDirectory(prefix="spdy-corrgen-") as work:
        work = Path(work)
        for strategy in args.strategies.split(","):
            for speedup in (float(s) for s in args.speedups.split(",")):
                draft_path = work / f"{strategy}_{speedup}.onnx"
                rep = api.optimize(str(dense_path), target=speedup, margin=0.0, runtime="table",
                                   latency_table=args.latency_table, data=str(calib_path), strategy=strategy,
                                   batch_size=args.batch_size, search_budget=args.search_budget,
                                   correct_epochs=0, cache_dir=cache, seed=args.seed, output=draft_path,
                                   progress=False)
                model = onnx.load(str(draft_path))
                sites, _ = graph.find_sites(model)
                weights = graph.read_weights(model, sites)
                draft = {s.weight: weights[s.name] for s in sites if (weights[s.name] == 0).any()}
                loss = rep["quality"].get("loss", "kl")
                head = {"strategy": strategy, "predicted": rep["predicted_speedup"],
                        "sparsity": rep["weighted_mean_sparsity"]}
                rows.append({**head, "run": "draft (no correction)", "seconds": 0.0,
                             "loss_before": None, "loss_after": None, **task.evaluate(draft_path)})
                print(_line(rows[-1]), flush=True)
                for name, kwargs in runs:
                    t0 = time.perf_counter()
                    options = {k: v for k, v in kwargs.items() if k != "val"}
                    tuned, summary = correct_weights(dense, sites, draft, calib, loss=loss,
                                                     batch_size=args.batch_size, seed=args.seed,
                                                     validation=validation if kwargs.get("val") else None,
                                                     **options)
                    seconds = time.perf_counter() - t0
                    out = work / f"{strategy}_{speedup}_{len(rows)}.onnx"
                    onnx.save(write_weights(model, tuned), str(out))
                    rows.append({**head, "run": name, "seconds": seconds, "loss_before": summary.get("loss_before"),
                                 "loss_after": summary.get("loss_after"), "best_epoch": summary.get("best_epoch"),
                                 **task.evaluate(out)})
                    print(_line(rows[-1]), flush=True)

    print(f"\nMobileNetV2, batch {args.batch_size}, profiles chosen on {args.latency_table} (table runtime, search "
          f"budget {args.search_budget}, seed {args.seed}); calibration {calib_path.name} "
          f"({len(next(iter(calib.values())))} views); {task.describe()}")
    d = task.dense_metrics
    print(f"dense: top-1 {d['top1']}/{d['n_labelled']}\n")
    print("| strategy | predicted | sparsity | correction | s | held-back loss before -> after (epoch kept) | top-1 (labelled) "
          "| KL to dense (labelled) | agree w/ dense (photos) | KL to dense (photos) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        held = "-" if r["loss_before"] is None else \
            f"{r['loss_before']:.3f} -> {r['loss_after']:.3f} ({r.get('best_epoch', '-')})"
        print(f"| {r['strategy']} | {r['predicted']:.2f}x | {r['sparsity']:.0%} | {r['run']} | {r['seconds']:.0f} "
              f"| {held} | {r['top1']}/{r['n_labelled']} | {r['kl_labelled']:.2f} "
              f"| {r['agree'] * r['n_photos']:.0f}/{r['n_photos']} | {r['kl_photos']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


def _line(r) -> str:
    return (f"{r['strategy']} {r['predicted']:.2f}x {r['run']}: top-1 {r['top1']}, KL labelled {r['kl_labelled']:.2f}, "
            f"KL photos {r['kl_photos']:.2f}, agree {r['agree']:.0%} ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    raise SystemExit(main())
