"""Is the probe's verdict between two profiles a property of the embeddings, or of the probe?

MiniLM-L6's task metric is a logistic-regression probe fitted once on dense embeddings, with sklearn's
default regularisation (C = 1). `benchmarks/probe_oracle.py` found uniform's 2x profile 1.5 points ahead
of SPDY's at the same predicted speed on that probe. This script scores the same profiles' database
weights (no correction) on the held-out sentences with probes fitted on the same dense embeddings at
several strengths of regularisation, each a reasonable probe of the same features, and reports every
profile's accuracy and its gap to the baselines of its speed (exact McNemar p). A gap that keeps its
sign across the probes is the embeddings'; one that flips belongs to the probe.

    python benchmarks/probe_sensitivity.py --models-dir out --table benchmarks/results/minilm_epyc_s30.table.json \\
        --cache-dir cache --profiles uniform@2.161,spdy@2.161,spdy@2.000,probe-logit@2.000,global-magnitude@2.004,\\
spdy-band@2.161,uniform@1.689,spdy@1.500,global-magnitude@1.519 benchmarks/results/loss_validity_minilm.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api, graph, strategies  # noqa: E402
from spdy_onnx.tables import LatencyTable, write_json_atomic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import load_npz  # noqa: E402
from loss_validity import read_profiles, speed_class  # noqa: E402
from probe_oracle import Embedder, mcnemar_exact  # noqa: E402

BASELINES = ("uniform", "global-magnitude")


def read_named(paths: list[str]) -> list[dict]:
    """Profiles from probe_oracle.py result files, or the saved profiles of a loss_validity.py run."""
    out = []
    for path in paths:
        saved = json.loads(Path(path).read_text())
        out += saved["profiles"] if "profiles" in saved else read_profiles([path])
    return out


def baseline_gaps(right: dict[str, np.ndarray], profiles: list[dict]) -> dict[str, dict]:
    """{profile: {baseline: (gap in points, exact McNemar p)}} against the baselines of its speed class."""
    out = {}
    for prof in profiles:
        mine = right[prof["name"]]
        for other in profiles:
            base = other["name"].split("@")[0]
            if base in BASELINES and other is not prof and speed_class(other["predicted"]) == speed_class(prof["predicted"]):
                _, _, p = mcnemar_exact(mine, right[other["name"]])
                out.setdefault(prof["name"], {})[other["name"]] = (100 * (mine.mean() - right[other["name"]].mean()), p)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="probe_oracle.py result files or a loss_validity.py --out file")
    p.add_argument("--models-dir", required=True, type=Path)
    p.add_argument("--table", required=True, help="the latency table those runs used")
    p.add_argument("--cache-dir", default=None, help="the cache folder those runs used (the OBS database)")
    p.add_argument("--profiles", required=True, help="comma-separated profile names (as loss_validity.py prints them)")
    p.add_argument("--C", default="0.01,0.1,1,10,100", help="the probes' inverse regularisation strengths")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from sklearn.linear_model import LogisticRegression

    t_start = time.perf_counter()
    d = args.models_dir
    wanted = [n.strip() for n in args.profiles.split(",") if n.strip()]
    known = {x["name"]: x for x in read_named(args.results)}
    missing = [n for n in wanted if n not in known]
    if missing:
        raise SystemExit(f"no profile named {', '.join(missing)} in the result files")
    profiles = [known[n] for n in wanted]
    prep = api.Prepared(d / "minilm-l6.onnx", runtime="table", batch_size=1, cores=1, input_shapes=None,
                        exclude=None, include=None, min_weights=graph.DEFAULT_MIN_WEIGHTS, progress=False)
    table = LatencyTable.load(args.table)
    sites = [s for s in prep.sites if s.name in table.times]
    base = strategies.make_chooser("uniform", prep=prep, sites=sites, table=table, data=str(d / "minilm_calib.npz"),
                                   samples=None, reconstruct="obs", loss="auto", search_budget="10s", seed=0,
                                   cache_dir=args.cache_dir, progress=False)
    heldout = load_npz(d / "minilm_heldout.npz")
    labels = heldout.pop("labels")
    test_set = Embedder(prep, sites, base.database, heldout)
    train = load_npz(d / "minilm_probe_train.npz")
    train_labels = train.pop("labels")
    cached = Path(args.cache_dir or ".") / f"probe_oracle_train_dense_{prep.digest[:16]}.npy"
    train_dense = np.load(cached) if cached.exists() else Embedder(prep, sites, base.database, train).dense
    embeddings = {"dense": test_set.dense}
    for prof in profiles:
        embeddings[prof["name"]] = test_set.embeddings(base.evaluator.weights_of(prof["picks"]))
        print(f"  {prof['name']}: embedded ({time.perf_counter() - t_start:.0f} s)", flush=True)
    prep.close()

    strengths = [float(c) for c in args.C.split(",")]
    accuracy: dict[str, dict[str, float]] = {}
    gaps: dict[str, dict] = {}
    for c in strengths:
        probe = LogisticRegression(C=c, max_iter=10000, random_state=0).fit(train_dense, train_labels)
        right = {name: probe.predict(e) == labels for name, e in embeddings.items()}
        accuracy[f"{c:g}"] = {name: float(r.mean()) for name, r in right.items()}
        gaps[f"{c:g}"] = baseline_gaps(right, profiles)

    print(f"\nmodel minilm-l6.onnx | batch 1 | 128 tokens | table {Path(args.table).name} | OBS database weights, "
          f"no correction | logistic-regression probes fitted on {len(train_labels)} dense probe-train embeddings | "
          f"scored on {len(labels)} held-out sentences")
    print("| profile | predicted | " + " | ".join(f"C = {c:g}" for c in strengths) + " |")
    print("|---|---|" + "---|" * len(strengths))
    print("| dense | - | " + " | ".join(f"{accuracy[f'{c:g}']['dense']:.1%}" for c in strengths) + " |")
    for prof in sorted(profiles, key=lambda x: x["predicted"]):
        print(f"| {prof['name']} | {prof['predicted']:.3f}x | "
              + " | ".join(f"{accuracy[f'{c:g}'][prof['name']]:.1%}" for c in strengths) + " |")
    print("\nGap to the baselines of the same predicted speed, points (exact McNemar p)")
    print("| profile | baseline | " + " | ".join(f"C = {c:g}" for c in strengths) + " |")
    print("|---|---|" + "---|" * len(strengths))
    for prof in sorted(profiles, key=lambda x: x["predicted"]):
        for other in gaps[f"{strengths[0]:g}"].get(prof["name"], {}):
            cells = [gaps[f"{c:g}"][prof["name"]][other] for c in strengths]
            print(f"| {prof['name']} | {other} | " + " | ".join(f"{g:+.1f} ({pv:.2g})" for g, pv in cells) + " |")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        write_json_atomic(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "accuracy": accuracy,
                                     "gaps": {c: {n: {o: list(v) for o, v in g.items()} for n, g in per.items()}
                                              for c, per in gaps.items()}})


if __name__ == "__main__":
    main()
