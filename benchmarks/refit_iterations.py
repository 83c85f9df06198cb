"""How much do the refit's conjugate-gradient iterations buy? Layer-wise reconstruction error of the OBS
database's weights against the number of iterations of the least-squares refit (spdy_onnx/obs.py).

Why: the refit is most of the database's time on BERT-size weights (benchmarks/obs_time.py), and that
time is linear in the iterations. This takes one transformer layer's sites of a real model, their
Hessians on real calibration data, and the OBS sweep's masks at every level of the default grid, then
refits with 0 (the sweep alone), 2, 4, 6, 8 (the default) and 12 iterations and prints each one's error
over the default's. Not a test: fewer iterations change the weights, so a change of the default needs an
accuracy run, not just this.

    python benchmarks/refit_iterations.py --model out/minilm-l6.onnx --data out/minilm_calib.npz --layer 2
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, calibrate, graph, obs  # noqa: E402
from spdy_onnx.levels import log_density_grid  # noqa: E402

ITERATIONS = (0, 2, 4, 6, 8, 12)
DEFAULT = 8


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="calibration .npz")
    p.add_argument("--layer", type=int, default=2, help="the sites whose names contain 'layer.N/'")
    p.add_argument("--samples", type=int, default=512, help="calibration samples for the Hessians")
    args = p.parse_args(argv)

    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=1, cores=1, input_shapes=None,
                        exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS, progress=False)
    sites = [s for s in prep.sites if f"layer.{args.layer}/" in s.name]
    if not sites:
        raise SystemExit(f"no site names contain 'layer.{args.layer}/'")
    data = {k: v[:args.samples] for k, v in np.load(args.data).items()}
    hessians = calibrate.hessians(prep.calibration_model, sites, data, 1, progress=False)
    weights = graph.read_weights(prep.model, sites)
    levels = [lvl for lvl in log_density_grid() if lvl > 0]
    errors = {it: [] for it in ITERATIONS}          # per iteration count: (sites, levels)
    for s in sites:
        w = np.asarray(s.to_matrix(weights[s.name]), dtype=np.float32)
        h = hessians[s.name]
        chol, dead = obs.inverse_cholesky(h)
        swept = obs.prune_levels(w, chol, dead, levels)
        for it in ITERATIONS:
            errors[it].append([obs.reconstruction_error(w, swept[j] if it == 0 else obs.refine(w, swept[j], h, iters=it), h)
                               for j in range(len(levels))])
    base = np.array(errors[DEFAULT])
    print(f"{os.path.basename(args.model)}: {len(sites)} sites of layer {args.layer}, {len(levels)} levels, "
          f"Hessians on {args.samples} samples\n")
    print(f"| refit iterations | error / error at {DEFAULT}: mean | max | min |")
    print("|---|---|---|---|")
    for it in ITERATIONS:
        ratio = np.array(errors[it]) / base
        print(f"| {it}{' (default)' if it == DEFAULT else ''}{' (OBS sweep alone)' if it == 0 else ''} | "
              f"{ratio.mean():.4f} | {ratio.max():.4f} | {ratio.min():.4f} |")
    prep.close()


if __name__ == "__main__":
    main()
