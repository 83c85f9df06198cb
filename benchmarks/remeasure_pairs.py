"""When one file is measured twice, does the dense model's time say which measurement was disturbed?

Why: `optimize` measures files with the same zeros more than once (a near miss or thin hit measured
again, a draft and its corrected file), and each measurement recompiles the dense model too. Other
processes in this machine are seen (`foreign_load_cores`); contention from outside it (other virtual
machines on the host) is not, but it slows the dense model as well. This reads every `optimize` report
kept in the given JSON files (the accuracy and tool-time results), pairs the measurements of each
attempt (one profile's zeros), and sets the change of the measured speedup against the change of the
dense model's time. No engine runs.

    python benchmarks/remeasure_pairs.py benchmarks/results/*.json
"""
from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np

DENSE_MOVED = 0.03   # a dense time this much apart (log) counts as "moved"


def reports(obj):
    """Every dict with a list of `attempts` inside a loaded JSON value (optimize reports, nested)."""
    if isinstance(obj, dict):
        if isinstance(obj.get("attempts"), list):
            yield obj
        for value in obj.values():
            yield from reports(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from reports(value)


def same_zero_pairs(report: dict) -> list[tuple[float, float]]:
    """(log change of the speedup, log change of the dense time) for each pair of one attempt's measurements."""
    by_attempt: dict = {}
    for a in report["attempts"]:
        m = a.get("measurement")
        if m and m.get("baseline_ms") and m.get("speedup"):
            by_attempt.setdefault(a.get("attempt"), []).append((m["speedup"], m["baseline_ms"]))
    return [(float(np.log(s2 / s1)), float(np.log(d2 / d1)))
            for ms in by_attempt.values() for (s1, d1), (s2, d2) in combinations(ms, 2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args(argv)
    pairs, n_reports, n_files = [], 0, 0
    for path in args.files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found = list(reports(data))
        n_files += bool(found)
        n_reports += len(found)
        for r in found:
            pairs.extend(same_zero_pairs(r))
    if len(pairs) < 3:
        raise SystemExit("fewer than 3 pairs of measurements of one profile in these files")
    speed, dense = np.array(pairs).T
    moved = np.abs(dense) > DENSE_MOVED
    print(f"{len(pairs)} pairs of measurements of one profile's zeros, from {n_reports} reports in {n_files} files")
    print(f"correlation of the two changes (log): {np.corrcoef(dense, speed)[0, 1]:.2f}")
    print("| dense time moved | pairs | sd of the speedup's change (log) | speedup moved against the dense time |")
    print("|---|---|---|---|")
    for name, sel in ((f"under {DENSE_MOVED:.0%}", ~moved), (f"{DENSE_MOVED:.0%} or more", moved)):
        if sel.sum() > 1:
            against = np.mean(np.sign(dense[sel]) != np.sign(speed[sel]))
            print(f"| {name} | {sel.sum()} | {speed[sel].std(ddof=1):.4f} | {against:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
