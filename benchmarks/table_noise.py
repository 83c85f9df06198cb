"""Is a latency table's column noise removable with the time of the layers that are never pruned?

Each level of the table is one engine run with every site at that sparsity. A run made in a slow moment
of a shared machine is slow for every layer, the prunable ones and the rest alike. The rest (softmax,
layer norms, attention products: everything outside the sites) runs the same kernels at every level, so
its time in a run, against its time at the levels around it in the same pass, measures how slow that
run was (`slowness_factors` of the runtime, which profiling applies). This script
profiles the model `--repeats` times (levels in alternating order), then compares, per level:

- the sites' total time in each repeat, raw and divided by that run's slowness, and how far apart the
  repeats are each way;
- predicted speedups of a few profiles (uniform levels, and the DP's mixed profiles on magnitude errors)
  from the first repeat's table, raw and normalised, against the speedups measured end to end.

Run it on a quiet machine; it is not a test.

    python benchmarks/table_noise.py --model out/minilm-l6.onnx --cores 1 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, modelio  # noqa: E402
from spdy_onnx.database import magnitude_database  # noqa: E402
from spdy_onnx.passes.prune import write_weights  # noqa: E402
from spdy_onnx.runtimes.deepsparse import slowness_factors  # noqa: E402
from spdy_onnx.scores import magnitude_errors  # noqa: E402
from spdy_onnx.solver import solve_dp  # noqa: E402


def profile_runs(prep, levels, repeats, feeds):
    """[{repeat, level, total, sites: {name: ms}}] in the order run."""
    rt = prep.runtime
    aliases = graph.output_aliases(prep.model, prep.all_sites)
    weights = {s.name: s.n_weights for s in prep.all_sites}
    inputs = [np.ascontiguousarray(a) for a in feeds.values()]
    runs = []
    for rep in range(repeats):
        for lvl in (levels if rep % 2 == 0 else levels[::-1]):
            result = rt._analyse_engine(rt._compile(str(prep.dense_static()), prep.batch_size, lvl), inputs, lvl)
            runs.append({"repeat": rep, "level": lvl, "total": float(result["average_total_time"]),
                         "sites": rt.attribute(result["layer_info"], aliases, weights)})
            print(f"  repeat {rep} level {lvl:.4f}: total {runs[-1]['total']:.2f} ms", flush=True)
    return runs


def slowness(runs, names):
    """Each run's slowness as the runtime gauges it, per pass (as one profiling pass would see it)."""
    factors = [1.0] * len(runs)
    for rep in sorted({r["repeat"] for r in runs}):
        idx = [i for i, r in enumerate(runs) if r["repeat"] == rep]
        found = slowness_factors([runs[i]["level"] for i in idx], [runs[i]["total"] for i in idx],
                                 [sum(runs[i]["sites"][n] for n in names) for i in idx])
        for i, f in zip(idx, found):
            factors[i] = f
    other = [r["total"] - sum(r["sites"][n] for n in names) for r in runs]
    return factors, other


