"""SPDY against the baselines over several saved runs of benchmarks/accuracy.py, one line per run and target.

Why: one run's probe accuracy moves by about a point with the seed and the hour, more than the gaps between
strategies, so a claim about which strategy is ahead needs every run side by side. For each run and target
it prints SPDY's cross-fit probe accuracy (the 7,506 sentences the pruning never saw, when the run has the
cross-fit columns; the held-out ones otherwise), its gap to each baseline with McNemar's two-sided p on the
same sentences, and the calibration loss of each, then counts, per target, the runs where SPDY was
significantly ahead (p < 0.05), level, or significantly behind.

    python benchmarks/accuracy_summary.py benchmarks/results/accuracy_minilm_xeon_crossfit_seed*.json

Runs without probe columns (MobileNetV2: top-1 on 20 labelled images, too few for a test) are printed
side by side instead: per strategy and target, each run's measured speedup, top-1, agreement with
dense on the held-out photos, KL to dense on the labelled images and weighted sparsity, runs in the
order given.

    python benchmarks/accuracy_summary.py benchmarks/results/accuracy_mobilenetv2_xeon_seed{1,2,3}_run21.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import mcnemar  # noqa: E402

BASELINES = ("uniform", "global-magnitude")
SIGNIFICANT = 0.05


def _accuracy(right: str) -> float:
    return right.count("1") / len(right)


def compare(rows: list[dict]) -> list[dict]:
    """Per target: SPDY's accuracy and, per baseline, the gap in points and McNemar's p."""
    by = {(r["strategy"], str(r["target"])): r for r in rows}
    out = []
    for target in sorted({str(r["target"]) for r in rows if r["strategy"] == "spdy"}, key=float):
        spdy = by[("spdy", target)]
        key = "probe_right_cf" if spdy.get("probe_right_cf") else "probe_right"
        line = {"target": float(target), "sentences": len(spdy[key]), "spdy": _accuracy(spdy[key]),
                "spdy_loss": float(spdy["calibration_loss"]), "spdy_measured": float(spdy["measured"])}
        for base in BASELINES:
            other = by.get((base, target))
            if not other or not other.get(key) or len(other[key]) != len(spdy[key]):
                continue
            only_spdy, only_base, _, p = mcnemar(spdy[key], other[key])
            line[base] = {"gap": 100 * (_accuracy(spdy[key]) - _accuracy(other[key])), "p": p,
                          "only_spdy": only_spdy, "only_base": only_base,
                          "loss": float(other["calibration_loss"]), "measured": float(other["measured"])}
        out.append(line)
    return out


def side_by_side(runs: list[list[dict]]) -> list[str]:
    """Markdown rows: one per strategy and target, each cell the runs' values joined by ' / '."""
    keyed = [{(r["strategy"], r["target"]): r for r in rows} for rows in runs]
    order = []
    for rows in runs:
        for r in rows:
            if r["strategy"] != "dense" and (r["strategy"], r["target"]) not in order:
                order.append((r["strategy"], r["target"]))
    order.sort(key=lambda k: float(k[1]))
    columns = (("measured", lambda r: f"{r['measured']:.2f}x"),
               ("top-1", lambda r: f"{r['top1']}/{r['n_labelled']}"),
               ("agree w/ dense (photos)", lambda r: f"{round(r['agree'] * r['n_photos'])}/{r['n_photos']}"),
               ("KL to dense (labelled)", lambda r: f"{r['kl_labelled']:.2f}"),
               ("sparsity", lambda r: f"{100 * r['sparsity']:.0f}%"))
    lines = ["| strategy | target | " + " | ".join(name for name, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for key in order:
        cells = [" / ".join(fmt(k[key]) if key in k and k[key].get("top1") is not None else "-" for k in keyed)
                 for _, fmt in columns]
        lines.append(f"| {key[0]} | {float(key[1]):g}x | " + " | ".join(cells) + " |")
    return lines


def verdict(gap: float, p: float) -> str:
    if p >= SIGNIFICANT:
        return "level"
    return "ahead" if gap > 0 else "behind"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="JSON files written by accuracy.py --out")
    args = ap.parse_args(argv)
    runs = [json.loads(path.read_text())["rows"] for path in args.results]
    if not any(r.get("probe_right") for rows in runs for r in rows):
        print(f"runs, in order: {', '.join(path.stem for path in args.results)}\n")
        print("\n".join(side_by_side(runs)))
        return 0
    tally = defaultdict(lambda: defaultdict(int))
    print("| run | target | SPDY probe acc | vs uniform (p) | vs global magnitude (p) | calib loss SPDY / uniform / GM "
          "| measured SPDY / uniform / GM |")
    print("|---|---|---|---|---|---|---|")
    for path in args.results:
        result = json.loads(path.read_text())
        for line in compare(result["rows"]):
            cells = []
            for base in BASELINES:
                b = line.get(base)
                if b is None:
                    cells.append("-")
                    continue
                cells.append(f"{b['gap']:+.1f} ({b['p']:.2g})")
                tally[(line["target"], base)][verdict(b["gap"], b["p"])] += 1
            losses = " / ".join(f"{v:.3f}" for v in [line["spdy_loss"]] + [line[b]["loss"] for b in BASELINES if b in line])
            speeds = " / ".join(f"{v:.2f}x" for v in [line["spdy_measured"]] + [line[b]["measured"] for b in BASELINES
                                                                              if b in line])
            print(f"| {path.stem} | {line['target']:g}x | {100 * line['spdy']:.1f}% ({line['sentences']}) | "
                  f"{cells[0]} | {cells[1]} | {losses} | {speeds} |")
    print()
    for (target, base), counts in sorted(tally.items()):
        print(f"{target:g}x, SPDY vs {base}: ahead in {counts['ahead']}, level in {counts['level']}, "
              f"behind in {counts['behind']} (McNemar p < {SIGNIFICANT:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
