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

import argparse
import os
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, modelio  # noqa: E402
from spdy_onnx.database import MagnitudeDatabase  # noqa: E402
from spdy_onnx.passes.prune import sparsity_of, write_weights  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the dense ONNX file")
    p.add_argument("--pruned", required=True, help="a pruned file written by optimize from it")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args(argv)

    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=0, progress=False,
                        runtime_options={"repeats": 1})
    rows = []
    try:
        rt = prep.runtime
        feeds = modelio.example_inputs(prep.specs)
        levels = rt.default_levels()
        table = rt.measure(str(prep.dense_static()), prep.all_sites, levels=levels, batch_size=args.batch_size,
                           feeds=feeds, aliases=graph.output_aliases(prep.model, prep.all_sites))
        sites = [s for s in prep.all_sites if s.name in table.times]
        magnitude = MagnitudeDatabase(sites, graph.read_weights(prep.model, sites), levels)
        pruned = graph.constants_to_initializers(modelio.load_model(Path(args.pruned)))
        actual = {n: sparsity_of(w) for n, w in graph.read_weights(pruned, sites).items()}
        own = {n: int(np.argmin([abs(lv - s) for lv in levels])) for n, s in actual.items()}
        mean = sum(actual[s.name] * s.n_weights for s in sites) / sum(s.n_weights for s in sites)
        below = max(j for j, lv in enumerate(levels) if lv <= mean)
        above = min(len(levels) - 1, below + 1)

        def predicted(profile):
            fixed = table.dense_total_ms - sum(table.times[n][0] for n in profile)
            return table.dense_total_ms / (fixed + sum(table.times[n][j] for n, j in profile.items()))

        def magnitude_file(profile, tag):
            model = write_weights(prep.model, {s.weight: magnitude.weight(s.name, profile[s.name]) for s in sites})
            return prep.static_copy(model, tag)

        cases = [(f"the file ({Path(args.pruned).name})", prep.static_copy(pruned, "file"), own),
                 ("its per-site sparsities, magnitude masks", magnitude_file(own, "own_magnitude"), own)]
        for j in sorted({below, above}):
            uniform = {n: j for n in own}
            cases.append((f"uniform {levels[j]:g}, magnitude masks", magnitude_file(uniform, f"uniform_{j}"), uniform))
        for name, path, profile in cases:
            comparison = rt.compare(str(prep.dense_static()), str(path), batch_size=args.batch_size, feeds=feeds)
            rows.append((name, predicted(profile), comparison.speedup))
    finally:
        prep.close()

    print(f"model {Path(args.model).name} | DeepSparse, {args.cores} core(s), batch {args.batch_size} | "
          f"table profiled now (1 pass); file's mean sparsity {mean:.1%}")
    print("| case | predicted | measured | measured / predicted |\n|---|---|---|---|")
    for name, pr, me in rows:
        print(f"| {name} | {pr:.3f}x | {me:.3f}x | {me / pr:.3f} |")


if __name__ == "__main__":
    main()
