"""Do dense and lightly pruned sites cost more among pruned neighbours than the latency table says?

The table times each level with every site at that level. This script writes the files the tool's own
level-context step writes (spdy_onnx.context: half the sites, fused groups whole, at a level under 0.6,
the rest at the background level near 85%, magnitude weights) and times each with the engine's
per-layer analysis, the measurement the table is made of, several times in turn. It prints, per level,
the table's predicted increase over the all-background file against the measured one, and the factor.

With `--profiles accuracy.json` it also measures the kept profiles of an accuracy run end to end
(dense against pruned, interleaved, DeepSparse's engine) next to their prediction with and without the
factor. Run it on a quiet machine; it is not a test.

    python benchmarks/level_context.py --model out/minilm-l6.onnx --cores 1 --repeats 3 \\
        --profiles benchmarks/results/accuracy_minilm_auto_prior.json
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from magnitude_profiles import MagnitudeProfiles, parser

from spdy_onnx import context
from spdy_onnx.solver import tied_units


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=3, help="analyses of each file, files in turn")
    p.add_argument("--profiles", default=None, help="an accuracy.py JSON whose kept profiles to measure")
    p.add_argument("--strategies", default="spdy,uniform,global-magnitude")
    args = p.parse_args(argv)

    m = MagnitudeProfiles(args.model, batch_size=args.batch_size, cores=args.cores, cache_dir=args.cache_dir)
    try:
        levels = list(m.table.levels)
        raw = np.array([m.table.times[n] for n in m.names], dtype=np.float64)
        units = sorted(tied_units(len(m.names), m.table.tied_groups(m.names)), key=min)
        background, design = context.designs(levels, units, len(m.names))
        inputs = [np.ascontiguousarray(a) for a in m.feeds.values()]
        base = np.full(len(m.names), background)
        files = [("background", m.write(dict(zip(m.names, base)), "bg"))]
        files += [(f"{levels[j]:g}", m.write(dict(zip(m.names, np.where(mask, j, base))), f"l{j}"))
                  for j, mask in design]
        measured = {name: [] for name, _ in files}
        for r in range(args.repeats):
            for name, path in (files if r % 2 == 0 else files[::-1]):
                result = m.prep.runtime._analyse(str(path), inputs, args.batch_size, 0.0)
                measured[name].append(float(result["average_total_time"]))
            print("pass", r + 1, {k: round(v[-1], 2) for k, v in measured.items()}, flush=True)
        bg_ms = float(np.median(measured["background"]))
        bg_pred = m.table.fixed_ms(m.names) + float(raw[:, background].sum())
        meds = [float(np.median(measured[f"{levels[j]:g}"])) for j, _ in design]
        factor, each = context.pooled_factor(raw, background, design, bg_ms, bg_pred, meds)

        print(f"\nmodel {Path(args.model).name} | DeepSparse, {args.cores} core(s), batch {args.batch_size} | "
              f"{len(m.names)} sites in {len(units)} units | background level {levels[background]:g}: measured "
              f"{bg_ms:.2f} ms, table {bg_pred:.2f} ms | median of {args.repeats} analyses per file")
        print("| half the units at | table: increase over background | measured increase (each pass) | factor |")
        print("|---|---|---|---|")
        speed = bg_pred / bg_ms
        for (j, mask), med, f in zip(design, meds, each):
            name = f"{levels[j]:g}"
            table_inc = float(raw[mask, j].sum() - raw[mask, background].sum())
            runs = ", ".join(f"{(v - bg_ms) * speed:+.2f}" for v in measured[name])
            print(f"| {name} | {table_inc:+.2f} ms | {(med - bg_ms) * speed:+.2f} ms ({runs}) | {f:.2f} |")
        print(f"pooled factor (clamped to 1..{context.MAX_FACTOR}): {factor:.3f}")

        if args.profiles:
            scaled = [factor if v < context.CONTEXT_BELOW else 1.0 for v in levels]
            rows = [r for r in json.loads(Path(args.profiles).read_text())["rows"]
                    if r.get("profile") and r["strategy"] in args.strategies.split(",")]
            print(f"\nkept profiles of {Path(args.profiles).name}, end to end (dense vs pruned, interleaved):")
            print("| strategy | target | predicted, table | predicted, with factor | measured | measured / predicted "
                  "(table, with factor) |")
            print("|---|---|---|---|---|---|")
            for i, r in enumerate(rows):
                profile = {n: int(np.argmin(np.abs(np.asarray(levels) - r["profile"][n]))) for n in m.names}
                ms = m.table.fixed_ms(m.names) + sum(raw[k, profile[n]] for k, n in enumerate(m.names))
                ms_f = m.table.fixed_ms(m.names) + sum(raw[k, profile[n]] * scaled[profile[n]]
                                                       for k, n in enumerate(m.names))
                pred, pred_f = m.table.dense_total_ms / ms, m.table.dense_total_ms / ms_f
                got = m.speedup(m.write(profile, f"kept{i}"))
                print(f"| {r['strategy']} | {r['target']}x | {pred:.3f}x | {pred_f:.3f}x | {got:.3f}x | "
                      f"{got / pred:.3f}, {got / pred_f:.3f} |", flush=True)
    finally:
        m.close()


if __name__ == "__main__":
    main()
