"""Where the OBS database's time goes, per site shape: the Hessian's inverse Cholesky factor, the
stacked OBS sweep, and the least-squares refit of the kept weights (spdy_onnx/obs.py), at every level of
the default grid, with the refit's GEMM rate.

Why: on BERT-base size the database is a quarter of `optimize`'s time; this says whether that is the
arithmetic (GEMMs near the machine's rate) or overhead. Random weights and a Hessian from random rows:
the timing depends on the shapes, not the values. Not a test.

    python benchmarks/obs_time.py --shapes 768x3072,3072x768,768x768
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")   # before deepsparse is imported (for its CPU name)

import numpy as np  # noqa: E402

from spdy_onnx import blas, obs  # noqa: E402
from spdy_onnx.levels import log_density_grid  # noqa: E402
from spdy_onnx.runtimes.deepsparse import cpu_name  # noqa: E402


def time_site(rows: int, cols: int, levels: list[float], rng) -> dict:
    x = rng.standard_normal((4 * cols, cols)).astype(np.float32)
    h = blas.gram(x).astype(np.float64) / x.shape[0]
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    t0 = time.perf_counter()
    chol, dead = obs.inverse_cholesky(h)
    t1 = time.perf_counter()
    pruned = obs.prune_levels(w, chol, dead, levels)
    t2 = time.perf_counter()
    per_chunk = max(1, int(obs.REFINE_STACK_BYTES // max(1, w.size * 4)))
    iters = 8                        # obs.best_reconstruction_levels' default
    gemms = 0
    for c in range(0, len(pruned), per_chunk):
        chunk = pruned[c:c + per_chunk]
        chunk[...] = obs.refine(w, chunk.reshape(-1, cols), h, iters=iters).reshape(chunk.shape)
        gemms += 2.0 * rows * cols * cols * (1 + len(chunk) * (1 + iters))   # target, residual, iterations
    t3 = time.perf_counter()
    return {"shape": f"{rows}x{cols}", "cholesky_s": t1 - t0, "sweep_s": t2 - t1, "refit_s": t3 - t2,
            "refit_gflop": gemms / 1e9, "refit_gflops_per_s": gemms / 1e9 / (t3 - t2)}


def parse_shapes(argv, description: str):
    """(weight shapes as (rows, cols), a seeded generator, the default grid's sparse levels) from the
    command line shared by the database timing scripts."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="768x3072,3072x768,768x768",
                   help="weight shapes rows x cols (outputs x inputs): BERT-base's down, up and attention")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes.split(",")]
    return shapes, np.random.default_rng(args.seed), [lvl for lvl in log_density_grid() if lvl > 0]


def main(argv=None):
    shapes, rng, levels = parse_shapes(argv, __doc__)
    print(f"| shape (out x in) | inverse Cholesky s | OBS sweep s | refit s | refit GFLOP | refit GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for rows, cols in shapes:
        r = time_site(rows, cols, levels, rng)
        print(f"| {r['shape']} | {r['cholesky_s']:.2f} | {r['sweep_s']:.2f} | {r['refit_s']:.2f} | "
              f"{r['refit_gflop']:.0f} | {r['refit_gflops_per_s']:.0f} |", flush=True)
    print(f"\n{len(levels)} levels | BLAS: {blas.backend()} | {cpu_name()}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
