"""Is a latency table's column noise removable with the time of the layers that are never pruned?

Each level of the table is one engine run with every site at that sparsity. A run made in a slow moment
of a shared machine is slow for every layer, the prunable ones and the rest alike. The rest (softmax,
layer norms, attention products: everything outside the sites) runs the same kernels at every level, so
its time in a run, against its time at the levels around it in the same pass, measures how slow that
run was (`slowness_factors` of the runtime, which profiling applies). This script
profiles the model `--repeats` times (levels in alternating order), then compares, per level:

- the sites' total time in each repeat, raw and divided by that run's slowness, and how far apart the
  repeats are each way;
- a few profiles (three uniform levels, and the DP's mixed profiles on magnitude errors, solved on the
  first pass's table raw and divided), measured end to end, against what each pass's own table, raw and
  divided, predicts for them: the spread of measured / predicted within a pass (what the solver is misled
  by) and, per profile, across the passes (how much a table depends on the moment it was measured).

Run it on a quiet machine; it is not a test. `--replay` re-reads the runs and measurements of an earlier
`--out` file and prints the same tables with the slowness factors the code now computes, without the engine.

    python benchmarks/table_noise.py --model out/minilm-l6.onnx --cores 1 --repeats 3 --out table_noise.json
    python benchmarks/table_noise.py --model out/minilm-l6.onnx --replay table_noise.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

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
                         "sites": rt.attribute(result["layer_info"], aliases, weights),
                         "fused": rt.fused(result["layer_info"], aliases)})
            print(f"  repeat {rep} level {lvl:.4f}: total {runs[-1]['total']:.2f} ms", flush=True)
    return runs


def slowness(runs, names):
    """Each run's slowness as the runtime gauges it, per pass (as one profiling pass would see it)."""
    factors = [1.0] * len(runs)
    for rep in sorted({r["repeat"] for r in runs}):
        idx = [i for i, r in enumerate(runs) if r["repeat"] == rep]
        found = slowness_factors([runs[i]["level"] for i in idx], [runs[i]["total"] for i in idx],
                                 [sum(runs[i]["sites"][n] for n in names) for i in idx],
                                 fused=any(runs[i].get("fused") for i in idx))
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


def pass_table(runs, names, levels, factors):
    """(site times, dense total, fixed time) of one pass, each run divided by its factor."""
    m = table_from(runs, names, levels, factors)
    dense_total = float(np.median([r["total"] / f for r, f in zip(runs, factors) if r["level"] == 0.0]))
    return m, dense_total, dense_total - m[:, 0].sum()


def predicted(table, picks):
    m, dense_total, fixed = table
    return dense_total / (fixed + m[np.arange(len(picks)), np.asarray(picks)].sum())


def solve_profiles(prep, names, levels, first_raw, first_norm, aims):
    sites = [s for s in prep.sites if s.name in names]
    errors = magnitude_errors(graph.read_weights(prep.model, sites), names, list(levels))
    profiles = [(f"uniform {levels[j]:.2f}", [j] * len(names)) for j in (3, 6, 9)]
    for aim in aims:
        for label, (m, dense_total, fixed) in (("raw", first_raw), ("divided", first_norm)):
            picks = solve_dp(errors, m, dense_total / aim - fixed)
            profiles.append((f"DP {aim:g}x on {label}", [int(j) for j in picks]))
    return profiles


def measure_profiles(prep, names, levels, profiles, feeds):
    sites = [s for s in prep.sites if s.name in names]
    database = magnitude_database(sites, graph.read_weights(prep.model, sites), list(levels), "unstructured")
    n_w = np.array([s.n_weights for s in sites])
    rows = []
    for label, picks in profiles:
        w = {s.weight: database.weight(s.name, int(j)) for s, j in zip(sites, picks)}
        path = prep.static_copy(write_weights(prep.model, w), label.replace(" ", "_"))
        measured = prep.runtime.compare(str(prep.dense_static()), str(path), batch_size=prep.batch_size,
                                        feeds=feeds).speedup
        rows.append({"profile": label, "picks": picks, "measured": measured,
                     "sparsity": float((np.array(levels)[picks] * n_w).sum() / n_w.sum())})
        print(f"  {label}: measured {measured:.3f}x", flush=True)
    return rows


def report(levels, runs, names, rows):
    factors, other = slowness(runs, names)
    passes = sorted({r["repeat"] for r in runs})
    print("\n| level | " + " | ".join(f"sites r{k} | other r{k} | slowness r{k}" for k in passes) + " |")
    print("|---|" + "---|---|---|" * len(passes))
    for lvl in levels:
        idx = [i for i, r in enumerate(runs) if r["level"] == lvl]
        cells = " | ".join(f"{sum(runs[i]['sites'][n] for n in names):.2f} | {other[i]:.2f} | {factors[i]:.2f}"
                           for i in idx)
        print(f"| {lvl:.3f} | {cells} |")
    print("\nmeasured / predicted by each pass's own table (raw | divided by the slowness factors):")
    print("\n| profile | sparsity | measured | " + " | ".join(f"r{k} raw | r{k} divided" for k in passes) + " |")
    print("|---|---|---|" + "---|---|" * len(passes))
    ratios = {"raw": [], "divided": []}
    for k in passes:
        idx = [i for i, r in enumerate(runs) if r["repeat"] == k]
        pass_runs = [runs[i] for i in idx]
        for kind, f in (("raw", [1.0] * len(idx)), ("divided", [factors[i] for i in idx])):
            table = pass_table(pass_runs, names, levels, f)
            ratios[kind].append([row["measured"] / predicted(table, row["picks"]) for row in rows])
    for n, row in enumerate(rows):
        cells = " | ".join(f"{ratios['raw'][k][n]:.3f} | {ratios['divided'][k][n]:.3f}" for k in range(len(passes)))
        print(f"| {row['profile']} | {100 * row['sparsity']:.0f}% | {row['measured']:.3f}x | {cells} |")
    print()
    for kind in ("raw", "divided"):
        logs = np.log(np.array(ratios[kind]))
        print(f"{kind:8s}: measured / predicted {np.exp(logs.min()):.3f}-{np.exp(logs.max()):.3f}; sd of its log "
              f"within a pass {logs.std(axis=1).mean():.3f}, across passes per profile {logs.std(axis=0).mean():.3f}")


