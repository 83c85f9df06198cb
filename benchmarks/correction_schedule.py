"""How much correction is worth its time: re-runs the global correction of one chosen profile with
several (epochs, samples) schedules and scores each on MiniLM-L6's held-out task metrics.

Input: a report and cache folder of an earlier `optimize` run on MiniLM-L6 (the profile and its OBS
database are read from them, so every schedule starts from the same weights). Metrics use onnxruntime.

    spdy-onnx optimize out/minilm-l6.onnx --target 2x --cores 1 --data out/minilm_calib.npz \
        --cache-dir /tmp/c -o /tmp/c/out.onnx
    python benchmarks/correction_schedule.py --report /tmp/c/out.report.json --cache-dir /tmp/c --models-dir out
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402

import accuracy  # noqa: E402
from spdy_onnx import calibrate, correct  # noqa: E402
from spdy_onnx.api import Prepared  # noqa: E402
from spdy_onnx.passes.prune import write_weights  # noqa: E402
from spdy_onnx.reconstruct import StoredDatabase  # noqa: E402

SCHEDULES = [(0, 0), (1, 256), (2, 256), (1, 512), (2, 512)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, required=True, help="the --cache-dir of that run")
    p.add_argument("--models-dir", type=Path, default=Path("/work/models_out"))
    args = p.parse_args(argv)
    rep = json.loads(args.report.read_text())
    model = args.models_dir / "minilm-l6.onnx"
    prep = Prepared(model, runtime="deepsparse", batch_size=1, cores=1, input_shapes=None, exclude=None,
                    include=None, min_weights=4096, progress=False)
    levels = rep["levels"]
    folders = sorted((args.cache_dir / "databases").glob("*"))
    if len(folders) != 1:
        p.error(f"expected one database in {args.cache_dir / 'databases'}, found {len(folders)}")
    db = StoredDatabase(folders[0], prep.sites, levels, "obs")
    profile = {s["name"]: levels.index(s["sparsity"]) for s in rep["sites"]}
    weights = {s.weight: db.weight(s.name, profile[s.name]) for s in prep.sites}
    calib = calibrate.load_data(args.models_dir / "minilm_calib.npz", prep.specs)
    with tempfile.TemporaryDirectory() as work:
        task = accuracy.MiniLMTask(args.models_dir, model, engine="onnxruntime", cores=2, cache=Path(work),
                                   heldout=None, seed=0)
        print(f"profile of {args.report} (target {rep['target']}x); dense probe {task.dense_metrics['probe_acc']:.1%}")
        print("| epochs | samples | correction s | probe acc | cos to dense | held-back loss |\n|---|---|---|---|---|---|")
        for epochs, n in SCHEDULES:
            t0 = time.perf_counter()
            tuned, summary = (correct.global_correction(prep.calibration_model, prep.sites, weights, calib, loss="mse",
                                                        batch_size=1, epochs=epochs, max_samples=n, max_seconds=None,
                                                        seed=0) if epochs else ({}, {}))
            seconds = time.perf_counter() - t0
            path = Path(work) / f"m{epochs}_{n}.onnx"
            onnx.save(write_weights(prep.model, {**weights, **tuned}), path)
            m = task.evaluate(path)
            held = summary.get("loss_after")
            print(f"| {epochs} | {n} | {seconds:.0f} | {m['probe_acc']:.1%} | {m['cos_mean']:.4f} | "
                  f"{'-' if held is None else f'{held:.4f}'} |", flush=True)


if __name__ == "__main__":
    main()
