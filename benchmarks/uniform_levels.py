"""Does each level of a freshly profiled table hold end to end? Uniform files against the table.

For each `--levels` value, every site `optimize` would choose for is magnitude-pruned to the table's
nearest level, and the file's speedup over the dense model is measured twice on DeepSparse (dense and
pruned interleaved, medians) and set beside the table's prediction for that uniform profile. The
table is profiled by the same code as `optimize` (into `--cache-dir`, reused when current).

    python benchmarks/uniform_levels.py --model out/minilm-l6.onnx --levels 0.4,0.54,0.65,0.8 --cores 1
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from uniform_sweep import pruned  # noqa: E402

from spdy_onnx import api, graph, modelio  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--levels", default="0.4,0.54,0.65,0.8")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary folder")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                            input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS,
                            progress=False)
        try:
            table = api.latency_table(prep, cache_dir=args.cache_dir or tmp)
            names = [s.name for s in prep.sites]
            feeds = modelio.example_inputs(prep.specs)
            print(f"model {args.model.name} | batch {args.batch_size} | cores {args.cores} | {platform.machine()}, "
                  f"{os.cpu_count()} CPUs | table profiled in {table.meta.get('seconds', 0):.0f} s")
            print("| level | predicted | measured (two) | measured / predicted |")
            print("|---|---|---|---|")
            for value in (float(v) for v in args.levels.split(",")):
                j = min(range(len(table.levels)), key=lambda k: abs(table.levels[k] - value))
                predicted = table.predicted_speedup({n: j for n in names})
                path = prep.static_copy(pruned(prep.model, table.levels[j]), f"uniform{j}")
                measured = [prep.runtime.compare(str(prep.dense_static()), str(path), batch_size=args.batch_size,
                                                 feeds=feeds).speedup for _ in range(2)]
                mean = (measured[0] * measured[1]) ** 0.5
                print(f"| {table.levels[j]:.3f} | {predicted:.3f}x | {measured[0]:.3f}x, {measured[1]:.3f}x | "
                      f"{mean / predicted:.3f} |", flush=True)
        finally:
            prep.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
