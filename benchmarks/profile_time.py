"""Profiling time with one engine compile at a time against compiles side by side, and what that does to the timing.

Why: a profiling run is one engine compile plus a short timing per level; the compile is single-threaded
and takes most of the time (MiniLM-L6: 2-6 s against 0.2-1 s of timing), so compiling levels side by
side on spare cores (`compile_threads` of the DeepSparse runtime; the timing still runs alone, after the
compiles) would cut profiling time. This runs one pass over the default levels (no cache) each way,
alternating, and prints each pass's wall time and how far the tables are apart. With --bias-checks N it
then compiles the dense model and one sparse level N times each way and times each engine alone,
interleaved: does compiling side by side change what the timing sees? (It did: the runtime compiles
one at a time by default.) Not a test.

    python benchmarks/profile_time.py --model out/minilm-l6.onnx --cores 1 --pairs 2 --bias-checks 8
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, modelio  # noqa: E402
from spdy_onnx.levels import log_density_grid  # noqa: E402
from spdy_onnx.runtimes import deepsparse as ds  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--cores", type=int, default=1, help="engine cores for the timing")
    ap.add_argument("--pairs", type=int, default=2, help="passes of each setting, alternating")
    ap.add_argument("--bias-checks", type=int, default=0,
                    help="times to compile and time two levels each way (one at a time, side by side)")
    ap.add_argument("--check-level", type=float, default=0.8)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    parallel = max(2, min(ds.MAX_COMPILE_THREADS, ds.usable_cpus()))
    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS,
                        progress=False)
    levels = log_density_grid()
    settings = [1, parallel]
    walls: dict[int, list[float]] = {k: [] for k in settings}
    tables: dict[int, list] = {k: [] for k in settings}
    bias: dict[str, dict[float, list[float]]] = {}
    try:
        path = str(prep.dense_static())
        feeds = modelio.example_inputs(prep.specs)
        aliases = graph.output_aliases(prep.model, prep.all_sites)
        for pair in range(args.pairs):
            for threads in (settings if pair % 2 == 0 else settings[::-1]):
                rt = ds.DeepSparseRuntime(cores=args.cores, repeats=1, progress=False, compile_threads=threads)
                t0 = time.perf_counter()
                table = rt.measure(path, prep.sites, levels=levels, batch_size=args.batch_size, feeds=feeds,
                                   aliases=aliases)
                walls[threads].append(time.perf_counter() - t0)
                tables[threads].append(table)
                print(f"pass {pair + 1}, compile threads {threads}: {walls[threads][-1]:.1f} s, "
                      f"dense {table.dense_total_ms:.2f} ms", flush=True)
        if args.bias_checks:
            bias = compile_bias(path, feeds, args.cores, args.batch_size, args.check_level, args.bias_checks,
                                parallel)
    finally:
        prep.close()

    def site_totals(table):   # per-level sum over sites: what the solver adds up
        return np.array([sum(t[i] for t in table.times.values()) for i in range(len(levels))])

    print(f"\nmodel {os.path.basename(args.model)} | batch {args.batch_size} | engine cores {args.cores} | "
          f"{ds.cpu_name()}, {ds.usable_cpus()} usable CPUs | {len(levels)} levels, one pass each, no cache")
    print("| compile threads | passes | wall, median (s) | walls (s) |")
    print("|---|---|---|---|")
    for k in settings:
        print(f"| {k} | {len(walls[k])} | {statistics.median(walls[k]):.1f} | "
              f"{', '.join(f'{w:.1f}' for w in walls[k])} |")
    ratio = statistics.median(walls[1]) / statistics.median(walls[parallel])
    print(f"\none at a time / side by side: {ratio:.2f}x")
    one = np.median([site_totals(t) for t in tables[1]], axis=0)
    par = np.median([site_totals(t) for t in tables[parallel]], axis=0)
    within_one = [np.max(np.abs(site_totals(a) / site_totals(b) - 1)) for i, a in enumerate(tables[1])
                  for b in tables[1][i + 1:]]
    print("sum of site times per level, side by side / one at a time (medians over passes): "
          + ", ".join(f"{lvl:.2f}: {p / o:.3f}" for lvl, p, o in zip(levels, par, one)))
    if within_one:
        print(f"for scale, two passes of one at a time differ by up to {100 * max(within_one):.1f}% at a level")
    if bias:
        print(f"\nthe dense model and level {args.check_level:g} compiled {args.bias_checks} times each way, "
              "each engine then timed alone (engine total, ms):")
        print("| compiled | level | median | min | max |")
        print("|---|---|---|---|---|")
        for way, by_level in bias.items():
            for lvl, values in by_level.items():
                print(f"| {way} | {lvl:g} | {statistics.median(values):.2f} | {min(values):.2f} | "
                      f"{max(values):.2f} |")
    return 0


def compile_bias(path, feeds, cores, batch_size, level, n, parallel):
    """Engine totals of the same two levels compiled one after the other, or side by side, interleaved."""
    rt = ds.DeepSparseRuntime(cores=cores, progress=False)
    inputs = [np.ascontiguousarray(a) for a in feeds.values()]
    levels = [0.0, level]
    ways = {"one at a time": 1, "side by side": parallel}
    out = {way: {lvl: [] for lvl in levels} for way in ways}
    for k in range(n):
        for way in (list(ways) if k % 2 == 0 else list(ways)[::-1]):
            engines = ds.compile_in_parallel(lambda lvl: rt._compile(path, batch_size, lvl), levels, ways[way])
            for lvl in levels:
                out[way][lvl].append(float(rt._analyse_engine(engines.pop(0), inputs, lvl)["average_total_time"]))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
