"""Dense products on numpy's bundled OpenBLAS against PyTorch's BLAS, and what that does to the OBS database.

Why: numpy's OpenBLAS chooses its kernels from the CPU model and falls back to a generic one on virtual
CPUs it does not recognise; the OBS database, the Hessians and the refits are GEMM-bound, so they run
through spdy_onnx.blas, which uses PyTorch when it is installed. This measures, in one process and
interleaved: a float32 GEMM of the refit's largest shape, and the reconstruction of every site of a
model at every default level from its real Hessians (calibration data as given). Not a test.

    python benchmarks/blas_speed.py --model out/minilm-l6.onnx --data out/minilm_calib.npz
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, blas, calibrate, graph, levels as grid, obs, reconstruct  # noqa: E402
from spdy_onnx.runtimes.deepsparse import cpu_name  # noqa: E402


def openblas_architecture() -> str:
    try:
        import threadpoolctl
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    for info in threadpoolctl.threadpool_info():
        if info.get("internal_api") == "openblas" and "numpy" in info.get("filepath", ""):
            return f"{info.get('architecture')} ({info.get('num_threads')} threads)"
    return "unknown"


def on_backend(name: str, fn):
    """fn() with spdy_onnx.blas on `name` ('numpy' or 'torch'); its wall time."""
    real = blas._torch
    if name == "numpy":
        blas._torch = lambda: None
    try:
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0
    finally:
        blas._torch = real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="calibration .npz")
    ap.add_argument("--samples", type=int, default=reconstruct.HESSIAN_SAMPLES)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if blas.backend() != "torch":
        raise SystemExit("PyTorch is not installed: nothing to compare")

    rng = np.random.default_rng(0)
    a = rng.standard_normal((12 * 384, 1536)).astype(np.float32)
    b = rng.standard_normal((1536, 1536)).astype(np.float32)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]

    prep = api.Prepared(args.model, runtime="table", batch_size=1, cores=None, input_shapes=None, exclude=None,
                        include=None, min_weights=4096, progress=False)
    try:
        data = calibrate.load_data(args.data, prep.specs, samples=args.samples)
        sites = prep.sites
        t0 = time.perf_counter()
        hess = calibrate.hessians(prep.calibration_model, sites, data, prep.batch_size, progress=False)
        t_hess = time.perf_counter() - t0
        sources = graph.read_weights(prep.model, sites)
    finally:
        prep.close()
    levels = grid.log_density_grid()
    supported = [s for s in sites if s.name in hess]

    def database():
        errors = []
        for site in supported:
            w = site.to_matrix(sources[site.name])
            stack = reconstruct._reconstruct_site(site, sources[site.name], hess[site.name], levels,
                                                  "unstructured", 0.01)
            errors.append(obs.reconstruction_error(w, site.to_matrix(stack[-1]), hess[site.name]))
        return float(np.mean(errors))

    gemm_s = {"numpy": [], "torch": []}
    db_s = {"numpy": [], "torch": []}
    err = {}
    for _ in range(args.repeats):
        for name in ("numpy", "torch"):          # interleaved, so a slow minute hits both
            for _ in range(3):
                gemm_s[name].append(on_backend(name, lambda: blas.matmul(a, b))[1])
            err[name], dt = on_backend(name, database)
            db_s[name].append(dt)

    print(f"model {os.path.basename(args.model)} | {len(supported)} sites x {len(levels) - 1} levels | "
          f"{calibrate.n_samples(data)} calibration samples (Hessians {t_hess:.1f} s) | {cpu_name()}, "
          f"{os.cpu_count()} CPUs | numpy's OpenBLAS kernels: {openblas_architecture()} | "
          f"repeats {args.repeats}, medians")
    print("| | numpy's BLAS | PyTorch's BLAS | ratio |")
    print("|---|---|---|---|")
    g = {k: flops / statistics.median(v) / 1e9 for k, v in gemm_s.items()}
    print(f"| float32 GEMM {a.shape[0]}x{a.shape[1]} @ {b.shape[0]}x{b.shape[1]} (GFLOP/s) | {g['numpy']:.0f} | "
          f"{g['torch']:.0f} | {g['torch'] / g['numpy']:.1f}x |")
    d = {k: statistics.median(v) for k, v in db_s.items()}
    print(f"| OBS database, all sites and levels (s) | {d['numpy']:.1f} | {d['torch']:.1f} | "
          f"{d['numpy'] / d['torch']:.1f}x |")
    print(f"| mean reconstruction error at {levels[-1]:.2f} (check) | {err['numpy']:.5f} | {err['torch']:.5f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
