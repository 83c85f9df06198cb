"""How much does one pruned file's measured speedup move from one compile to the next?

`optimize` measures every candidate on a fresh compile of the dense and the pruned model, interleaved.
This script takes two profiles at the same aim, one level for every site (uniform) and the DP's mixed
profile (magnitude errors, fused groups tied), writes each with magnitude weights, and measures each
`--compiles` times, alternating between the two, each time on fresh compiles. It prints every speedup,
the median and the spread (max / min) per profile. Run it on a quiet machine; it is not a test.

    python benchmarks/compile_spread.py --model out/minilm-l6.onnx --cores 1 --aim 1.7 --compiles 6
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, modelio  # noqa: E402
from spdy_onnx.database import magnitude_database  # noqa: E402
from spdy_onnx.passes.prune import write_weights  # noqa: E402
from spdy_onnx.scores import magnitude_errors  # noqa: E402
from spdy_onnx.solver import solve_dp  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--aim", type=float, default=1.7, help="the speedup both profiles are solved for")
    p.add_argument("--compiles", type=int, default=6, help="fresh-compile measurements of each profile")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)

    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS,
                        progress=False)
    try:
        table = api.latency_table(prep, cache_dir=args.cache_dir)
        sites = [s for s in prep.sites if s.name in table.times]
        names = [s.name for s in sites]
        times = table.matrix(names)
        budget = table.dense_total_ms / args.aim - table.fixed_ms(names)
        sources = graph.read_weights(prep.model, sites)
        database = magnitude_database(sites, sources, list(table.levels), table.pattern)
        totals = times.sum(axis=0)
        uniform_level = next(j for j in np.argsort(table.levels) if totals[j] <= budget)
        mixed = solve_dp(magnitude_errors(sources, names, list(table.levels)), times, budget,
                         groups=table.tied_groups(names))
        profiles = {"uniform": {n: int(uniform_level) for n in names},
                    "mixed (DP)": {n: int(j) for n, j in zip(names, mixed)}}
        files = {}
        for kind, profile in profiles.items():
            pruned = write_weights(prep.model, {s.weight: database.weight(s.name, profile[s.name]) for s in sites})
            files[kind] = prep.static_copy(pruned, kind.split()[0])
        feeds = modelio.example_inputs(prep.specs)
        speedups = {kind: [] for kind in profiles}
        for k in range(args.compiles):
            for kind in (profiles if k % 2 == 0 else list(profiles)[::-1]):
                c = prep.runtime.compare(str(prep.dense_static()), str(files[kind]), batch_size=args.batch_size,
                                         feeds=feeds)
                speedups[kind].append(c.speedup)
                print(f"compile {k + 1} {kind}: {c.speedup:.3f}x", flush=True)
    finally:
        prep.close()

    print(f"\nmodel {Path(args.model).name} | DeepSparse, {args.cores} core(s), batch {args.batch_size} | aim "
          f"{args.aim:g}x | {args.compiles} fresh compiles of each file, {prep.runtime.rounds} interleaved rounds each")
    print("| profile | predicted | sparsity | measured per compile | median | max / min |\n|---|---|---|---|---|---|")
    for kind, profile in profiles.items():
        s = np.array(speedups[kind])
        sparsity = sum(table.levels[profile[x.name]] * x.n_weights for x in sites) / sum(x.n_weights for x in sites)
        print(f"| {kind} | {table.predicted_speedup(profile):.3f}x | {sparsity:.0%} | "
              f"{', '.join(f'{v:.3f}' for v in s)} | {np.median(s):.3f}x | {s.max() / s.min():.3f} |")


if __name__ == "__main__":
    main()
