"""Do the search's lowest-loss profiles run slower than the table says, more than dp-loss's does?

The search keeps the profile with the lowest calibration loss among hundreds that the table says fit
the budget. If the table's errors make some profiles look faster than they are, the best of many is
likely to be one of those. This script runs the search (measured loss curves, as `optimize` does),
takes its `--top` best profiles and dp-loss's profile, writes each with magnitude weights (the
zeros set the kernels) and measures each end to end against the dense model, in turns. It prints
loss, prediction and measurement side by side. Run it on a quiet machine; it is not a test.

    python benchmarks/search_winners.py --model out/minilm-l6.onnx --data out/minilm_calib.npz \\
        --aim 2.1 --cores 1 --evaluations 150 --top 4
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from magnitude_profiles import MagnitudeProfiles, parser

from spdy_onnx import strategies
from spdy_onnx.search import single_site_losses, spdy_search
from spdy_onnx.solver import solve_dp


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="calibration .npz")
    p.add_argument("--aim", type=float, required=True, help="speedup the DP solves for")
    p.add_argument("--evaluations", type=int, default=150, help="search budget in evaluations")
    p.add_argument("--top", type=int, default=4, help="how many of the search's best profiles to measure")
    p.add_argument("--repeats", type=int, default=2, help="end-to-end measurements of each profile")
    args = p.parse_args(argv)

    m = MagnitudeProfiles(args.model, batch_size=args.batch_size, cores=args.cores, cache_dir=args.cache_dir)
    rows = []
    try:
        chooser = strategies.make_chooser("dp-loss", prep=m.prep, sites=m.sites, table=m.table, data=args.data,
                                          samples=None, reconstruct="obs", loss="auto", search_budget=None, seed=0,
                                          cache_dir=args.cache_dir, progress=False)
        evaluator = chooser.evaluator
        n_levels = len(m.table.levels)
        curves = single_site_losses(evaluator, n_levels, progress=False)
        budget = m.budget(args.aim)
        groups = m.table.tied_groups(m.names)

        def profile_of(c):
            return solve_dp(np.asarray(c)[:, None] * curves, m.times, budget, groups=groups)

        scored: dict[tuple, float] = {}

        def loss_of(picks):
            key = tuple(int(j) for j in picks)
            scored[key] = evaluator.loss(picks)
            return scored[key]

        n = len(m.names)
        dp_loss = tuple(int(j) for j in profile_of(np.ones(n)))
        spdy_search(n, n_levels, profile_of, loss_of, seed=0, max_evals=args.evaluations,
                    seeds=[np.full(n, 0.5)], n_init=max(1, args.evaluations // 3), progress=False)
        best = sorted(scored, key=scored.get)[: args.top]
        chosen = [(f"search #{i + 1}", key) for i, key in enumerate(best)]
        if dp_loss not in best:
            chosen.append(("dp-loss", dp_loss))
        files = []
        for i, (name, key) in enumerate(chosen):
            profile = {nm: j for nm, j in zip(m.names, key)}
            files.append((name, key, profile, m.write(profile, f"w{i}")))
        measured = {name: [] for name, *_ in files}
        for _ in range(args.repeats):   # every profile once per pass, so drift hits all alike
            for name, _, _, path in files:
                measured[name].append(m.speedup(path))
                print(f"{name}: {measured[name][-1]:.3f}x", flush=True)
        for name, key, profile, _ in files:
            loss = scored.get(key, evaluator.loss(np.array(key)))
            rows.append((name, loss, m.table.predicted_speedup(profile), measured[name], m.sparsity(profile)))
    finally:
        m.close()

    print(f"\nmodel {Path(args.model).name} | DeepSparse, {args.cores} core(s), batch {args.batch_size} | aim "
          f"{args.aim:g}x | {len(scored)} distinct profiles searched ({args.evaluations} evaluations) | magnitude "
          f"weights | {args.repeats} interleaved measurements of {m.prep.runtime.rounds} rounds each, in turns")
    print("| profile | calibration loss | predicted | measured (median) | measured / predicted | sparsity |")
    print("|---|---|---|---|---|---|")
    for name, loss, predicted, values, sparsity in rows:
        med = float(np.median(values))
        print(f"| {name} | {loss:.4f} | {predicted:.3f}x | {med:.3f}x ({', '.join(f'{v:.3f}' for v in values)}) "
              f"| {med / predicted:.3f} | {sparsity:.0%} |")


if __name__ == "__main__":
    main()
