"""Tool-time benchmark: how long a cold `optimize` takes end to end, phase by phase, with default settings.

Cold means a fresh cache folder: the latency table is profiled, the Hessians and the reconstruction
database are built, the search starts from nothing. Everything else is `optimize`'s defaults. Prints a
table (one row per phase) and writes the reports. Run it on a quiet machine; it is not a test.

    python benchmarks/tool_time.py --model out/minilm-l6.onnx --data out/minilm_calib.npz --target 2x --cores 1
    python benchmarks/tool_time.py --model out/bert-base.onnx --data out/minilm_calib.npz --target 2x --cores 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from spdy_onnx import api  # noqa: E402
from spdy_onnx.errors import InfeasibleTarget, TargetMissed  # noqa: E402

def phase_totals(phases: dict) -> list[tuple[str, float]]:
    drafts = sum(v for k, v in phases.items() if k.startswith("benchmark_s_") and k.endswith("_draft"))
    finals = sum(v for k, v in phases.items() if k.startswith("benchmark_s_") and not k.endswith("_draft"))
    return [("latency table (profiling)", phases.get("latency_table_s", 0.0)),
            ("fastest profile, measured up front", phases.get("fastest_check_s", 0.0)),
            ("waiting for the database built during profiling", phases.get("early_database_wait_s", 0.0)),
            ("Hessians, OBS database, evaluator", phases.get("calibration_s", 0.0)),
            ("search and re-solves", sum(v for k, v in phases.items() if k.startswith("choose_s_"))),
            ("draft measurements", drafts),
            ("global correction", sum(v for k, v in phases.items() if k.startswith("correct_s_"))),
            ("measurements of the corrected file", finals)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="calibration .npz")
    p.add_argument("--target", default="2x")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the report JSON here too")
    p.add_argument("--no-early-database", action="store_true",
                   help="build the OBS database after profiling, not in a child process during it")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="spdy-tool-time-") as work:
        work = Path(work)
        t0 = time.perf_counter()
        status = "met"
        try:
            rep = api.optimize(args.model, target=args.target, output=work / "out.onnx", cores=args.cores,
                               batch_size=args.batch_size, data=args.data, cache_dir=work / "cache",
                               progress=False, early_database=not args.no_early_database)
        except (TargetMissed, InfeasibleTarget) as exc:
            status = type(exc).__name__
            rep = json.loads((work / "out.report.json").read_text()) if (work / "out.report.json").exists() else {}
        wall = time.perf_counter() - t0
    rows = phase_totals(rep.get("phases_s", {}))
    print(f"model {Path(args.model).name} | target {args.target} | batch {args.batch_size} | cores {args.cores} | "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs | status {status} | "
          f"measured {rep.get('measured_speedup') or float('nan'):.3f}x")
    print("| phase | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.0f} |")
    other = wall - sum(s for _, s in rows)
    print(f"| other (loading, writing, reports) | {other:.0f} |")
    print(f"| **total, wall** | **{wall:.0f}** ({wall / 60:.1f} min) |")
    setup = (rep.get("quality") or {}).get("calibration_phases_s") or {}
    if setup:
        names = {"load_data_s": "loading the data", "hessians_s": "Hessians", "reconstruction_s": "OBS reconstruction",
                 "database_s": "database in all", "evaluator_s": "evaluator (dense reference outputs)"}
        early = setup.get("during_profiling") or {}
        print("\nHessians, OBS database, evaluator: " + ", ".join(
            f"{names.get(k, k)} {v:.0f} s" for k, v in setup.items() if k != "during_profiling"))
        if early:
            print("built in a child process during profiling (its own clock, from its start to its end): " + ", ".join(
                f"{names.get(k, k)} {v:.0f} s" for k, v in early.items() if k in names)
                + f"; started to finished {early.get('wall_s', 0):.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"wall_s": wall, "status": status, "args": vars(args) | {"out": str(args.out)},
                                        "report": rep}, indent=1, default=str))


if __name__ == "__main__":
    main()