def table_from(runs, names, levels, factors=None):
    """(sites x levels) medians over the runs, each run divided by its factor when given."""
    m = np.zeros((len(names), len(levels)))
    for j, lvl in enumerate(levels):
        cols = [np.array([r["sites"][n] for n in names]) / (factors[i] if factors else 1.0)
                for i, r in enumerate(runs) if r["level"] == lvl]
        m[:, j] = np.median(cols, axis=0)
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--aims", default="1.5,2,2.5", help="aims of the profiles measured end to end")
    p.add_argument("--out", default=None, help="also write every run and measurement as JSON")
    args = p.parse_args(argv)

    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS,
                        progress=False)
    levels = prep.runtime.default_levels()
    feeds = modelio.example_inputs(prep.specs)
    t0 = time.perf_counter()
    print(f"profiling {args.model}: {len(levels)} levels x {args.repeats} repeats", flush=True)
    runs = profile_runs(prep, levels, args.repeats, feeds)
    names = [s.name for s in prep.sites if all(s.name in r["sites"] for r in runs)]
    factors, other = slowness(runs, names)
    print(f"profiled in {time.perf_counter() - t0:.0f} s; {len(names)} sites")

    print("\n| level | " + " | ".join(f"sites r{k} | other r{k}" for k in range(args.repeats))
          + " | repeats apart, raw | repeats apart, normalised |")
    print("|---|" + "---|---|" * args.repeats + "---|---|")
    apart_raw, apart_norm = [], []
    for lvl in levels:
        idx = [i for i, r in enumerate(runs) if r["level"] == lvl]
        sums = [sum(runs[i]["sites"][n] for n in names) for i in idx]
        norm = [s / factors[i] for s, i in zip(sums, idx)]
        raw_apart = (max(sums) - min(sums)) / np.median(sums)
        norm_apart = (max(norm) - min(norm)) / np.median(norm)
        apart_raw.append(raw_apart)
        apart_norm.append(norm_apart)
        cells = " | ".join(f"{s:.2f} | {other[i]:.2f}" for s, i in zip(sums, idx))
        print(f"| {lvl:.3f} | {cells} | {100 * raw_apart:.1f}% | {100 * norm_apart:.1f}% |")
    print(f"\nmedian spread of a level's site total between repeats: raw {100 * np.median(apart_raw):.1f}%, "
          f"normalised {100 * np.median(apart_norm):.1f}%")

    # predictions from the first repeat alone (the default profiling keeps one repeat on a steady machine)
    first = [r for r in runs if r["repeat"] == 0]
    f_first = [factors[i] for i, r in enumerate(runs) if r["repeat"] == 0]
    raw = table_from(first, names, levels)
    normed = table_from(first, names, levels, f_first)
    dense_total = float(np.median([r["total"] for r in first if r["level"] == 0.0]))
    dense_total_n = float(np.median([r["total"] / f for r, f in zip(first, f_first) if r["level"] == 0.0]))
    fixed = dense_total - raw[:, 0].sum()
    fixed_n = dense_total_n - normed[:, 0].sum()

    sites = [s for s in prep.sites if s.name in names]
    sources = graph.read_weights(prep.model, sites)
    database = magnitude_database(sites, sources, list(levels), "unstructured")
    errors = magnitude_errors(sources, names, list(levels))
    profiles = []
    for j in (3, 6, 9):
        profiles.append((f"uniform {levels[j]:.2f}", np.full(len(names), j)))
    for aim in [float(a) for a in args.aims.split(",")]:
        for label, m, dt, fx in (("raw", raw, dense_total, fixed), ("normalised", normed, dense_total_n, fixed_n)):
            picks = solve_dp(errors, m, dt / aim - fx)
            profiles.append((f"DP {aim:g}x on {label}", picks))

    rows = []
    print("\n| profile | sparsity | predicted, raw | predicted, normalised | measured | measured / raw | "
          "measured / normalised |")
    print("|---|---|---|---|---|---|---|")
    rows_idx = np.arange(len(names))
    n_w = np.array([s.n_weights for s in sites])
    for label, picks in profiles:
        pred_raw = dense_total / (fixed + raw[rows_idx, picks].sum())
        pred_norm = dense_total_n / (fixed_n + normed[rows_idx, picks].sum())
        w = {s.weight: database.weight(s.name, int(j)) for s, j in zip(sites, picks)}
        path = prep.static_copy(write_weights(prep.model, w), label.replace(" ", "_"))
        measured = prep.runtime.compare(str(prep.dense_static()), str(path), batch_size=prep.batch_size,
                                        feeds=feeds).speedup
        sparsity = float((np.array(levels)[picks] * n_w).sum() / n_w.sum())
        rows.append({"profile": label, "sparsity": sparsity, "predicted_raw": pred_raw,
                     "predicted_normalised": pred_norm, "measured": measured})
        print(f"| {label} | {100 * sparsity:.0f}% | {pred_raw:.3f}x | {pred_norm:.3f}x | {measured:.3f}x | "
              f"{measured / pred_raw:.3f} | {measured / pred_norm:.3f} |", flush=True)
    r_raw = [r["measured"] / r["predicted_raw"] for r in rows]
    r_norm = [r["measured"] / r["predicted_normalised"] for r in rows]
    print(f"\nmeasured / predicted over the profiles: raw {min(r_raw):.3f}-{max(r_raw):.3f} "
          f"(spread {max(r_raw) / min(r_raw):.3f}), normalised {min(r_norm):.3f}-{max(r_norm):.3f} "
          f"(spread {max(r_norm) / min(r_norm):.3f})")
    print(f"model {os.path.basename(args.model)} | batch {args.batch_size} | cores {args.cores} | "
          f"DeepSparse, {prep.runtime.fingerprint().get('cpu')} | {time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"levels": levels, "runs": runs, "factors": factors, "profiles": rows}, fh, indent=1)
    prep.close()


if __name__ == "__main__":
    main()
