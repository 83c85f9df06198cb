"""Which kernels does the engine form in a mixed draft that no profiling run shows, and what do they cost?

A latency-table run has every site at one level. On a conv net the engine fuses whole blocks into one
kernel, and a mixed file (some blocks sparse, the next dense) can fuse sites across blocks in ways no
such run did; those blocks then run slower than the sum of their table times. This script takes a
dense model and an `optimize` report (its sites' sparsities: run optimize with `--max-attempts 1
--correct-epochs 0` to keep the first draft's), writes magnitude-pruned files with the report's
per-site sparsities and with every chosen site at one level, analyses them and the dense file with
the engine's per-layer analysis (their own zeros, nothing imposed; alternated, medians), and prints
the kernels that name several sites in each file and the times of the sites in them.

    python benchmarks/draft_fusion.py --model out/mobilenetv2.onnx --report draft.report.json \\
        --batch-size 16 --cores 1

DeepSparse, one analysis per file and round; it is not a test.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, modelio  # noqa: E402
from spdy_onnx.passes.prune import magnitude_prune, write_weights  # noqa: E402


def short(name: str) -> str:
    return name.replace("/features/features.", "f").replace("/conv/", " ").replace("/Conv", "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the dense ONNX file")
    p.add_argument("--report", required=True, help="an optimize report for that model (per-site sparsities)")
    p.add_argument("--level", type=float, default=None,
                   help="the one level of the uniform file (default: the report's most common sparse level)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="analyses of each file, alternated")
    args = p.parse_args(argv)

    report = json.loads(Path(args.report).read_text())
    draft = {s["name"]: float(s["sparsity"]) for s in report["sites"] if not s.get("excluded")}
    level = args.level or Counter(round(v, 3) for v in draft.values() if v > 0).most_common(1)[0][0]
    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=0, progress=False,
                        runtime_options={"repeats": 1})
    try:
        rt = prep.runtime
        chosen = [s for s in prep.all_sites if s.name in draft]
        sources = graph.read_weights(prep.model, chosen)

        def pruned(sparsity: dict, tag: str) -> Path:
            new = {s.weight: magnitude_prune(sources[s.name], sparsity[s.name]) for s in chosen if sparsity[s.name] > 0}
            return prep.static_copy(write_weights(prep.model, new), tag)

        files = {"dense": prep.dense_static(), f"uniform {level:g}": pruned({n: level for n in draft}, "uniform"),
                 "draft": pruned(draft, "draft")}
        feeds = modelio.example_inputs(prep.specs)
        inputs = [np.ascontiguousarray(a) for a in feeds.values()]
        aliases = graph.output_aliases(prep.model, prep.all_sites)
        weights = {s.name: s.n_weights for s in prep.all_sites}
        totals = {k: [] for k in files}
        times = {k: [] for k in files}
        kernels = {}
        for _ in range(args.rounds):
            for key, path in files.items():
                result = rt._analyse(str(path), inputs, args.batch_size, 0.0)
                totals[key].append(float(result["average_total_time"]))
                times[key].append(rt.attribute(result["layer_info"], aliases, weights))
                kernels[key] = rt.fused(result["layer_info"], aliases)
    finally:
        prep.close()

    med = {k: float(np.median(v)) for k, v in totals.items()}
    site_ms = {k: {n: float(np.median([r.get(n, np.nan) for r in runs])) for n in runs[0]} for k, runs in times.items()}
    first = report["attempts"][0] if report.get("attempts") else {}
    print(f"model {Path(args.model).name}, DeepSparse, batch {args.batch_size}, {args.cores} core(s), "
          f"{args.rounds} analyses per file, medians")
    if first:
        print(f"the report's first draft: predicted {first['predicted_speedup']:.3f}x, measured "
              f"{first['measured_speedup']:.3f}x end to end")
    print("\n| file | total ms | speedup vs dense (analysis) |\n|---|---|---|")
    for k in files:
        print(f"| {k} | {med[k]:.2f} | {med['dense'] / med[k]:.3f}x |")
    print("\nkernels naming several sites:")
    for k in files:
        print(f"- {k}: " + "; ".join("[" + ", ".join(short(n) for n in g) + "]" for g in kernels[k]))
    seen = {frozenset(g) for k in files if k != "draft" for g in kernels[k]}
    new = [g for g in kernels["draft"] if frozenset(g) not in seen]
    print("- only in the draft: " + ("; ".join("[" + ", ".join(short(n) for n in g) + "]" for g in new) or "none"))
    # the sites of kernels that differ between the files (a kernel all three form alike is left out)
    common = set.intersection(*({frozenset(g) for g in kernels[k]} for k in files))
    involved = sorted({n for k in files for g in kernels[k] if frozenset(g) not in common for n in g},
                      key=list(site_ms["dense"]).index)
    print("\n| site (in a kernel not alike in all three files) | draft sparsity | dense ms | uniform ms | draft ms |\n"
          "|---|---|---|---|---|")
    uni = f"uniform {level:g}"
    for n in involved:
        print(f"| {short(n)} | {draft.get(n, 0.0):.2f} | {site_ms['dense'].get(n, 0):.3f} | "
              f"{site_ms[uni].get(n, 0):.3f} | {site_ms['draft'].get(n, 0):.3f} |")
    s = {k: sum(site_ms[k].get(n, 0) for n in involved) for k in files}
    print(f"| **these sites together** | | {s['dense']:.2f} | {s[uni]:.2f} | {s['draft']:.2f} |")


if __name__ == "__main__":
    main()
