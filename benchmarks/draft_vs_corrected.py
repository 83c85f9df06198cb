"""Does a corrected file run slower than its draft?

Why: `optimize` searches on "drafts" (the database's weights) and then corrects the kept profile's
weights; the correction changes values, never which weights are zero. Yet in the tool-time and accuracy
runs the corrected file measured a median 1% slower than its draft, sometimes 3.5%, and a corrected
file that misses costs a second correction. Two explanations: the engine really runs the corrected
values slower, or the kept draft was the lucky one of several measured (the kept draft is the one that
met the requirement, so its noise was kind) and the corrected file's one measurement is not selected.

This writes one profile's draft as `optimize --correct-epochs 0` would (the `table` runtime: no aim
search), corrects its weights with the global correction `optimize` runs (its defaults, without the
time limit), checks that the two files have the same zeros, then measures, in one process, on fresh
compiles each time, alternating the order: dense against the draft, dense against the corrected file,
and the draft against the corrected file directly. No measurement is selected, so a gap that remains
is the engine's.

    spdy-onnx profile out/minilm-l6.onnx --cores 1 -o minilm.table.json
    python benchmarks/draft_vs_corrected.py --model out/minilm-l6.onnx --data out/minilm_calib.npz \
        --latency-table minilm.table.json --speedup 2 --cores 1 --compiles 6 --keep dvc2

With `--reuse` it measures the files an earlier run left in `--keep`; `--pairs dense/dense,draft/draft`
times each file against itself, which shows one compile's spread.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from spdy_onnx import api, correct, graph, modelio  # noqa: E402
from spdy_onnx.calibrate import load_data  # noqa: E402
from spdy_onnx.passes.prune import write_weights  # noqa: E402
from spdy_onnx.runtimes.deepsparse import cpu_name  # noqa: E402


def same_zeros(a: onnx.ModelProto, b: onnx.ModelProto) -> tuple[int, int]:
    """(sites whose zero patterns differ, sites compared) between two files written from one model."""
    sites, _ = graph.find_sites(a)
    wa, wb = graph.read_weights(a, sites), graph.read_weights(b, sites)
    differ = sum(1 for s in sites if not np.array_equal(wa[s.name] == 0, wb[s.name] == 0))
    return differ, len(sites)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the dense ONNX file")
    p.add_argument("--data", required=True, help="calibration .npz (optimize's --data)")
    p.add_argument("--latency-table", required=True, help="a table from `spdy-onnx profile` for this model")
    p.add_argument("--speedup", type=float, default=2.0, help="the profile's predicted speedup")
    p.add_argument("--strategy", default="spdy")
    p.add_argument("--search-budget", default="300",
                   help="evaluations (a number keeps the profile independent of the machine's speed)")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--compiles", type=int, default=6, help="fresh-compile measurements of each pair")
    p.add_argument("--cache-dir", default=None, help="spdy-onnx cache (database, dense outputs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, default=None, help="write the two files here instead of a temporary folder")
    p.add_argument("--pairs", default="dense/draft,dense/corrected,draft/corrected",
                   help="baseline/candidate pairs to measure; a file against itself (dense/dense) shows its own "
                        "compile-to-compile spread")
    p.add_argument("--reuse", action="store_true",
                   help="measure the two files already in --keep (from an earlier run) instead of writing them")
    p.add_argument("--out", type=Path, default=None, help="also write every measurement as JSON")
    args = p.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="spdy-draft-corrected-"))
    work.mkdir(parents=True, exist_ok=True)
    common = dict(target=args.speedup, margin=0.0, runtime="table", latency_table=args.latency_table,
                  data=args.data, strategy=args.strategy, batch_size=args.batch_size,
                  search_budget=args.search_budget, cache_dir=args.cache_dir, seed=args.seed, progress=False)
    files = {"draft": work / "draft.onnx", "corrected": work / "corrected.onnx"}
    pairs = {pair: tuple(pair.split("/")) for pair in args.pairs.split(",")}
    if any(len(v) != 2 or not set(v) <= {"dense", *files} for v in pairs.values()):
        raise SystemExit(f"--pairs: each is two of dense, draft, corrected joined by '/', got {args.pairs}")
    if args.reuse:
        if not (args.keep and all(f.exists() for f in files.values())):
            raise SystemExit("--reuse needs --keep with draft.onnx and corrected.onnx in it")
        report = json.loads(files["draft"].with_name("draft.report.json").read_text())
    else:
        report = api.optimize(args.model, output=files["draft"], correct_epochs=0, **common)
    prep = api.Prepared(args.model, runtime="deepsparse", batch_size=args.batch_size, cores=args.cores,
                        input_shapes=None, exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS,
                        progress=False)
    draft_model = onnx.load(str(files["draft"]))
    summary = {}
    if not args.reuse:
        sites, _ = graph.find_sites(draft_model)
        weights = graph.read_weights(draft_model, sites)
        draft = {s.weight: weights[s.name] for s in sites if (weights[s.name] == 0).any()}
        tuned, summary = correct.global_correction(prep.calibration_model, sites, draft,
                                                   load_data(args.data, prep.specs),
                                                   loss=report["quality"].get("loss", "mse"),
                                                   batch_size=prep.batch_size, max_seconds=None, seed=args.seed)
        modelio.save_model_atomic(write_weights(draft_model, tuned), files["corrected"])
    differ, n_sites = same_zeros(draft_model, onnx.load(str(files["corrected"])))
    if differ:
        raise SystemExit(f"the corrected file has different zeros at {differ} of {n_sites} sites")
    print(f"one profile, {n_sites} sites, the same zeros in both files; predicted {report['predicted_speedup']:.3f}x, "
          f"sparsity {report['weighted_mean_sparsity']:.1%}; correction: held-back loss "
          f"{summary.get('loss_before')} -> {summary.get('loss_after')} (epoch kept {summary.get('best_epoch')})",
          flush=True)
    speedups: dict[str, list[float]] = {k: [] for k in pairs}
    medians_ms: dict[str, list[tuple[float, float]]] = {k: [] for k in pairs}   # (baseline, candidate) per compile
    try:
        static = {"dense": prep.dense_static(),
                  **{k: prep.static_copy(onnx.load(str(f)), k) for k, f in files.items()}}
        feeds = modelio.example_inputs(prep.specs)
        for c in range(args.compiles):
            for name in (pairs if c % 2 == 0 else list(pairs)[::-1]):
                base, cand = pairs[name]
                comparison = prep.runtime.compare(str(static[base]), str(static[cand]), batch_size=prep.batch_size,
                                                  feeds=feeds)
                speedups[name].append(comparison.speedup)
                medians_ms[name].append((comparison.baseline_ms, comparison.candidate_ms))
                print(f"compile {c + 1} {name}: {comparison.speedup:.3f}x ({comparison.baseline_ms:.2f} ms / "
                      f"{comparison.candidate_ms:.2f} ms, load {comparison.foreign_load_cores:.1f} cores)", flush=True)
        rounds = prep.runtime.rounds
    finally:
        prep.close()

    print(f"\nmodel {Path(args.model).name} | {args.strategy} profile predicted {args.speedup:g}x | DeepSparse, "
          f"{cpu_name()}, {args.cores} core(s), batch {prep.batch_size} | {args.compiles} fresh compiles of each pair, {rounds} "
          f"interleaved rounds each, order alternating")
    print("| pair (baseline / candidate) | per compile | median | geometric mean | max / min |\n|---|---|---|---|---|")
    for name, s in speedups.items():
        s = np.array(s)
        print(f"| {name} | {', '.join(f'{v:.3f}' for v in s)} | {np.median(s):.3f}x | "
              f"{np.exp(np.log(s).mean()):.3f}x | {s.max() / s.min():.3f} |")
    if {"dense/draft", "dense/corrected"} <= set(speedups):
        a, b = np.log(speedups["dense/draft"]), np.log(speedups["dense/corrected"])
        print(f"\ncorrected against draft, from the dense pairs: {np.exp(b.mean() - a.mean()):.3f} "
              f"(1 = same speed; under 1 = the corrected file is slower)")
    if args.out:
        args.out.write_text(json.dumps({"speedups": speedups, "medians_ms": medians_ms,
                                        "args": {k: str(v) for k, v in vars(args).items()},
                                        "sparsity": report["weighted_mean_sparsity"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
