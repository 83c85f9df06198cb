"""What LayerNormalization ops cost a sparse model on DeepSparse, and what rewriting them buys.

torch's exporter writes transformers with LayerNormalization ops from opset 17 on (its default), and
DeepSparse 1.8 hands that op to onnxruntime. This script times, on DeepSparse, the model as exported
and as `optimize` rewrites it (passes/decompose.py), each dense and with every default site
magnitude-pruned to `--sparsity`, all against the exported dense model, each pair interleaved (ABBA
rounds, medians), `--repeats` times; it prints the medians over the repeats and the engine's share of
ops it runs natively.

    python models/export_minilm.py --out out --opset 17
    python benchmarks/layernorm_opset.py --model out/minilm-l6-opset17.onnx --sparsity 0.8 --cores 1
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uniform_sweep import pruned as magnitude  # noqa: E402

from spdy_onnx import modelio  # noqa: E402
from spdy_onnx.passes.decompose import decompose_layernorm  # noqa: E402
from spdy_onnx.runtimes.deepsparse import DeepSparseRuntime  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="a model with LayerNormalization ops")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from deepsparse import compile_model

    exported = modelio.load_model(args.model)
    rewritten, count = decompose_layernorm(exported)
    if not count:
        raise SystemExit(f"{args.model} has no LayerNormalization op to rewrite")
    specs = modelio.input_specs(exported, args.batch_size, None)
    feeds = modelio.example_inputs(specs)
    runtime = DeepSparseRuntime(cores=args.cores, rounds=args.rounds, progress=False)
    files = {"exported, dense": exported, "rewritten, dense": rewritten,
             f"exported, {args.sparsity:.0%} magnitude": magnitude(exported, args.sparsity),
             f"rewritten, {args.sparsity:.0%} magnitude": magnitude(rewritten, args.sparsity)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, (name, m) in enumerate(files.items()):
            paths[name] = Path(tmp) / f"m{i}.onnx"
            modelio.save_model_atomic(modelio.with_static_inputs(m, specs), paths[name])
        native = {}
        for name, path in paths.items():   # compile a copy: the engine may rewrite the file it is given
            copy = Path(tmp) / "copy.onnx"
            copy.write_bytes(path.read_bytes())
            native[name] = compile_model(str(copy), batch_size=args.batch_size,
                                         num_cores=args.cores).fraction_of_supported_ops
        base = "exported, dense"
        speedups = {name: [] for name in paths if name != base}
        dense_ms = []
        for r in range(args.repeats):
            names = list(speedups) if r % 2 == 0 else list(reversed(speedups))
            for name in names:
                c = runtime.compare(str(paths[base]), str(paths[name]), batch_size=args.batch_size, feeds=feeds)
                speedups[name].append(c.speedup)
                dense_ms.append(c.baseline_ms)
                print(f"  repeat {r} {name}: {c.speedup:.3f}x (exported dense {c.baseline_ms:.2f} ms)", flush=True)
    print(f"\nmodel {args.model.name} | {count} LayerNormalization ops | batch {args.batch_size} | "
          f"cores {args.cores} | {platform.machine()}, {os.cpu_count()} CPUs | exported dense "
          f"{np.median(dense_ms):.2f} ms (median) | {args.repeats} repeats of {args.rounds} ABBA rounds")
    print("| file | ops run natively | speedup vs exported dense (median of repeats) | range |")
    print("|---|---|---|---|")
    print(f"| {base} | {native[base]:.0%} | 1.00x | - |")
    for name, values in speedups.items():
        print(f"| {name} | {native[name]:.0%} | {np.median(values):.2f}x | {min(values):.2f}-{max(values):.2f}x |")
    sparse_exported = np.median(speedups[f"exported, {args.sparsity:.0%} magnitude"])
    sparse_rewritten = np.median(speedups[f"rewritten, {args.sparsity:.0%} magnitude"])
    dense_rewritten = np.median(speedups["rewritten, dense"])
    print(f"\nsparse over dense, each graph its own baseline: exported {sparse_exported:.2f}x, "
          f"rewritten {sparse_rewritten / dense_rewritten:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
