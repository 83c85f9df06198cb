"""How much does one pruned file's measured speedup move from one compile to the next?

`optimize` measures every candidate on a fresh compile of the dense and the pruned model, interleaved.
This script takes two profiles at the same aim, one level for every site (uniform) and the DP's mixed
profile (magnitude errors, fused groups tied), writes each with magnitude weights, and measures each
`--compiles` times, alternating between the two, each time on fresh compiles. It prints every speedup,
the median and the spread (max / min) per profile. Run it on a quiet machine; it is not a test.

    python benchmarks/compile_spread.py --model out/minilm-l6.onnx --cores 1 --aim 1.7 --compiles 6
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from magnitude_profiles import MagnitudeProfiles, parser

from spdy_onnx.solver import solve_dp


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--aim", type=float, default=1.7, help="the speedup both profiles are solved for")
    p.add_argument("--compiles", type=int, default=6, help="fresh-compile measurements of each profile")
    args = p.parse_args(argv)

    m = MagnitudeProfiles(args.model, batch_size=args.batch_size, cores=args.cores, cache_dir=args.cache_dir)
    try:
        budget = m.budget(args.aim)
        totals = m.times.sum(axis=0)
        uniform_level = next(j for j in np.argsort(m.table.levels) if totals[j] <= budget)
        mixed = solve_dp(m.errors, m.times, budget, groups=m.table.tied_groups(m.names))
        profiles = {"uniform": {n: int(uniform_level) for n in m.names},
                    "mixed (DP)": {n: int(j) for n, j in zip(m.names, mixed)}}
        files = {kind: m.write(profile, kind.split()[0]) for kind, profile in profiles.items()}
        speedups = {kind: [] for kind in profiles}
        for k in range(args.compiles):
            for kind in (profiles if k % 2 == 0 else list(profiles)[::-1]):
                speedups[kind].append(m.speedup(files[kind]))
                print(f"compile {k + 1} {kind}: {speedups[kind][-1]:.3f}x", flush=True)
    finally:
        m.close()

    print(f"\nmodel {Path(args.model).name} | DeepSparse, {args.cores} core(s), batch {args.batch_size} | aim "
          f"{args.aim:g}x | {args.compiles} fresh compiles of each file, {m.prep.runtime.rounds} interleaved rounds each")
    print("| profile | predicted | sparsity | measured per compile | median | max / min |\n|---|---|---|---|---|---|")
    for kind, profile in profiles.items():
        s = np.array(speedups[kind])
        print(f"| {kind} | {m.table.predicted_speedup(profile):.3f}x | {m.sparsity(profile):.0%} | "
              f"{', '.join(f'{v:.3f}' for v in s)} | {np.median(s):.3f}x | {s.max() / s.min():.3f} |")


if __name__ == "__main__":
    main()
