"""Does timing two compiles of each model in one measurement make the measured speedup steadier?

Why: each DeepSparse compile of a file runs at its own speed for as long as it lives (a MiniLM-L6 draft
against itself on two fresh compiles: 3% standard deviation, the dense model 1.6%;
benchmarks/results/draft_vs_corrected_minilm_2x_self12.txt). `optimize` measures every candidate on one
fresh compile of each model, so one unlucky compile can fail a profile that meets the target, or pass
one that does not, and costs extra drafts and corrections. With `compiles` = k, one measurement times k
engines of each model in turn, in the same total time per round, and averages them.

This measures one pruned file against its dense model `--measurements` times for each value of
`--compiles` (alternating), and prints every speedup, their spread (standard deviation of the log) and the
seconds one measurement took. Run it on a quiet machine; it is not a test.

    python benchmarks/compiles_per_measurement.py --model out/minilm-l6.onnx --pruned dvc2/draft.onnx \
        --cores 1 --compiles 1,2 --measurements 8
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from spdy_onnx import api, graph, modelio  # noqa: E402
from spdy_onnx.runtimes.deepsparse import DeepSparseRuntime, cpu_name  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the dense ONNX file")
    p.add_argument("--pruned", required=True, help="a pruned file written from it")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--compiles", default="1,2", help="engines of each model per measurement, the values compared")
    p.add_argument("--measurements", type=int, default=8, help="measurements for each value")
    p.add_argument("--out", type=Path, default=None, help="also write every measurement as JSON")
    args = p.parse_args(argv)
    values = [int(v) for v in args.compiles.split(",")]

    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS,
                        progress=False)
    rows: dict[int, list[dict]] = {k: [] for k in values}
    try:
        dense, pruned = prep.dense_static(), prep.static_copy(onnx.load(args.pruned), "pruned")
        feeds = modelio.example_inputs(prep.specs)
        runtimes = {k: DeepSparseRuntime(cores=args.cores, compiles=k, progress=False) for k in values}
        for i in range(args.measurements):
            for k in (values if i % 2 == 0 else values[::-1]):
                t0 = time.perf_counter()
                c = runtimes[k].compare(str(dense), str(pruned), batch_size=prep.batch_size, feeds=feeds)
                rows[k].append({"speedup": c.speedup, "seconds": time.perf_counter() - t0,
                                "baseline_ms": c.baseline_ms, "candidate_ms": c.candidate_ms,
                                "load": c.foreign_load_cores})
                print(f"measurement {i + 1}, {k} compile(s) of each: {c.speedup:.3f}x ({c.baseline_ms:.2f} / "
                      f"{c.candidate_ms:.2f} ms, {rows[k][-1]['seconds']:.1f} s, load {c.foreign_load_cores:.1f} "
                      f"cores)", flush=True)
        rounds = runtimes[values[0]].rounds
    finally:
        prep.close()

    print(f"\nmodel {Path(args.model).name} against {Path(args.pruned).name} | DeepSparse, {cpu_name()}, "
          f"{args.cores} core(s), batch {prep.batch_size} | {args.measurements} measurements of each, "
          f"{rounds} interleaved rounds each, alternating")
    print("| compiles of each model | speedups | median | sd of log | max / min | s per measurement |")
    print("|---|---|---|---|---|---|")
    for k, rs in rows.items():
        s = np.array([r["speedup"] for r in rs])
        print(f"| {k} | {', '.join(f'{v:.3f}' for v in s)} | {np.median(s):.3f}x | {np.log(s).std(ddof=1):.4f} | "
              f"{s.max() / s.min():.3f} | {np.mean([r['seconds'] for r in rs]):.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
