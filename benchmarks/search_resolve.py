"""How much does SPDY's search lose when the aim moves, and when it stops early?

`optimize` searches once at its first aim; after each measured draft the aim moves and the search is
re-solved under the new budget, starting from the best coefficients found so far. The kept profile is
usually one of these re-solves. For each pair of aims FIRST:SECOND and each seed this script runs, on
the same table, curves and calibration data:
  - first:        the search at FIRST as `optimize` runs it (its best c seeds the re-solves);
  - re-solve 30:  from that c at SECOND with 30 evaluations and no restarts (the rule before);
  - re-solve:     from that c at SECOND as `optimize` runs it now (search.resolve_evaluations, restarts);
  - fresh, stop:  a new search at SECOND that stops when its local search converges (the paper's rule);
  - fresh:        a new search at SECOND as `optimize` runs it now (restarts until the budget is spent).
Evaluations are cached in the run's evaluation journal (`--cache-dir`); a cached evaluation is nearly free,
so the time-bounded searches of a rerun make more evaluations. No engine is run: the table is read from a
file (`spdy-onnx profile -o table.json`, or a cached table).

    python benchmarks/search_resolve.py --model out/mobilenetv2.onnx --table mobilenetv2.table.json \\
        --data out/mobilenetv2_calib.npz --batch-size 16 --pairs 1.122:1.156,1.2:1.3,1.3:1.4 --seeds 1,2
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, search, strategies  # noqa: E402
from spdy_onnx.solver import solve_dp  # noqa: E402
from spdy_onnx.tables import LatencyTable  # noqa: E402

COLUMNS = ("first", "re-solve 30", "re-solve", "fresh, stop", "fresh")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--table", required=True, help="latency table JSON")
    p.add_argument("--data", required=True, help="calibration .npz")
    p.add_argument("--pairs", required=True, help="FIRST:SECOND aims, comma-separated, e.g. 1.2:1.3,1.3:1.4")
    p.add_argument("--seeds", default="1,2", help="comma-separated search seeds")
    p.add_argument("--seconds", type=float, default=search.DEFAULT_SECONDS, help="search budget in seconds")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    pairs = [tuple(float(a) for a in pair.split(":")) for pair in args.pairs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    prep = api.Prepared(args.model, runtime="table", batch_size=args.batch_size, cores=1, input_shapes=None,
                        exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS, progress=False)
    table = LatencyTable.load(args.table)
    sites = [s for s in prep.sites if s.name in table.times]
    names = [s.name for s in sites]
    n, n_levels = len(names), len(table.levels)
    times = table.matrix(names)
    groups = table.tied_groups(names)

    def chooser(seed):
        return strategies.make_chooser("spdy", prep=prep, sites=sites, table=table, data=args.data, samples=None,
                                       reconstruct="obs", loss="auto", search_budget=f"{args.seconds}s", seed=seed,
                                       cache_dir=args.cache_dir, progress=False)

    def budget(aim):
        return table.dense_total_ms / aim - table.fixed_ms(names)

    rows = []
    for first, second in pairs:
        for seed in seeds:
            t0 = time.perf_counter()
            ch = chooser(seed)
            ch.choose(times, budget(first))           # as optimize: curves, then the first search
            best_c = ch.best_c.copy()
            first_stats = ch.info["search"][0]
            shape = ch._error_shape(n, n_levels)
            resolved = ch.evaluator.loss(ch.choose(times, budget(second)))   # as optimize re-solves now

            def profile_of(c):
                return solve_dp(np.asarray(c)[:, None] * shape, times, budget(second), groups=groups)

            old = search.spdy_search(n, n_levels, profile_of, ch.evaluator.loss, seed=seed + 1, start=best_c,
                                     max_evals=search.RESOLVE_EVALS, patience=search.RESOLVE_EVALS,
                                     restarts=False, progress=False)[2]
            fresh_common = dict(seed=seed, seeds=[np.full(n, 0.5)], n_init=ch._random_starts(),
                                max_seconds=ch.max_seconds, progress=False)
            stop = search.spdy_search(n, n_levels, profile_of, ch.evaluator.loss, restarts=False, **fresh_common)
            fresh = search.spdy_search(n, n_levels, profile_of, ch.evaluator.loss, **fresh_common)
            row = dict(first=first, second=second, seed=seed, losses=(first_stats["best_loss"], old, resolved,
                                                                      stop[2], fresh[2]),
                       evaluations=(first_stats["evaluations"], search.RESOLVE_EVALS, ch.info["search"][1]["evaluations"],
                                    stop[3]["evaluations"], fresh[3]["evaluations"]))
            rows.append(row)
            print(f"{first:g}x -> {second:g}x seed {seed}: " + ", ".join(
                f"{c} {v:.4f}" for c, v in zip(COLUMNS, row["losses"])) + f" ({time.perf_counter() - t0:.0f} s)",
                flush=True)
    prep.close()

    print(f"\nmodel {os.path.basename(args.model)} | batch {args.batch_size} | {n} sites | search budget "
          f"{args.seconds:g} s | calibration loss of the best profile (evaluations in brackets)")
    print("| aims | seed | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = " | ".join(f"{v:.4f} ({e})" for v, e in zip(r["losses"], r["evaluations"]))
        print(f"| {r['first']:g}x -> {r['second']:g}x | {r['seed']} | {cells} |")
    means = np.mean([r["losses"] for r in rows], axis=0)
    print("| mean | | " + " | ".join(f"{v:.4f}" for v in means) + " |")


if __name__ == "__main__":
    main()
