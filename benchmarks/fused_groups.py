"""Do tied fused groups make the table's predictions hold on the engine?

DeepSparse runs some groups of sites as one fused kernel while they are dense (MobileNetV2's early
expand-depthwise-project blocks). The table times each level with every site at that level, so it
never sees a group half sparse. This script solves the DP twice at each aim, once ignoring the fused
groups and once keeping each group at one level (what `optimize` does), writes both profiles with
magnitude weights, and measures each against the dense model end to end (interleaved, medians).
It prints the predicted and measured speedups side by side. Run it on a quiet machine; it is not a test.

    python benchmarks/fused_groups.py --model out/mobilenetv2.onnx --batch-size 16 --cores 1 --aims 1.2,1.35
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
    p.add_argument("--aims", default="1.2,1.35", help="speedups to solve for, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="end-to-end measurements of each profile")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)

    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS, progress=False)
    try:
        table = api.latency_table(prep, cache_dir=args.cache_dir)
        sites = [s for s in prep.sites if s.name in table.times]
        names = [s.name for s in sites]
        groups = table.tied_groups(names)
        times = table.matrix(names)
        sources = graph.read_weights(prep.model, sites)
        errors = magnitude_errors(sources, names, list(table.levels))
        database = magnitude_database(sites, sources, list(table.levels), table.pattern)
        feeds = modelio.example_inputs(prep.specs)
        rows = []
        for aim in [float(a) for a in args.aims.split(",")]:
            budget = table.dense_total_ms / aim - table.fixed_ms(names)
            for kind, tie in (("untied", None), ("tied", groups)):
                picks = solve_dp(errors, times, budget, groups=tie)
                profile = {n: int(j) for n, j in zip(names, picks)}
                mixed = sum(len({profile[names[i]] for i in g}) > 1 for g in groups)
                pruned = write_weights(prep.model, {s.weight: database.weight(s.name, profile[s.name]) for s in sites})
                candidate = prep.static_copy(pruned, f"{kind}-{aim}")
                measured = [prep.runtime.compare(str(prep.dense_static()), str(candidate), batch_size=args.batch_size,
                                                 feeds=feeds).speedup for _ in range(args.repeats)]
                sparsity = sum(table.levels[profile[s.name]] * s.n_weights for s in sites) / sum(s.n_weights for s in sites)
                rows.append((aim, kind, mixed, table.predicted_speedup(profile), measured, sparsity))
                print(f"aim {aim:g} {kind}: predicted {rows[-1][3]:.3f}x, measured "
                      f"{', '.join(f'{m:.3f}x' for m in measured)}", flush=True)
    finally:
        prep.close()

    print(f"\nmodel {Path(args.model).name} | DeepSparse, {args.cores} core(s), batch {args.batch_size} | "
          f"{len(sites)} sites, {len(groups)} fused groups among them (sizes "
          f"{', '.join(str(len(g)) for g in groups) or '-'}) | magnitude errors, magnitude weights | "
          f"{args.repeats} interleaved measurements of {prep.runtime.rounds} rounds each")
    print("| aim | DP | fused groups left mixed | predicted | measured (median) | measured / predicted | sparsity |")
    print("|---|---|---|---|---|---|---|")
    for aim, kind, mixed, predicted, measured, sparsity in rows:
        med = float(np.median(measured))
        print(f"| {aim:g}x | {kind} | {mixed} | {predicted:.3f}x | {med:.3f}x ({', '.join(f'{m:.3f}' for m in measured)}) "
              f"| {med / predicted:.3f} | {sparsity:.0%} |")


if __name__ == "__main__":
    main()
