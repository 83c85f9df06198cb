"""Speed benchmark: does `optimize` deliver the promised speedup on DeepSparse, measured end to end?

For each model and target: the largest achievable speedup, the predicted speedup, the speedup measured
by `optimize` itself, an independent re-measurement (dense and pruned interleaved in this process,
medians), and the wall time. Run it on a quiet machine; it is not a test.

    python benchmarks/speed.py --model out/minilm-l6.onnx --model out/mobilenetv2.onnx --mlp \
        --targets 1.5,2,2.5,3 --cores 1
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

import onnx  # noqa: E402

from spdy_onnx import api  # noqa: E402
from spdy_onnx.errors import InfeasibleTarget, TargetMissed  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="ONNX model (repeatable)")
    p.add_argument("--data", action="append", default=[], help="calibration .npz per --model, in order ('-' for none)")
    p.add_argument("--mlp", action="store_true", help="also a model made only of large MatMuls (8 x 1024x1024, 128 tokens)")
    p.add_argument("--targets", default="1.5,2,2.5,3")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--strategy", default="spdy")
    p.add_argument("--search-budget", default="300")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--rounds", type=int, default=25, help="interleaved rounds of the independent check")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="spdy-bench-"))
    models = [(Path(m), (args.data[i] if i < len(args.data) and args.data[i] != "-" else None))
              for i, m in enumerate(args.model)]
    if args.mlp:
        import tiny
        mlp = work / "mlp-8x1024.onnx"
        onnx.save(tiny.mlp(width=1024, depth=8, seq=128), mlp)
        models.append((mlp, None))
    targets = [float(t) for t in args.targets.split(",")]
    rows = []
    for model, data in models:
        for target in targets:
            out = work / f"{model.stem}.{target:g}x.onnx"
            t0 = time.perf_counter()
            row = {"model": model.stem, "target": target}
            try:
                rep = api.optimize(model, target=target, output=out, cores=args.cores, batch_size=args.batch_size,
                                   data=data, strategy=args.strategy, search_budget=args.search_budget,
                                   cache_dir=args.cache_dir, progress=False)
                row.update(max=rep["max_achievable_speedup"], predicted=rep["predicted_speedup"],
                           measured=rep["measured_speedup"], attempts=len(rep["attempts"]), status=rep["status"],
                           sparsity=rep["weighted_mean_sparsity"])
                check = api.benchmark(out, baseline=model, cores=args.cores, batch_size=args.batch_size,
                                      progress=False, runtime_options={"rounds": args.rounds})
                row.update(check=check.speedup, dense_ms=check.baseline_ms, pruned_ms=check.candidate_ms,
                           load=check.foreign_load_cores)
            except InfeasibleTarget as exc:
                row.update(status="infeasible", max=exc.max_speedup)
            except TargetMissed as exc:
                row.update(status="missed", measured=exc.measured)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(_fmt_row(row), flush=True)
    print()
    print(f"DeepSparse, batch {args.batch_size}, {args.cores} core(s), strategy {args.strategy}, "
          f"CPU: {_cpu()}")
    print("| model | target | max achievable | predicted | measured by optimize | independent check | "
          "dense ms | pruned ms | attempts | status | time s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| {model} | {target:g}x | {mx} | {pr} | {me} | {ck} | {dm} | {pm} | {at} | {status} | {seconds:.0f} |".format(
            mx=_x(r.get("max")), pr=_x(r.get("predicted")), me=_x(r.get("measured")), ck=_x(r.get("check")),
            dm=_f(r.get("dense_ms")), pm=_f(r.get("pruned_ms")), at=r.get("attempts", "-"), **r))


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _f(v):
    return "-" if v is None else f"{v:.2f}"


def _fmt_row(r):
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


def _cpu():
    from spdy_onnx.runtimes.deepsparse import cpu_name
    return cpu_name()


if __name__ == "__main__":
    main()
