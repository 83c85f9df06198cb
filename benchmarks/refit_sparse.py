"""Does the sparse product pay in the refit of the kept weights? Per level of the default grid, the
refit's time with dense GEMMs and with the sparse x dense product on the kept weights alone
(spdy_onnx/obs.py: SPARSE_REFIT_DENSITY decides which runs), the two results' relative error
difference, and the whole database step (best_reconstruction_levels) both ways.

Why: the refit is most of the OBS database's time on BERT-size weights (benchmarks/obs_time.py), and at
85% sparsity and beyond most of a dense GEMM multiplies zeros. Random weights and a Hessian from random
rows with uneven feature scales: the timing depends on the shapes and the mask's density. Not a test
(tests/test_accuracy_core.py checks that the two paths agree).

    python benchmarks/refit_sparse.py --shapes 768x3072,3072x768,768x768
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")   # before deepsparse is imported (for its CPU name)

import numpy as np  # noqa: E402

from spdy_onnx import blas, obs  # noqa: E402
from spdy_onnx.runtimes.deepsparse import cpu_name  # noqa: E402

from obs_time import parse_shapes  # noqa: E402  (benchmarks/ is on sys.path when a script in it runs)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(argv=None):
    shapes, rng, levels = parse_shapes(argv, __doc__)
    print(f"sparse path at density <= {obs.SPARSE_REFIT_DENSITY} | BLAS: {blas.backend()} | "
          f"{cpu_name()}, {os.cpu_count()} CPUs\n")
    print("| shape (out x in) | level | dense GEMM refit s | sparse refit s | ratio | error sparse / dense |")
    print("|---|---|---|---|---|---|")
    totals = []
    for rows, cols in shapes:
        shape = f"{rows}x{cols}"
        x = rng.standard_normal((4 * cols, cols)).astype(np.float32)
        x *= np.exp(rng.standard_normal(cols)).astype(np.float32)
        h = blas.gram(x).astype(np.float64) / x.shape[0]
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        chol, dead = obs.inverse_cholesky(h)
        swept = obs.prune_levels(w, chol, dead, levels)
        obs.refine(w, swept[-1], h)                 # first-call costs (thread pools, MKL) out of the table
        for j, lvl in enumerate(levels):
            try:
                obs._ON_KEPT = False
                dense, t_dense = timed(obs.refine, w, swept[j], h)
                obs._ON_KEPT = True
                obs.SPARSE_REFIT_DENSITY, saved = 1.0, obs.SPARSE_REFIT_DENSITY
                sparse, t_sparse = timed(obs.refine, w, swept[j], h)
            finally:
                obs._ON_KEPT = True
                obs.SPARSE_REFIT_DENSITY = saved
            ratio = obs.reconstruction_error(w, sparse, h) / obs.reconstruction_error(w, dense, h)
            print(f"| {shape} | {lvl:.3f} | {t_dense:.3f} | {t_sparse:.3f} | {t_dense / t_sparse:.2f}x | "
                  f"{ratio:.6f} |", flush=True)
        try:
            obs._ON_KEPT = False
            _, t_off = timed(obs.best_reconstruction_levels, w, h, chol, dead, levels)
        finally:
            obs._ON_KEPT = True
        _, t_on = timed(obs.best_reconstruction_levels, w, h, chol, dead, levels)
        totals.append((shape, t_off, t_on))
    print("\n| shape | database step, dense GEMMs only s | with the sparse path s | saved |")
    print("|---|---|---|---|")
    for shape, t_off, t_on in totals:
        print(f"| {shape} | {t_off:.2f} | {t_on:.2f} | {100 * (1 - t_on / t_off):.0f}% |")
    if blas.backend() == "torch":
        print("\n" + alignment_check(rng, *shapes[0], levels[-1]))


def _at_alignment(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of float32 `a` whose data starts `offset` bytes past a 64-byte boundary."""
    buf = np.empty(a.size + 32, dtype=np.float32)
    shift = ((offset - buf.ctypes.data) % 64) // 4
    out = buf[shift:shift + a.size].reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 64 == offset
    return out


def alignment_check(rng, rows: int, cols: int, level: float) -> str:
    """Why blas.KeptProduct copies H into torch's memory: one product at `level` with H at a 64-byte
    boundary and at 16 bytes past one (where numpy's allocator can leave it)."""
    import torch
    x = rng.standard_normal((4 * cols, cols)).astype(np.float32)
    h = (x.T @ x / x.shape[0]).astype(np.float32)
    kept = np.flatnonzero(rng.random(rows * cols) >= level)
    values = rng.standard_normal(kept.size).astype(np.float32)
    product = blas.KeptProduct(kept, (rows, cols), h)
    times = {}
    for offset in (0, 16):
        product.b = torch.from_numpy(_at_alignment(h, offset))
        product(values)
        times[offset] = min(timed(product, values)[1] for _ in range(5))
    return (f"one sparse product, {rows}x{cols} at {level:.3f}: H 64-byte aligned {1000 * times[0]:.1f} ms, "
            f"16 bytes off {1000 * times[16]:.1f} ms ({times[16] / times[0]:.1f}x)")


if __name__ == "__main__":
    main()
