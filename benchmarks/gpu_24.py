"""2:4 on a GPU for the reference models: latency tables, the 2:4-eligible share of time, the largest
achievable speedup, and measured end-to-end speedups at a few targets.

Two steps, because the GPU machines reach no model hub and carry at most 64 MiB with them:

  here, on the CPU machine (export at the batch size to time, then pack):
    python models/export_minilm.py --out /tmp/m/minilm-b128 --batch 128 --skip-deepsparse
    python models/export_mobilenetv2.py --out /tmp/m/mbv2-b256 --batch 256 --skip-deepsparse
    python benchmarks/gpu_24.py pack --out .gpu24 /tmp/m/minilm-b128/minilm-l6.onnx /tmp/m/mbv2-b256/mobilenetv2.onnx

  on the GPU machine (benchmarks/gpu_device_run.sh wraps this with the GPU tests and the GEMM sweep):
    python benchmarks/gpu_24.py run --pack .gpu24 --out OUT_DIR [--models NAME,...] [--targets 1.1,1.2,1.3]
        [--budget-s S] [--fixtures tests/fixtures]

`run` first writes every model's table and measures every eligible site 2:4 end to end, then runs the
feasible targets round-robin over the models while --budget-s lasts, so a short lease still brings back
every table.

A pack holds each model's graph with its float weights left out (the digest of the real model is kept);
`run` fills them with seeded random values of each tensor's own mean and standard deviation. GPU times
depend on shapes, dtypes and the 2:4 layout, not on the values, so the tables apply to the real model
(its site names and shapes are the same): `spdy-onnx optimize REAL.onnx --runtime cuda-2:4
--latency-table gpu_<model>_<gpu>.json --batch-size B --target T` replays them on any machine.

`run` writes gpu_<model>-b<batch>_<gpu>.json (one latency table per model) and gpu24_results.json
(everything printed) into OUT_DIR, and prints a table:
model, batch, 2:4-eligible share of time, max achievable speedup (predicted, and measured with every
eligible site 2:4), target, predicted, measured, status.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

MARK = "spdy.skeleton"
MIN_ELEMENTS = 16
DEFAULT_TARGETS = "1.02,1.05,1.1,1.15,1.2,1.25,1.3,1.4,1.5,1.7,2.0"

log = logging.getLogger("gpu_24")


# ------------------------------------------------------------------------------------------------
# pack / fill
# ------------------------------------------------------------------------------------------------

def model_batch(model: onnx.ModelProto) -> int:
    inits = {i.name for i in model.graph.initializer}
    first = next(i for i in model.graph.input if i.name not in inits)
    dim = first.type.tensor_type.shape.dim[0]
    if not dim.HasField("dim_value") or dim.dim_value < 1:
        raise SystemExit(f"{first.name}: the batch dimension must be static (export at the batch to time)")
    return int(dim.dim_value)


def pack(models: list[str], out: Path) -> None:
    from spdy_onnx import graph, modelio

    out.mkdir(parents=True, exist_ok=True)
    for path in models:
        model = onnx.load(path)
        digest = modelio.model_digest(graph.constants_to_initializers(modelio.load_model(path)))
        name = f"{Path(path).stem}-b{model_batch(model)}"
        kept = 0
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype.kind != "f" or arr.size < MIN_ELEMENTS:
                continue
            a64 = arr.astype(np.float64)
            init.doc_string = json.dumps({MARK: True, "mean": float(a64.mean()), "std": float(a64.std())})
            init.ClearField("raw_data")
            for field in ("float_data", "double_data", "int32_data"):
                init.ClearField(field)
            kept += arr.size
        model.metadata_props.add(key=f"{MARK}.sha256", value=digest)
        model.metadata_props.add(key=f"{MARK}.source", value=Path(path).name)
        target = out / f"{name}.skel.onnx"
        onnx.save(model, str(target))
        print(f"packed {path} -> {target} ({target.stat().st_size / 1e6:.2f} MB; {kept} weights left out; "
              f"model digest {digest[:12]})")


def fill(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if not init.doc_string.startswith("{"):
            continue
        info = json.loads(init.doc_string)
        if not info.get(MARK):
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        arr = rng.normal(info["mean"], info["std"], tuple(init.dims)).astype(dtype)
        init.raw_data = arr.tobytes()
        init.doc_string = ""
    return model


def gpu_short_name(full: str) -> str:
    m = re.search(r"\b([ABHLTV]\d{2,3}[A-Za-z]?|RTX ?\d{4}|GH\d{3}|B\d{3})\b", full)
    return (m.group(1) if m else full).lower().replace(" ", "")


# ------------------------------------------------------------------------------------------------
# run (on the GPU)
# ------------------------------------------------------------------------------------------------

def _selected(model, table):
    """The sites optimize would choose for (default exclusions, then 2:4 eligibility)."""
    from spdy_onnx import graph
    from spdy_onnx.passes.semi_structured import eligible

    sites, _ = graph.find_sites(graph.constants_to_initializers(model))
    chosen, _ = graph.select_sites(sites)
    return [s for s in chosen if s.name in table.times and eligible(s)[0]], sites


def _all_24(model, sites):
    from spdy_onnx import graph
    from spdy_onnx.passes.prune import write_weights
    from spdy_onnx.passes.semi_structured import prune_2_4

    w = graph.read_weights(graph.constants_to_initializers(model), sites)
    return write_weights(graph.constants_to_initializers(model), {s.weight: prune_2_4(s, w[s.name]) for s in sites})


def run(pack_dir: Path, out: Path, targets: list[float], fixtures: Path | None, max_targets: int,
        budget_s: float, device: str = "cuda", models: list[str] | None = None, max_attempts: int = 4) -> None:
    """Two passes, so a short lease still brings back every table: first each model's table and its
    all-eligible-2:4 measurement, then the targets, round-robin over the models while the budget lasts."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run this on the GPU machine (or --device cpu for a dry run)")
    t_start = time.perf_counter()
    if device == "cuda":
        gpu_full = torch.cuda.get_device_name()
        gpu = gpu_short_name(gpu_full)
    else:
        gpu_full, gpu = "CPU DRY RUN (not a GPU measurement)", "cpu-dryrun"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu24-"))
    results = {"gpu": gpu_full, "torch": torch.__version__, "cuda": torch.version.cuda, "models": [],
               "max_attempts": max_attempts, "budget_s": budget_s}
    print(f"GPU: {gpu_full}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    skels = sorted(pack_dir.glob("*.skel.onnx"))
    if models:
        by_name = {s.name[: -len(".skel.onnx")]: s for s in skels}
        unknown = [m for m in models if m not in by_name]
        if unknown:
            raise SystemExit(f"not in the pack: {', '.join(unknown)} (it has {', '.join(sorted(by_name))})")
        skels = [by_name[m] for m in models]

    def save():
        (out / "gpu24_results.json").write_text(json.dumps(results, indent=1))

    prepared = []
    for skel in skels:
        try:
            prepared.append(_profile_one(skel, work, out, gpu, targets, fixtures, max_targets, results, device))
        except Exception:  # noqa: BLE001 - one model failing must not lose the others' numbers
            import traceback
            traceback.print_exc()
            results["models"].append({"model": skel.name, "error": traceback.format_exc(limit=3)})
        save()
        print(f"   [{time.perf_counter() - t_start:.0f} s]")
    # targets: round k runs each model's k-th target (middle of its feasible range first)
    rounds = max((len(p["targets"]) for p in prepared), default=0)
    for k in range(rounds):
        for p in prepared:
            if k >= len(p["targets"]):
                continue
            if time.perf_counter() - t_start > budget_s:
                p["entry"].setdefault("skipped_targets", []).append(p["targets"][k])
                continue
            try:
                _target_one(p, p["targets"][k], work, device, max_attempts)
            except Exception:  # noqa: BLE001
                import traceback
                traceback.print_exc()
                p["entry"]["runs"].append({"target": p["targets"][k], "status": "error",
                                           "error": traceback.format_exc(limit=3)})
            save()
            print(f"   [{time.perf_counter() - t_start:.0f} s]")
    skipped = {p["entry"]["model"]: p["entry"]["skipped_targets"] for p in prepared
               if p["entry"].get("skipped_targets")}
    if skipped:
        print(f"time budget ({budget_s:.0f} s) spent; targets not run: {skipped}")
    results["seconds"] = time.perf_counter() - t_start
    results["markdown"] = markdown(results)
    save()
    print("\n" + results["markdown"])


def _spread(feasible: list[float], max_targets: int) -> list[float]:
    """At most max_targets of the feasible targets, spread over the range with the highest included,
    ordered middle first, then highest, then the rest (a short budget runs the most telling first)."""
    if not max_targets or not feasible:
        return []
    if len(feasible) > max_targets:
        feasible = [feasible[i] for i in sorted(set(np.linspace(0, len(feasible) - 1, max_targets)
                                                    .round().astype(int)))]
    mid = feasible[(len(feasible) - 1) // 2]
    rest = [t for t in reversed(feasible) if t != mid]
    return [mid] + rest


def _profile_one(skel, work, out, gpu, targets, fixtures, max_targets, results, device):
    from spdy_onnx import api, modelio
    from spdy_onnx.runtimes.cuda_sparse import CudaSemiStructuredRuntime

    name = skel.name[: -len(".skel.onnx")]
    model = onnx.load(str(skel))
    meta = {p.key: p.value for p in model.metadata_props}
    model = fill(model)
    del model.metadata_props[:]
    path = work / f"{name}.onnx"
    onnx.save(model, str(path))
    batch = model_batch(model)
    print(f"\n== {name}: batch {batch}")
    t0 = time.perf_counter()
    table_path = out / f"gpu_{name}_{gpu}.json"
    options = {"device": device}
    table, _ = api.profile(path, runtime="cuda-2:4", batch_size=batch, output=table_path, use_cache=False,
                           cache_dir=work / "cache", progress=False, runtime_options=options)
    table.meta.update({"model": meta.get(f"{MARK}.source", name), "model_sha256": meta.get(f"{MARK}.sha256"),
                       "weights": "random values of the real shapes and scales (GPU times do not depend "
                                  "on values)", "profile_seconds": time.perf_counter() - t0})
    table.save(table_path)
    if fixtures and device == "cuda":
        fixtures.mkdir(parents=True, exist_ok=True)
        shutil.copy(table_path, fixtures / table_path.name)
    chosen, all_sites = _selected(model, table)
    names = [s.name for s in chosen]
    total = table.dense_total_ms
    eligible_ms = sum(table.times[n][0] for n in names)
    paying = [n for n in names if table.times[n][1] < table.times[n][0]]
    max_pred = table.max_speedup(names)
    # every eligible site 2:4, measured end to end: what the model really gets at most
    t1 = time.perf_counter()
    rt = CudaSemiStructuredRuntime(progress=False, device=device)
    feeds = modelio.example_inputs(modelio.input_specs(model, batch))
    all_path = work / f"{name}.all24.onnx"
    onnx.save(_all_24(model, chosen), str(all_path))
    comp_all = rt.compare(str(path), str(all_path), batch_size=batch, feeds=feeds)
    entry = {"model": name, "batch": batch, "dense_ms": total, "sites": len(all_sites),
             "eligible_sites": len(names), "eligible_share": eligible_ms / total,
             "sites_where_2_4_is_faster": len(paying),
             "max_speedup_predicted": max_pred,
             "all_eligible_24_measured": comp_all.speedup if comp_all else None,
             "all_eligible_24_ms": [comp_all.baseline_ms, comp_all.candidate_ms] if comp_all else None,
             "sum_sites_dense_ms": table.meta.get("sites_dense_ms"), "table": table_path.name,
             "dtype": table.meta.get("dtype"), "cuda_graph": table.meta.get("cuda_graph"),
             "backends": {n: table.meta["sites"][n].get("backend") for n in names},
             "profile_seconds": t1 - t0, "all_24_seconds": time.perf_counter() - t1,
             "runs": []}
    print(f"dense {total:.3f} ms; eligible sites {len(names)}/{len(all_sites)} = {100 * eligible_ms / total:.1f}% "
          f"of the time; 2:4 faster at {len(paying)}; max achievable {max_pred:.3f}x predicted, "
          f"{entry['all_eligible_24_measured'] or float('nan'):.3f}x measured with every eligible site 2:4 "
          f"(table {t1 - t0:.0f} s, all-2:4 check {time.perf_counter() - t1:.0f} s)")
    for n in names:
        d, s = table.times[n]
        info = table.meta["sites"][n]
        print(f"   {n[-48:]:48s} mnk={info.get('gemm_mnk')} dense {d:.4f} ms  2:4 {s:.4f} ms  "
              f"x{d / s:.2f} ({info.get('backend')})")
    # a target is worth running when the table allows it with the guarantee's margin to spare
    feasible = [t for t in targets if t * (1 + api.DEFAULT_MARGIN) * 1.01 <= max_pred]
    results["models"].append(entry)
    return {"entry": entry, "name": name, "path": path, "table_path": table_path, "batch": batch,
            "options": options, "targets": _spread(feasible, max_targets)}


def _target_one(p, target, work, device, max_attempts):
    from spdy_onnx import api
    from spdy_onnx.errors import InfeasibleTarget, SpdyError, TargetMissed

    name, entry = p["name"], p["entry"]
    rep_path = work / f"{name}.{target:g}.report.json"
    run_entry = {"target": target}
    t0 = time.perf_counter()
    try:
        rep = api.optimize(p["path"], target=target, runtime="cuda-2:4", batch_size=p["batch"],
                           latency_table=p["table_path"], output=work / f"{name}.{target:g}.onnx",
                           report=rep_path, progress=False, cache_dir=work / "cache",
                           runtime_options=p["options"], max_attempts=max_attempts)
    except TargetMissed:
        rep = json.loads(rep_path.read_text())
    except InfeasibleTarget as exc:
        run_entry.update(status="infeasible", error=str(exc), seconds=time.perf_counter() - t0)
        entry["runs"].append(run_entry)
        print(f"   {name} target {target:g}x: infeasible ({exc})")
        return
    except SpdyError as exc:
        run_entry.update(status="error", error=str(exc), seconds=time.perf_counter() - t0)
        entry["runs"].append(run_entry)
        print(f"   {name} target {target:g}x: error {exc}")
        return
    n24 = sum(1 for s in rep["sites"] if s["sparsity"] == 0.5)
    run_entry.update(status=rep["status"], predicted=rep["predicted_speedup"],
                     measured=rep["measured_speedup"], dense_ms=rep["dense_ms"], pruned_ms=rep["pruned_ms"],
                     sites_2_4=n24, attempts=[{k: a[k] for k in ("aimed_speedup", "predicted_speedup",
                                                                 "measured_speedup")}
                                              for a in rep["attempts"]],
                     p25=(rep["measurement"] or {}).get("speedup_p25"),
                     p75=(rep["measurement"] or {}).get("speedup_p75"), seconds=time.perf_counter() - t0)
    entry["runs"].append(run_entry)
    print(f"   {name} target {target:g}x: {rep['status']}; predicted {rep['predicted_speedup']:.3f}x, measured "
          f"{rep['measured_speedup'] or float('nan'):.3f}x ({n24} sites 2:4, {len(rep['attempts'])} attempt(s), "
          f"{time.perf_counter() - t0:.0f} s)")


def markdown(results: dict) -> str:
    dtypes = sorted({m.get("dtype", "?") for m in results["models"] if "error" not in m})
    graphs = sorted({str(m.get("cuda_graph")) for m in results["models"] if "error" not in m})
    lines = [f"GPU: {results['gpu']} (torch {results['torch']}, CUDA {results['cuda']}); dtype {', '.join(dtypes)}; "
             f"CUDA graphs: {', '.join(graphs)}", "",
             "| model | batch | dense ms | 2:4-eligible share of time | max speedup (predicted / measured, all eligible 2:4) "
             "| target | predicted | measured | status | sites 2:4 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        if "error" in m:
            lines.append(f"| {m['model']} | error | | | | | | | | |")
            continue
        head = (f"| {m['model']} | {m['batch']} | {m['dense_ms']:.2f} | {100 * m['eligible_share']:.1f}% | "
                f"{m['max_speedup_predicted']:.3f}x / "
                f"{(m['all_eligible_24_measured'] or float('nan')):.3f}x")
        runs = [r for r in m["runs"] if r.get("status") in ("met", "missed", "not_measured")]
        if not runs:
            lines.append(head + " | - | - | - | - | - |")
        for r in runs:
            lines.append(head + f" | {r['target']:g}x | {r['predicted']:.3f}x | "
                         f"{(r['measured'] or float('nan')):.3f}x | {r['status']} | {r['sites_2_4']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="write weight-less copies of exported models (CPU machine)")
    p.add_argument("models", nargs="+")
    p.add_argument("--out", type=Path, default=Path(".gpu24"))
    p = sub.add_parser("run", help="tables, max speedups and measured speedups (GPU machine)")
    p.add_argument("--pack", type=Path, default=Path(".gpu24"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--targets", default=DEFAULT_TARGETS)
    p.add_argument("--max-targets", type=int, default=3,
                   help="at most N feasible targets per model, spread over the feasible range")
    p.add_argument("--models", default=None,
                   help="comma-separated model names from the pack (e.g. minilm-l6-b128), in the order to run")
    p.add_argument("--max-attempts", type=int, default=4, help="optimize's attempts per target")
    p.add_argument("--fixtures", type=Path, default=None, help="also copy the tables here")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new targets after this long")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of this script's code path (times are not GPU times)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    if args.cmd == "pack":
        pack(args.models, args.out)
    else:
        run(args.pack, args.out, [float(t) for t in args.targets.split(",")], args.fixtures, args.max_targets,
            args.budget_s, args.device, models=args.models.split(",") if args.models else None,
            max_attempts=args.max_attempts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