def combined_table(runs, names, levels):
    """(site times, dense total, fixed time) from these runs together, as profiling builds it: slowness
    gauged over all of them at once, medians per level."""
    factors = slowness_factors([r["level"] for r in runs], [r["total"] for r in runs],
                               [sum(r["sites"][n] for n in names) for r in runs],
                               fused=any(r.get("fused") for r in runs))
    return pass_table(runs, names, levels, factors)


def combine_report(levels, runs, names, rows):
    """Is a second pass worth its time? For every pass, the table of that pass alone, of that pass with
    the dense model run once more (the next pass's dense run: what profiling does by default), and of that
    pass with the whole next pass, each against the profiles measured end to end."""
    passes = sorted({r["repeat"] for r in runs})
    variants = {"one pass": [], "one pass + dense again": [], "two passes": []}
    for k in passes:
        nxt = passes[(passes.index(k) + 1) % len(passes)]
        own = [r for r in runs if r["repeat"] == k]
        dense_next = [r for r in runs if r["repeat"] == nxt and r["level"] == 0.0]
        whole_next = [r for r in runs if r["repeat"] == nxt]
        for label, group in (("one pass", own), ("one pass + dense again", own + dense_next),
                             ("two passes", own + whole_next)):
            table = combined_table(group, names, levels)
            variants[label].append([row["measured"] / predicted(table, row["picks"]) for row in rows])
    print("\nmeasured / predicted, per table kind (one table per starting pass; the next pass wraps around):")
    print("\n| table | measured / predicted, range | sd of its log within a table | mean abs log | mean log |")
    print("|---|---|---|---|---|")
    out = {}
    for label, ratios in variants.items():
        logs = np.log(np.array(ratios))
        out[label] = {"ratios": ratios, "sd_within": float(logs.std(axis=1).mean()),
                      "mean_abs_log": float(np.abs(logs).mean()), "mean_log": float(logs.mean())}
        print(f"| {label} | {np.exp(logs.min()):.3f}-{np.exp(logs.max()):.3f} | {logs.std(axis=1).mean():.3f} | "
              f"{np.abs(logs).mean():.3f} | {logs.mean():+.3f} |")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--aims", default="1.5,2,2.5", help="aims of the DP profiles measured end to end")
    p.add_argument("--out", default=None, help="also write every run and measurement as JSON")
    p.add_argument("--replay", default=None, help="an earlier --out file: report it again, no engine")
    p.add_argument("--combine", action="store_true",
                   help="also compare tables of one pass, one pass with a second dense run, and two passes")
    args = p.parse_args(argv)

    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS,
                        progress=False)
    t0 = time.perf_counter()
    if args.replay:
        with open(args.replay) as fh:
            saved = json.load(fh)
        levels, runs, rows = saved["levels"], saved["runs"], saved["profiles"]
        names = [s.name for s in prep.sites if all(s.name in r["sites"] for r in runs)]
        print(f"replaying {args.replay}: {len(levels)} levels x {len({r['repeat'] for r in runs})} passes, "
              f"{len(rows)} profiles measured then")
    else:
        levels = prep.runtime.default_levels()
        feeds = modelio.example_inputs(prep.specs)
        print(f"profiling {args.model}: {len(levels)} levels x {args.repeats} repeats", flush=True)
        runs = profile_runs(prep, levels, args.repeats, feeds)
        names = [s.name for s in prep.sites if all(s.name in r["sites"] for r in runs)]
        print(f"profiled in {time.perf_counter() - t0:.0f} s; {len(names)} sites", flush=True)
        factors, _ = slowness(runs, names)
        first = [i for i, r in enumerate(runs) if r["repeat"] == 0]
        tables = [pass_table([runs[i] for i in first], names, levels, [f(i) for i in first])
                  for f in (lambda i: 1.0, lambda i: factors[i])]
        profiles = solve_profiles(prep, names, levels, *tables, [float(a) for a in args.aims.split(",")])
        rows = measure_profiles(prep, names, levels, profiles, feeds)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"levels": levels, "runs": runs, "profiles": rows}, fh, indent=1)
    report(levels, runs, names, rows)
    if args.combine:
        combine_report(levels, runs, names, rows)
    where = ("a replay: no engine ran; the runs and measurements are the file's" if args.replay
             else f"DeepSparse, {prep.runtime.fingerprint().get('cpu')}")
    print(f"\nmodel {os.path.basename(args.model)} | batch {args.batch_size} | cores {args.cores} | "
          f"{where} | {time.perf_counter() - t0:.0f} s")
    prep.close()


if __name__ == "__main__":
    main()
