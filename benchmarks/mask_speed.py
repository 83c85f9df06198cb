"""Where does a pruned file lose speed against its prediction: its mix of levels, or its masks?

For a file written by `optimize`, this measures end to end (interleaved with the dense model, on
DeepSparse) and predicts from a table profiled now:
  - the file itself (its own masks, e.g. OBS),
  - the same per-site sparsities with magnitude masks (the engine's imposed sparsity is
    magnitude-like, so this isolates the mask pattern),
  - uniform magnitude pruning at the table levels just below and above the file's mean sparsity
    (what the table measures directly).
A row whose measured/predicted ratio is low is slower than the additive table says. Run it on a
quiet machine; it is not a test.

    python benchmarks/mask_speed.py --model out/minilm-l6.onnx --pruned out/minilm-l6.1.5x.onnx --cores 1
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import pruned_file  # noqa: E402

from spdy_onnx import graph  # noqa: E402
from spdy_onnx.database import MagnitudeDatabase  # noqa: E402
from spdy_onnx.passes.prune import write_weights  # noqa: E402


def main(argv=None):
    p = pruned_file.parser(__doc__)
    args = p.parse_args(argv)

    f = pruned_file.load(args.model, args.pruned, cores=args.cores, batch_size=args.batch_size)
    prep, table, sites, levels = f.prep, f.table, f.sites, f.table.levels
    rows = []
    try:
        magnitude = MagnitudeDatabase(sites, graph.read_weights(prep.model, sites), levels)
        mean = sum(f.sparsity[s.name] * s.n_weights for s in sites) / sum(s.n_weights for s in sites)
        below = max(j for j, lv in enumerate(levels) if lv <= mean)
        above = min(len(levels) - 1, below + 1)

        def magnitude_file(profile, tag):
            model = write_weights(prep.model, {s.weight: magnitude.weight(s.name, profile[s.name]) for s in sites})
            return prep.static_copy(model, tag)

        cases = [(f"the file ({Path(args.pruned).name})", prep.static_copy(f.model, "file"), f.profile),
                 ("its per-site sparsities, magnitude masks", magnitude_file(f.profile, "own_magnitude"), f.profile)]
        for j in sorted({below, above}):
            uniform = {n: j for n in f.profile}
            cases.append((f"uniform {levels[j]:g}, magnitude masks", magnitude_file(uniform, f"uniform_{j}"), uniform))
        for name, path, profile in cases:
            comparison = prep.runtime.compare(str(prep.dense_static()), str(path), batch_size=args.batch_size,
                                              feeds=f.feeds)
            rows.append((name, table.predicted_speedup(profile), comparison.speedup))
    finally:
        prep.close()

    print(f"model {Path(args.model).name} | DeepSparse, {args.cores} core(s), batch {args.batch_size} | "
          f"table profiled now (1 pass); file's mean sparsity {mean:.1%}")
    print("| case | predicted | measured | measured / predicted |\n|---|---|---|---|")
    for name, pr, me in rows:
        print(f"| {name} | {pr:.3f}x | {me:.3f}x | {me / pr:.3f} |")


if __name__ == "__main__":
    main()
