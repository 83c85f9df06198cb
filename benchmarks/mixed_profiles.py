"""Is a profile that mixes sparsity levels slower than the additive table says, and why?

The table times each level with every site at that level; the solver adds up per-site times from
different levels. This script writes designed profiles with magnitude weights and measures each end
to end against the dense model (interleaved, medians), next to its prediction from the table:
  - uniform: every site at one level (what the table measures directly);
  - alternating a/b: sites take levels a and b in turn (every neighbour pair changes level);
  - blocked a/b: the first half of the sites at a, the rest at b (one change of level).
Alternating and blocked profiles have the same levels, the same weight footprint and the same
prediction, and differ only in how many neighbours change level. Run it on a quiet machine; it is
not a test.

    python models/tiny.py mlp mlp.onnx --width 1024 --depth 8 --seq 128
    python benchmarks/mixed_profiles.py --model mlp.onnx --cores 1 --uniform 0.7981,0.9108 \\
        --pairs 0:0.97,0.652:0.9606
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from magnitude_profiles import MagnitudeProfiles, parser


def level_index(levels, value: float) -> int:
    i = int(np.argmin(np.abs(np.asarray(levels) - value)))
    if abs(levels[i] - value) > 1e-3:
        raise SystemExit(f"level {value} is not in the table's grid {levels}")
    return i


def designed(n_sites: int, levels, uniform, pairs) -> list[tuple[str, list[int]]]:
    out = [(f"uniform {levels[j]:g}", [j] * n_sites) for j in uniform]
    half = n_sites // 2
    for a, b in pairs:
        out.append((f"alternating {levels[a]:g}/{levels[b]:g}", [a if i % 2 == 0 else b for i in range(n_sites)]))
        out.append((f"blocked {levels[a]:g}/{levels[b]:g}", [a] * half + [b] * (n_sites - half)))
    return out


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--uniform", default="0.7981,0.9108", help="levels for uniform profiles, comma-separated")
    p.add_argument("--pairs", default="0:0.97,0.652:0.9606",
                   help="level pairs a:b for the alternating and blocked profiles, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="end-to-end measurements of each profile")
    args = p.parse_args(argv)

    m = MagnitudeProfiles(args.model, batch_size=args.batch_size, cores=args.cores, cache_dir=args.cache_dir)
    levels = list(m.table.levels)
    uniform = [level_index(levels, float(v)) for v in args.uniform.split(",") if v]
    pairs = [tuple(level_index(levels, float(v)) for v in pair.split(":")) for pair in args.pairs.split(",") if pair]
    profiles = designed(len(m.names), levels, uniform, pairs)
    rows = []
    try:
        files = [(name, picks, m.write({n: j for n, j in zip(m.names, picks)}, f"p{i}"))
                 for i, (name, picks) in enumerate(profiles)]
        measured = {name: [] for name, _, _ in files}
        for _ in range(args.repeats):          # every profile once per pass, so drift hits all alike
            for name, _, path in files:
                measured[name].append(m.speedup(path))
                print(f"{name}: {measured[name][-1]:.3f}x", flush=True)
        for name, picks, _ in files:
            profile = {n: j for n, j in zip(m.names, picks)}
            rows.append((name, m.table.predicted_speedup(profile), measured[name], m.sparsity(profile)))
    finally:
        m.close()

    print(f"\nmodel {Path(args.model).name} | DeepSparse, {args.cores} core(s), batch {args.batch_size} | "
          f"{len(m.names)} sites, table dense {m.table.dense_total_ms:.2f} ms | magnitude weights | "
          f"{args.repeats} interleaved measurements of {m.prep.runtime.rounds} rounds each, profiles in turn")
    print("| profile | predicted | measured (median) | measured / predicted | sparsity |")
    print("|---|---|---|---|---|")
    for name, predicted, values, sparsity in rows:
        med = float(np.median(values))
        print(f"| {name} | {predicted:.3f}x | {med:.3f}x ({', '.join(f'{v:.3f}' for v in values)}) "
              f"| {med / predicted:.3f} | {sparsity:.0%} |")


if __name__ == "__main__":
    main()
