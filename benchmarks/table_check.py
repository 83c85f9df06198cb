"""How well does a freshly measured latency table predict a pruned model's per-layer time?

The solver adds up per-site times from a table measured with every site at one imposed sparsity. This
script checks that sum on a real pruned file: it profiles the dense model now (one pass), maps every
site of the pruned file to the table level nearest its actual sparsity, and compares the predicted
total with the engine's own per-layer analysis of the pruned file (the same measurement the table is
made of), grouped by level. Run it on a quiet machine; it is not a test.

    python benchmarks/table_check.py --model out/minilm-l6.onnx --pruned out/minilm-l6.1.5x.onnx --cores 1
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import pruned_file  # noqa: E402

from spdy_onnx import graph  # noqa: E402


def main(argv=None):
    p = pruned_file.parser(__doc__)
    p.add_argument("--levels", default=None, help="sparsity grid (default: the engine's)")
    p.add_argument("--runs", type=int, default=2, help="analyses of the pruned and dense files, alternated")
    p.add_argument("--per-site", action="store_true", help="also print every site's predicted and measured time")
    args = p.parse_args(argv)

    f = pruned_file.load(args.model, args.pruned, cores=args.cores, batch_size=args.batch_size, levels=args.levels)
    table, chosen, levels = f.table, f.profile, f.table.levels
    try:
        rt = f.prep.runtime
        inputs = [np.ascontiguousarray(a) for a in f.feeds.values()]
        aliases = graph.output_aliases(f.prep.model, f.prep.all_sites)
        site_weights = {s.name: s.n_weights for s in f.prep.all_sites}
        pruned_static = f.prep.static_copy(f.model, "pruned")
        dense_totals, totals, per_site = [], [], []
        for _ in range(args.runs):
            dense_totals.append(rt.dense_check_ms(str(f.prep.dense_static()), batch_size=args.batch_size,
                                                  feeds=f.feeds))
            result = rt._analyse(str(pruned_static), inputs, args.batch_size, 0.0)
            totals.append(float(result["average_total_time"]))
            per_site.append(rt.attribute(result["layer_info"], aliases, site_weights))
        measured = {n: float(np.median([r.get(n, np.nan) for r in per_site])) for n in chosen}
    finally:
        f.prep.close()
    predicted_sites = sum(table.times[n][j] for n, j in chosen.items())
    predicted_total = table.predicted_ms(chosen)

    print(f"model {Path(args.model).name}, pruned {Path(args.pruned).name} | DeepSparse, {args.cores} core(s), "
          f"batch {args.batch_size} | table profiled now (1 pass), {args.runs} analyses of each file")
    print("| level | sites | predicted ms | measured ms | measured / predicted |\n|---|---|---|---|---|")
    for j, lv in enumerate(levels):
        names = [n for n, k in chosen.items() if k == j]
        if names:
            pr = sum(table.times[n][j] for n in names)
            me = sum(measured[n] for n in names)
            print(f"| {lv:g} | {len(names)} | {pr:.3f} | {me:.3f} | {me / pr:.3f} |")
    if args.per_site:
        print("\n| site | level | table dense ms | predicted ms | measured ms | measured / predicted |\n"
              "|---|---|---|---|---|---|")
        for n, j in chosen.items():
            print(f"| {n} | {levels[j]:g} | {table.times[n][0]:.3f} | {table.times[n][j]:.3f} | {measured[n]:.3f} | "
                  f"{measured[n] / table.times[n][j]:.3f} |")
        print()
    m_total = float(np.median(totals))
    m_dense = float(np.median(dense_totals))
    print(f"| **all sites** | {len(chosen)} | {predicted_sites:.3f} | {sum(measured.values()):.3f} | "
          f"{sum(measured.values()) / predicted_sites:.3f} |")
    print(f"| **model total** | | {predicted_total:.3f} | {m_total:.3f} | {m_total / predicted_total:.3f} |")
    print(f"dense total: table {table.dense_total_ms:.3f} ms, re-measured {m_dense:.3f} ms; predicted speedup "
          f"{table.dense_total_ms / predicted_total:.3f}x, analysed {m_dense / m_total:.3f}x")


if __name__ == "__main__":
    main()
