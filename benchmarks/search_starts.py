"""How should SPDY's search spend a small budget when it starts from measured loss curves?

With `--search-prior auto|losses` the coefficients scale each site's measured loss curve, and c = 1
(or any constant c) is dp-loss's own profile. This script runs the search three ways on the same
curves, the same table and the same evaluation budget, and prints the best calibration loss of each:
  - paper: dp-loss's profile first, then the paper's 100 random starts, then local search;
  - local: local search from c = 0.5 only;
  - third: dp-loss's profile first, random starts for a third of the budget, then local search
    (what `optimize` does).
Evaluations are cached in the run's evaluation journal (`--cache-dir`), so a rerun repeats the same
numbers quickly. No engine is run: the table is read from a file (`spdy-onnx profile -o table.json`).

    python benchmarks/search_starts.py --model out/minilm-l6.onnx --table minilm.table.json \\
        --data out/minilm_calib.npz --aim 2.13 --evaluations 64 --levels-measured 4,8,12
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, strategies  # noqa: E402
from spdy_onnx.search import single_site_losses, spdy_search  # noqa: E402
from spdy_onnx.solver import solve_dp  # noqa: E402
from spdy_onnx.tables import LatencyTable  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--table", required=True, help="latency table JSON")
    p.add_argument("--data", required=True, help="calibration .npz")
    p.add_argument("--aim", type=float, required=True, help="speedup the DP solves for")
    p.add_argument("--evaluations", type=int, default=64, help="search budget in evaluations")
    p.add_argument("--levels-measured", default=None,
                   help="sparse level indices of the loss curves, comma-separated (default: all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)

    prep = api.Prepared(args.model, runtime="table", batch_size=args.batch_size, cores=1, input_shapes=None,
                        exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS, progress=False)
    table = LatencyTable.load(args.table)
    sites = [s for s in prep.sites if s.name in table.times]
    names = [s.name for s in sites]
    n_levels = len(table.levels)
    chooser = strategies.make_chooser("dp-loss", prep=prep, sites=sites, table=table, data=args.data, samples=None,
                                      reconstruct="obs", loss="auto", search_budget=None, seed=0,
                                      cache_dir=args.cache_dir, progress=False)
    evaluator = chooser.evaluator
    levels = None if args.levels_measured is None else [int(j) for j in args.levels_measured.split(",")]
    curves = single_site_losses(evaluator, n_levels, levels=levels, progress=False)
    times = table.matrix(names)
    budget = table.dense_total_ms / args.aim - table.fixed_ms(names)
    groups = table.tied_groups(names)

    def profile_of(c):
        return solve_dp(np.asarray(c)[:, None] * curves, times, budget, groups=groups)

    n = len(names)
    dp_loss = evaluator.loss(profile_of(np.ones(n)))
    rows = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        common = dict(seed=seed, max_evals=args.evaluations, progress=False)
        paper = spdy_search(n, n_levels, profile_of, evaluator.loss, seeds=[np.ones(n)], **common)[2]
        local = spdy_search(n, n_levels, profile_of, evaluator.loss, start=np.full(n, 0.5), **common)[2]
        third = spdy_search(n, n_levels, profile_of, evaluator.loss, seeds=[np.full(n, 0.5)],
                            n_init=max(1, args.evaluations // 3), **common)[2]
        rows.append((seed, paper, local, third))
        print(f"seed {seed}: paper {paper:.4f}, local {local:.4f}, third {third:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    prep.close()

    print(f"\nmodel {os.path.basename(args.model)} | aim {args.aim:g}x | {n} sites | {args.evaluations} evaluations "
          f"per search | curves at levels {levels or 'all'} | dp-loss's profile alone: loss {dp_loss:.4f}")
    print(f"| seed | paper (100 random starts) | local from c = 0.5 | third ({max(1, args.evaluations // 3)} random starts) |")
    print("|---|---|---|---|")
    for seed, paper, local, third in rows:
        print(f"| {seed} | {paper:.4f} | {local:.4f} | {third:.4f} |")
    means = np.mean([r[1:] for r in rows], axis=0)
    print(f"| mean | {means[0]:.4f} | {means[1]:.4f} | {means[2]:.4f} |")


if __name__ == "__main__":
    main()
