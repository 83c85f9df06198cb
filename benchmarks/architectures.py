"""Does the pipeline hold on architectures beyond the two reference models? (not a test)

For each model of `models/architectures.py` or `models/hf_architectures.py` (seeded random weights,
random calibration data): one cold `optimize` with `--data` at the target (fresh cache: profiling,
database, search, correction and the end-to-end check all from nothing), and a table: sites found and
left dense, the table's largest speedup, the measured speed of the table's fastest profile (when the
up-front check ran), the status and measured speedup, whether the global correction ran, how far the
engine's outputs were from onnxruntime's, and the wall time. Random weights make the
losses meaningless; what is checked is that every model ends in a measured result or a clear refusal.

    python models/architectures.py --out out/arch
    python models/hf_architectures.py --out out/hf    # then --models-dir out/hf
    python benchmarks/architectures.py --models-dir out/arch --cores 1 --target 1.5 --target-for unet=1.3 \
        --out benchmarks/results/architectures.json --markdown benchmarks/results/architectures.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from spdy_onnx import api  # noqa: E402
from spdy_onnx.errors import InfeasibleTarget, SpdyError, TargetMissed  # noqa: E402
from spdy_onnx.runtimes.deepsparse import cpu_name  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from architectures import ARCHITECTURES  # noqa: E402
from hf_architectures import HF_ARCHITECTURES  # noqa: E402

# what each model is, from either exporter (models/architectures.py, models/hf_architectures.py)
WHAT = {**{n: v[5] for n, v in ARCHITECTURES.items()}, **{n: v[3] for n, v in HF_ARCHITECTURES.items()}}


def run_one(name, onnx_path, data_path, target, cores, workdir: Path, batch_size: int = 1) -> dict:
    row = {"model": name, "what": WHAT[name], "target": target, "batch_size": batch_size}
    from spdy_onnx.graph import find_sites, select_sites
    from spdy_onnx.modelio import load_model
    found, unprunable = find_sites(load_model(onnx_path))
    chosen, excluded = select_sites(found)   # the default exclusions, as `spdy-onnx sites` lists them
    row.update(sites=len(chosen), left_dense=len(excluded) + len(unprunable))
    t0 = time.perf_counter()
    try:
        rep = api.optimize(onnx_path, target=target, data=str(data_path), cores=cores, batch_size=batch_size,
                           cache_dir=workdir / "cache", output=workdir / f"{name}.onnx", progress=False)
        quality = rep.get("quality", {})
        row.update(status=rep["status"], measured=rep["measured_speedup"], predicted=rep["predicted_speedup"],
                   max_table=rep["max_achievable_speedup"], fastest=rep.get("fastest_profile_measured_speedup"),
                   attempts=len(rep["attempts"]),
                   attempt_speedups=[{k: a.get(k) for k in ("aimed_speedup", "predicted_speedup",
                                                            "measured_speedup", "weights")}
                                     for a in rep["attempts"]],
                   engine_outputs=rep.get("engine_outputs"), warnings=rep.get("warnings", []),
                   correction="skipped: " + quality["global_correction_skipped"]
                   if "global_correction_skipped" in quality else
                   ("ran" if "global_correction" in quality else "off"))
    except InfeasibleTarget as exc:
        row.update(status="refused", max_table=exc.max_speedup, fastest=exc.measured, reason=str(exc))
    except TargetMissed as exc:
        row.update(status="missed", measured=exc.measured, reason=str(exc))
    except SpdyError as exc:
        row.update(status="error", reason=str(exc))
    row["seconds"] = time.perf_counter() - t0
    return row


def _fmt(v, spec="{:.2f}x"):
    return "-" if v is None else spec.format(v)


def _engine(check) -> str:
    """The engine's outputs against onnxruntime's (the report's engine_outputs): largest relative error."""
    if not check or not check.get("checked"):
        return "-"

    def one(e):
        return "not finite" if not e["finite"] else f"{e['max_rel_error']:.0e}"
    return f"{one(check['pruned'])}; {one(check['dense'])}"


def render(rows, args) -> str:
    import deepsparse
    lines = [f"DeepSparse {deepsparse.__version__}, batch {args.batch_size}, {args.cores} core(s), CPU: {cpu_name()}; "
             "cold cache for every model; default settings with `--data` (64 random samples).", "",
             "| model | sites (left dense) | target | table max | fastest measured | status | measured | "
             "correction | engine vs onnxruntime (written file; dense) | time s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sites']} ({r['left_dense']}) | {r['target']:g}x | "
                     f"{_fmt(r.get('max_table'))} | {_fmt(r.get('fastest'))} | {r['status']} | "
                     f"{_fmt(r.get('measured'))} | {r.get('correction', '-')} | {_engine(r.get('engine_outputs'))} | "
                     f"{r['seconds']:.0f} |")
    notes = [f"- {r['model']}: {r['reason']}" for r in rows if r.get("reason")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, required=True,
                   help="where models/architectures.py or models/hf_architectures.py wrote them")
    p.add_argument("--model", action="append", default=[], help="repeatable; default all that are there")
    p.add_argument("--target", type=float, default=1.5)
    p.add_argument("--target-for", action="append", default=[], metavar="NAME=T", help="another target for one model")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1, help="the batch size optimised for (default 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON rows")
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    targets = {k: float(v) for k, v in (item.split("=", 1) for item in args.target_for)}
    names = args.model or [n for n in WHAT if (args.models_dir / f"{n}.onnx").exists()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="spdy-arch-") as tmp:
        for name in names:
            row = run_one(name, args.models_dir / f"{name}.onnx", args.models_dir / f"{name}_calib.npz",
                          targets.get(name, args.target), args.cores, Path(tmp) / name, batch_size=args.batch_size)
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = render(rows, args)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
