"""Where 2:4 pays on this GPU: one GEMM y = x @ W^T (x: M x K, W: N x K, fp16) timed dense (cuBLAS) and
through every 2:4 backend the cuda-2:4 runtime uses, over the layer shapes of MiniLM-L6 (384/1536),
BERT-base (768/3072) and larger (4096/16384), at several activation row counts M (batch x tokens).

Same timing as the runtime's per-site table: CUDA-graph replays, CUDA events, dense and 2:4 interleaved,
medians of 11 rounds. Prints a table of times and dense/2:4 ratios (>1: 2:4 is faster), writes JSON.

    python benchmarks/gpu_gemm_sweep.py [--out gemm_sweep.json] [--m 4096,16384,65536]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

SHAPES = [(384, 384), (1536, 384), (384, 1536), (768, 768), (3072, 768), (768, 3072),
          (4096, 4096), (16384, 4096), (4096, 16384)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--m", default="4096,16384,65536", help="activation row counts (batch x tokens)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of this script's code path with small shapes (not GPU times)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from spdy_onnx.runtimes import torch_onnx as tx
    from spdy_onnx.runtimes.cuda_sparse import CudaSemiStructuredRuntime, _bind

    dev = args.device
    shapes = SHAPES
    if dev == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA GPU here (--device cpu for a dry run)", file=sys.stderr)
            return 2
        dtype = getattr(torch, args.dtype)
        backends = tx.sparse_backends("cuda", dtype)
        gpu = torch.cuda.get_device_name()
        version = torch.backends.cusparselt.version()
    else:
        dtype, backends, gpu, version = torch.float32, ["reference"], "CPU DRY RUN (not a GPU)", None
        shapes = SHAPES[:2]
    rt = CudaSemiStructuredRuntime(progress=False, device=dev)
    print(f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuSPARSELt {version}; "
          f"{str(dtype).replace('torch.', '')}; backends that run here: {', '.join(backends)}")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    t0 = time.perf_counter()
    for m in [int(v) for v in args.m.split(",")]:
        for n, k in shapes:
            w = tx.prune_matrix_2_4(torch.randn(n, k, generator=gen, device=dev))
            x = torch.randn(m, k, generator=gen, device=dev).to(dtype)
            fns = {"dense": _bind(tx.LinearKernel(w, None, device=dev, dtype=dtype, backend=None), x)}
            failed = {}
            for b in backends:
                try:
                    fns[b] = _bind(tx.LinearKernel(w, None, device=dev, dtype=dtype, backend=b), x)
                except Exception as exc:  # noqa: BLE001
                    failed[b] = str(exc).splitlines()[0][:120]
            fns = rt._runnable(torch, fns, failed)
            res, _ = rt._time_interleaved(torch, fns, rt.site_rounds)
            med = {key: float(np.median(v)) for key, v in res.items()}
            flops = 2.0 * m * n * k
            row = {"m": m, "n": n, "k": k, "ms": med, "failed": failed,
                   "dense_tflops": flops / (med["dense"] * 1e-3) / 1e12}
            rows.append(row)
            del fns, x
            if dev == "cuda":
                torch.cuda.empty_cache()
    head = "| M | N | K | dense ms (TFLOP/s) | " + " | ".join(f"{b} ms (dense/2:4)" for b in backends) + " |"
    lines = [head, "|" + "---|" * (4 + len(backends))]
    for r in rows:
        cells = []
        for b in backends:
            t = r["ms"].get(b)
            cells.append(f"{t:.4f} ({r['ms']['dense'] / t:.2f}x)" if t else "fails")
        lines.append(f"| {r['m']} | {r['n']} | {r['k']} | {r['ms']['dense']:.4f} ({r['dense_tflops']:.0f}) | "
                     + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": args.dtype,
                       "backends": backends, "rows": rows, "markdown": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
