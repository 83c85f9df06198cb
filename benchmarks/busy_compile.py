"""Does work on the spare core while DeepSparse compiles change how fast the compiled engine runs?

Why: the OBS database is built in a child process while the engine profiles (spdy_onnx/early_database.py).
That child is stopped whenever an engine times, but it runs while the engine compiles. Compiling two
engines side by side made them time up to 2x slow at random (benchmarks/profile_time.py), so this
checks the case the database brings: one engine compiling while a one-thread GEMM loop (what the
database's products are) runs on the other core, then the loop stopped (SIGSTOP) and the engine timed
alone, against the same compile with the machine quiet, alternated, the dense model and one sparse level.
Not a test.

    python benchmarks/busy_compile.py --model out/minilm-l6.onnx --pairs 8
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import subprocess
import sys
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, modelio  # noqa: E402
from spdy_onnx.runtimes import deepsparse as ds  # noqa: E402

BUSY = ("import torch\n"
        "torch.set_num_threads(1)\n"
        "a = torch.randn(1024, 1024)\n"
        "while True:\n"
        "    a = (a @ a) * 1e-3 + 1\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--level", type=float, default=0.8)
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS,
                        progress=False)
    levels = (0.0, args.level)
    ways = ("quiet", "busy")
    timed = {w: {lvl: [] for lvl in levels} for w in ways}
    compile_s = {w: [] for w in ways}
    try:
        path = str(prep.dense_static())
        inputs = [np.ascontiguousarray(a) for a in modelio.example_inputs(prep.specs).values()]
        rt = ds.DeepSparseRuntime(cores=args.cores, progress=False)
        for k in range(args.pairs):
            for way in (ways if k % 2 == 0 else ways[::-1]):
                helper = subprocess.Popen([sys.executable, "-c", BUSY]) if way == "busy" else None
                if helper is not None:
                    time.sleep(1.0)   # past its start-up
                try:
                    engines = []
                    for lvl in levels:
                        t0 = time.perf_counter()
                        engines.append(rt._compile(path, args.batch_size, lvl))
                        compile_s[way].append(time.perf_counter() - t0)
                    if helper is not None:
                        helper.send_signal(signal.SIGSTOP)
                        time.sleep(0.05)
                    for lvl, engine in zip(levels, engines):
                        timed[way][lvl].append(float(rt._analyse_engine(engine, inputs, lvl)["average_total_time"]))
                finally:
                    if helper is not None:
                        helper.kill()
                        helper.wait()
                print(f"pair {k + 1}, {way}: " + ", ".join(f"level {lvl:g} {timed[way][lvl][-1]:.2f} ms"
                                                          for lvl in levels), flush=True)
    finally:
        prep.close()
    print(f"\nmodel {os.path.basename(args.model)} | batch {args.batch_size} | engine cores {args.cores} | "
          f"{ds.cpu_name()}, {ds.usable_cpus()} usable CPUs | {args.pairs} pairs, alternated")
    print("| compiled | level | engine total, median ms | min | max | compile s, median |")
    print("|---|---|---|---|---|---|")
    for way in ways:
        for lvl in levels:
            v = timed[way][lvl]
            print(f"| {way} | {lvl:g} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} | "
                  f"{statistics.median(compile_s[way]):.2f} |")
    for lvl in levels:
        ratio = statistics.median(timed["busy"][lvl]) / statistics.median(timed["quiet"][lvl])
        print(f"level {lvl:g}: busy / quiet {ratio:.3f}")
    speed = {w: statistics.median(timed[w][0.0]) / statistics.median(timed[w][args.level]) for w in ways}
    print(f"level {args.level:g}'s speedup over dense: quiet {speed['quiet']:.3f}x, busy {speed['busy']:.3f}x")


if __name__ == "__main__":
    raise SystemExit(main())
