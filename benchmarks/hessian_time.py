"""Hessian capture time with and without cutting padded token batches to their real length.

Why: the Hessians of every site come from one forward pass per calibration sample; with sentences of
about 28 real tokens padded to 128, most of that pass is padding. This runs the capture both ways on the
same data and checks that the Hessians agree (they only ever count real-token rows). Not a test.

    python benchmarks/hessian_time.py --model out/minilm-l6.onnx --data out/minilm_calib.npz
    python benchmarks/hessian_time.py --model out/bert-base.onnx --data out/minilm_calib.npz
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, calibrate, shorten  # noqa: E402


def capture(prep, data, *, cut: bool):
    real = shorten.padded_length
    if not cut:
        shorten.padded_length = lambda model, feed: None
    try:
        t0 = time.perf_counter()
        h = calibrate.hessians(prep.calibration_model, prep.sites, data, prep.batch_size, progress=False)
        return h, time.perf_counter() - t0
    finally:
        shorten.padded_length = real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="calibration .npz")
    ap.add_argument("--samples", type=int, default=1024)
    args = ap.parse_args(argv)
    prep = api.Prepared(args.model, runtime="table", batch_size=1, cores=None, input_shapes=None, exclude=None,
                        include=None, min_weights=4096, progress=False)
    try:
        data = calibrate.load_data(args.data, prep.specs, samples=args.samples)
        full, t_full = capture(prep, data, cut=False)
        cut, t_cut = capture(prep, data, cut=True)
    finally:
        prep.close()
    worst = max(float(np.abs(cut[k] - full[k]).max() / max(np.abs(full[k]).max(), 1e-30)) for k in full)
    print(f"model {os.path.basename(args.model)} | {len(full)} sites | {calibrate.n_samples(data)} samples | "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    print("| capture | seconds |")
    print("|---|---|")
    print(f"| full length | {t_full:.1f} |")
    print(f"| cut to the real length (rounded up to {shorten.STEP}) | {t_cut:.1f} |")
    print(f"largest relative difference between the two sets of Hessians: {worst:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
