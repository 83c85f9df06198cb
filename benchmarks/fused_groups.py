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

from pathlib import Path

import numpy as np
from magnitude_profiles import MagnitudeProfiles, parser

from spdy_onnx.solver import solve_dp


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--aims", default="1.2,1.35", help="speedups to solve for, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="end-to-end measurements of each profile")
    args = p.parse_args(argv)

    m = MagnitudeProfiles(args.model, batch_size=args.batch_size, cores=args.cores, cache_dir=args.cache_dir)
    try:
        groups = m.table.tied_groups(m.names)
        rows = []
        for aim in [float(a) for a in args.aims.split(",")]:
            for kind, tie in (("untied", None), ("tied", groups)):
                picks = solve_dp(m.errors, m.times, m.budget(aim), groups=tie)
                profile = {n: int(j) for n, j in zip(m.names, picks)}
                mixed = sum(len({profile[m.names[i]] for i in g}) > 1 for g in groups)
                candidate = m.write(profile, f"{kind}-{aim}")
                measured = [m.speedup(candidate) for _ in range(args.repeats)]
                rows.append((aim, kind, mixed, m.table.predicted_speedup(profile), measured, m.sparsity(profile)))
                print(f"aim {aim:g} {kind}: predicted {rows[-1][3]:.3f}x, measured "
                      f"{', '.join(f'{v:.3f}x' for v in measured)}", flush=True)
    finally:
        m.close()

    print(f"\nmodel {Path(args.model).name} | DeepSparse, {args.cores} core(s), batch {args.batch_size} | "
          f"{len(m.sites)} sites, {len(groups)} fused groups among them (sizes "
          f"{', '.join(str(len(g)) for g in groups) or '-'}) | magnitude errors, magnitude weights | "
          f"{args.repeats} interleaved measurements of {m.prep.runtime.rounds} rounds each")
    print("| aim | DP | fused groups left mixed | predicted | measured (median) | measured / predicted | sparsity |")
    print("|---|---|---|---|---|---|---|")
    for aim, kind, mixed, predicted, measured, sparsity in rows:
        med = float(np.median(measured))
        print(f"| {aim:g}x | {kind} | {mixed} | {predicted:.3f}x | {med:.3f}x ({', '.join(f'{v:.3f}' for v in measured)}) "
              f"| {med / predicted:.3f} | {sparsity:.0%} |")


if __name__ == "__main__":
    main()
