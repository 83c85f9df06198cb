"""Does computing x^T x in column panels (blas.gram) pay against one full product?

Why: the Hessians of every site are sums of such products over calibration rows (spdy_onnx/calibrate.py),
and torch has no symmetric rank-k update, so blas.gram computes the panels on and above the diagonal
and mirrors them. This times both on random float32 rows of the widths of MiniLM-L6's and BERT-base's
site inputs, at the row count one flush of the Hessian accumulator gathers (calibrate.FLUSH_ELEMENTS),
and checks that the two agree. Not a test (tests/test_blas.py checks the values).

    python benchmarks/gram_panels.py --widths 384,768,1536,3072
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")   # before deepsparse is imported (for its CPU name)

import numpy as np  # noqa: E402

from spdy_onnx import blas, calibrate  # noqa: E402
from spdy_onnx.runtimes.deepsparse import cpu_name  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()                                             # first-call costs out of the timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="384,768,1536,3072", help="input widths (features)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per product (median)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"float32 | BLAS: {blas.backend()} | {cpu_name()}, {os.cpu_count()} CPUs | median of {args.repeats}\n")
    print("| rows x width | full product ms | panels ms | speedup | largest difference / largest entry |")
    print("|---|---|---|---|---|")
    for k in (int(v) for v in args.widths.split(",")):
        x = rng.standard_normal((calibrate.FLUSH_ELEMENTS // k, k)).astype(np.float32)
        full = best_of(lambda: blas.matmul(x.T, x), args.repeats)
        panels = best_of(lambda: blas.gram(x), args.repeats)
        ref = blas.matmul(x.T, x)
        diff = float(np.abs(blas.gram(x) - ref).max() / np.abs(ref).max())
        print(f"| {x.shape[0]} x {k} | {1000 * full:.1f} | {1000 * panels:.1f} | {full / panels:.2f}x | {diff:.1e} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
