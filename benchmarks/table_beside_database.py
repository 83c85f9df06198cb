"""Does the OBS database built during profiling change the latency table?

Why: `optimize` builds the database in a child process while the engine profiles
(spdy_onnx/early_database.py). The child is stopped whenever an engine times, but it runs while the
engine compiles. This profiles the model alternately with the machine otherwise quiet and with the real
child building the real database (a fresh cache each time, so it works through the profiling), and
compares what the solver reads from each table: the dense total, each level's summed site times, and
the predicted speedup of every uniform level. Not a test.

    python benchmarks/table_beside_database.py --model out/minilm-l6.onnx --data out/minilm_calib.npz --pairs 2
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, calibrate, early_database, graph, modelio  # noqa: E402
from spdy_onnx.runtimes import deepsparse as ds  # noqa: E402


def uniform_speedups(table) -> list[float]:
    """Predicted speedup of every site at level j, for each level (the table's own arithmetic)."""
    names = list(table.times)
    times = table.matrix(names)
    fixed = table.dense_total_ms - times[:, 0].sum()
    return [table.dense_total_ms / (fixed + times[:, j].sum()) for j in range(len(table.levels))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS,
                        progress=False)
    ways = ("quiet", "beside the database")
    tables = {w: [] for w in ways}
    walls = {w: [] for w in ways}
    try:
        data = calibrate.load_data(args.data, prep.specs, index_rows=prep.index_rows,
                                   defaults=modelio.inputs_with_defaults(prep.model))
        levels = prep.runtime.default_levels()
        feeds = prep.example_inputs()
        aliases = graph.output_aliases(prep.model, prep.all_sites)
        for k in range(args.pairs):
            for way in (ways if k % 2 == 0 else ways[::-1]):
                rt = ds.DeepSparseRuntime(cores=args.cores, progress=False)
                with tempfile.TemporaryDirectory(prefix="spdy-table-beside-") as cache:
                    child = None
                    if way != "quiet":
                        child = early_database.start(prep, prep.sites, levels, data, pattern=rt.pattern,
                                                     cache_dir=Path(cache))
                        rt.quiet = [child.identity]
                    t0 = time.perf_counter()
                    try:
                        table = rt.measure(str(prep.dense_static()), prep.all_sites, levels=levels,
                                           batch_size=args.batch_size, feeds=feeds, aliases=aliases)
                    finally:
                        if child is not None:
                            child.cancel()
                    walls[way].append(time.perf_counter() - t0)
                tables[way].append(table)
                print(f"pair {k + 1}, {way}: {walls[way][-1]:.0f} s, dense {table.dense_total_ms:.2f} ms, uniform "
                      + ", ".join(f"{lvl:.2f}: {s:.2f}x" for lvl, s in zip(levels[1:], uniform_speedups(table)[1:])),
                      flush=True)
    finally:
        prep.close()
    print(f"\nmodel {os.path.basename(args.model)} | batch {args.batch_size} | engine cores {args.cores} | "
          f"{ds.cpu_name()}, {ds.usable_cpus()} usable CPUs | {len(levels)} levels | {args.pairs} pairs, alternated")
    print("| profiled | wall s | dense total ms | " + " | ".join(f"uniform {lvl:.2f}" for lvl in levels[1:]) + " |")
    print("|---|---|---|" + "---|" * (len(levels) - 1))
    for way in ways:
        for table, wall in zip(tables[way], walls[way]):
            print(f"| {way} | {wall:.0f} | {table.dense_total_ms:.2f} | "
                  + " | ".join(f"{s:.3f}x" for s in uniform_speedups(table)[1:]) + " |")
    for way in ways:
        ratios = np.array([uniform_speedups(t)[1:] for t in tables[way]])
        print(f"{way}: median over its tables and the levels of the predicted uniform speedup "
              f"{statistics.median(ratios.ravel()):.3f}x")
    quiet = np.array([uniform_speedups(t)[1:] for t in tables[ways[0]]])
    beside = np.array([uniform_speedups(t)[1:] for t in tables[ways[1]]])
    print("beside / quiet, per level (medians over tables): "
          + ", ".join(f"{lvl:.2f}: {b / q:.3f}" for lvl, b, q in
                      zip(levels[1:], np.median(beside, axis=0), np.median(quiet, axis=0))))


if __name__ == "__main__":
    raise SystemExit(main())
