"""Which file should the lowest-level check time: the sites a run chooses for, or every site the table has?

After profiling, `optimize` times a uniform file at the lowest sparse level and cuts that level's
savings when the file gave under 80% of the predicted saving (api._check_lowest_level). On a model
with sites left dense by default (MobileNetV2's depthwise and tiny convolutions), a file with every
table site pruned is not a file the tool ever writes, and it promises a smaller saving, so the same
compile-to-compile noise moves its share further. This script profiles a table now (one pass, no
check applied), writes both files at the lowest sparse level (magnitude weights), measures each
against dense several times (alternated), and prints the share of the predicted saving each
measurement gave, one measurement at a time and pooled over two.

    python benchmarks/lowest_level.py --model out/mobilenetv2.onnx --batch-size 16 --cores 1

DeepSparse; it is not a test.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, modelio  # noqa: E402
from spdy_onnx.runtimes import pooled  # noqa: E402

CUT_BELOW = api.LOWEST_LEVEL_SHARE


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4, help="measurements of each file, alternated")
    args = p.parse_args(argv)
    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS,
                        progress=False, runtime_options={"repeats": 1})
    try:
        feeds = modelio.example_inputs(prep.specs)
        rt = prep.runtime
        table = rt.measure(str(prep.dense_static()), prep.all_sites, levels=rt.default_levels(),
                           batch_size=args.batch_size, feeds=feeds,
                           aliases=graph.output_aliases(prep.model, prep.all_sites))
        files = {}
        for tag, sites in (("sites chosen for", prep.sites), ("every table site", prep.all_sites)):
            sites = [s for s in sites if s.name in table.times]
            predicted = table.predicted_speedup({s.name: 1 for s in sites})
            files[tag] = (api._magnitude_file(prep, table, sites, [1] * len(sites), tag.split()[0]), predicted,
                          len(sites))
        runs = {k: [] for k in files}
        for _ in range(args.rounds):
            for k, (path, _, _) in files.items():
                runs[k].append(rt.compare(str(prep.dense_static()), str(path), batch_size=args.batch_size, feeds=feeds))
    finally:
        prep.close()

    level = table.levels[1]
    print(f"model {args.model.name} | DeepSparse, batch {args.batch_size}, {args.cores} core(s) | table profiled "
          f"now (one pass), dense {table.dense_total_ms:.1f} ms | level {level:g} | a cut is made under a share of "
          f"{CUT_BELOW:g}")
    print("\n| file | sites | predicted | measured | share of the predicted saving | pooled pairs: share |\n"
          "|---|---|---|---|---|---|")
    for k, (_, predicted, n) in files.items():
        saving = 1 - 1 / predicted

        def share(c):
            return (1 - 1 / c.speedup) / saving
        singles = [share(c) for c in runs[k]]
        pairs = [share(pooled(a, b)) for a, b in zip(runs[k][::2], runs[k][1::2])]
        print(f"| {k} | {n} | {predicted:.3f}x | {', '.join(f'{c.speedup:.3f}x' for c in runs[k])} | "
              f"{', '.join(f'{s:.2f}' for s in singles)} | {', '.join(f'{s:.2f}' for s in pairs)} |")
    for k in files:
        cut = sum(s < CUT_BELOW for s in ((1 - 1 / c.speedup) / (1 - 1 / files[k][1]) for c in runs[k]))
        print(f"- {k}: {cut} of {len(runs[k])} single measurements would cut the level; median share "
              f"{np.median([(1 - 1 / c.speedup) / (1 - 1 / files[k][1]) for c in runs[k]]):.2f}")


if __name__ == "__main__":
    main()
