"""Uniform magnitude pruning of a model's default sites: accuracy and DeepSparse speed per sparsity.

Why: before asking SPDY for a target, it helps to know what a model survives and where the engine
starts to pay. For each sparsity, every site `optimize` would choose for (default exclusions) is
magnitude-pruned to that sparsity; the speedup against the dense model is measured on DeepSparse at
each batch size (dense and pruned interleaved, medians), and for MobileNetV2 the top-1 on the 20
labelled images is computed with onnxruntime.

    python benchmarks/uniform_sweep.py --model out/mobilenetv2.onnx --labelled out/mobilenetv2_heldout.npz \
        --sparsities 0.2,0.3,0.4,0.5,0.6,0.75,0.9 --speed-sparsities 0.75,0.9 --batch-sizes 1,16 --cores 1
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from spdy_onnx import api, graph  # noqa: E402
from spdy_onnx.passes.prune import write_weights  # noqa: E402


def pruned(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    sites, _ = graph.find_sites(model)
    chosen, _ = graph.select_sites(sites)
    w = graph.read_weights(model, chosen)
    out = {}
    for s in chosen:
        a = w[s.name]
        out[s.weight] = np.where(np.abs(a) > np.quantile(np.abs(a), sparsity), a, 0).astype(a.dtype)
    return write_weights(model, out)


def top1(model: onnx.ModelProto, data: dict) -> int:
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x, y = data["input"], data["labels"]
    return sum(int(sess.run(None, {name: x[i:i + 1]})[0].argmax() == y[i]) for i in range(len(x)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--labelled", type=Path, default=None, help=".npz with `input` and `labels` (top-1)")
    p.add_argument("--sparsities", default="0.2,0.3,0.4,0.5,0.6,0.75,0.9")
    p.add_argument("--speed-sparsities", default="0.75,0.9")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    model = onnx.load(str(args.model))
    sparsities = [float(v) for v in args.sparsities.split(",")]
    speed_sparsities = [float(v) for v in args.speed_sparsities.split(",")]
    batches = [int(v) for v in args.batch_sizes.split(",")]
    labelled = dict(np.load(args.labelled)) if args.labelled else None
    print(f"model {args.model.name}; DeepSparse, {args.cores} core(s); uniform magnitude pruning of the default sites")
    head = ["sparsity"] + (["top-1 (onnxruntime)"] if labelled else []) + [f"speedup b{b}" for b in batches]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    if labelled:
        print("| dense | " + f"{top1(model, labelled)}/{len(labelled['labels'])} | " + " | ".join("1.00x" for _ in batches) + " |")
    with tempfile.TemporaryDirectory() as tmp:
        for s in sparsities:
            m = pruned(model, s)
            cells = [f"{s:.0%}"]
            if labelled:
                cells.append(f"{top1(m, labelled)}/{len(labelled['labels'])}")
            if s in speed_sparsities:
                path = Path(tmp) / f"u{s}.onnx"
                onnx.save(m, str(path))
                for b in batches:
                    c = api.benchmark(path, baseline=args.model, batch_size=b, cores=args.cores, progress=False,
                                      runtime_options={"rounds": args.rounds})
                    cells.append(f"{c.speedup:.2f}x (dense {c.baseline_ms:.1f} ms)")
            else:
                cells += ["-"] * len(batches)
            print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
