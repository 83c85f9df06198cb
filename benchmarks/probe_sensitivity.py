"""Is the probe's verdict between two profiles a property of the embeddings, or of the probe?

MiniLM-L6's task metric is a logistic-regression probe fitted once on dense embeddings, with sklearn's
default regularisation (C = 1). `benchmarks/probe_oracle.py` found uniform's 2x profile 1.5 points ahead
of SPDY's at the same predicted speed on that probe. This script scores the same profiles' database
weights (no correction) on the held-out sentences with probes fitted on the same dense embeddings at
several strengths of regularisation, each a reasonable probe of the same features, and reports every
profile's accuracy and its gap to the baselines of its speed (exact McNemar p). A gap that keeps its
sign across the probes is the embeddings'; one that flips belongs to the probe.

With --files it scores files `optimize` wrote instead (the accuracy benchmark's --keep-models, named
MODEL.STRATEGY.TARGET.onnx: corrected and measured), on DeepSparse as the accuracy benchmark does, each
compared with the baselines of its target.

    python benchmarks/probe_sensitivity.py --models-dir out --table benchmarks/results/minilm_epyc_s30.table.json \\
        --cache-dir cache --profiles uniform@2.161,spdy@2.161,spdy@2.000,probe-logit@2.000,global-magnitude@2.004,\\
spdy-band@2.161,uniform@1.689,spdy@1.689,spdy@1.500,global-magnitude@1.519 benchmarks/results/loss_validity_minilm.json
    python benchmarks/probe_sensitivity.py --models-dir out --cache-dir cache --files kept/minilm.*.2x.onnx
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

from spdy_onnx.tables import write_json_atomic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import load_npz  # noqa: E402
from loss_validity import open_database, read_profiles, speed_class  # noqa: E402
from probe_oracle import Embedder, dense_train_embeddings, mcnemar_exact  # noqa: E402

BASELINES = ("uniform", "global-magnitude")


def read_named(paths: list[str]) -> list[dict]:
    """Profiles from probe_oracle.py result files, or the saved profiles of a loss_validity.py run."""
    out = []
    for path in paths:
        saved = json.loads(Path(path).read_text())
        out += saved["profiles"] if "profiles" in saved else read_profiles([path])
    return out


def baseline_gaps(right: dict[str, np.ndarray], items: list[dict]) -> dict[str, dict]:
    """{item: {baseline: (gap in points, exact McNemar p)}} against the baselines of its group (a speed class
    for profiles, the target for files); items carry name, strategy and group."""
    out = {}
    for item in items:
        mine = right[item["name"]]
        for other in items:
            if other["strategy"] in BASELINES and other is not item and other["group"] == item["group"]:
                _, _, p = mcnemar_exact(mine, right[other["name"]])
                out.setdefault(item["name"], {})[other["name"]] = (100 * (mine.mean() - right[other["name"]].mean()), p)
    return out


def file_item(path: Path) -> dict:
    """MODEL.STRATEGY.TARGET.onnx (the accuracy benchmark's --keep-models names) as a scored item."""
    parts = path.name[:-len(".onnx")].split(".", 2) if path.name.endswith(".onnx") else []
    if len(parts) != 3:
        raise SystemExit(f"{path}: expected a name like minilm.spdy.2x.onnx (accuracy.py --keep-models)")
    return {"name": path.name[:-len(".onnx")], "strategy": parts[1], "group": parts[2], "path": path}


def profile_item(prof: dict) -> dict:
    return {**prof, "strategy": prof["name"].split("@")[0], "group": speed_class(prof["predicted"])}


def profile_embeddings(args, items: list[dict]) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, str]:
    """Held-out embeddings of dense and of each profile's database weights (onnxruntime, weights as inputs)."""
    d = args.models_dir
    prep, sites, base = open_database(d, args.table, args.cache_dir)
    heldout = load_npz(d / "minilm_heldout.npz")
    labels = heldout.pop("labels")
    test_set = Embedder(prep, sites, base.database, heldout)
    train = load_npz(d / "minilm_probe_train.npz")
    train_labels = train.pop("labels")
    train_dense = dense_train_embeddings(prep, sites, base.database, train, args.cache_dir)
    embeddings = {"dense": test_set.dense}
    for item in items:
        embeddings[item["name"]] = test_set.embeddings(base.evaluator.weights_of(item["picks"]))
        print(f"  {item['name']}: embedded", flush=True)
    prep.close()
    return embeddings, labels, train_dense, train_labels, (
        f"table {Path(args.table).name} | OBS database weights, no correction, onnxruntime")


def file_embeddings(args, items: list[dict]) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, str]:
    """Held-out embeddings of dense and of each file on DeepSparse, as the accuracy benchmark scores them
    (its cache of dense embeddings is reused when --cache-dir is the one it ran with)."""
    import tempfile

    from accuracy import Runner, cached_outputs, embed
    d = args.models_dir
    dense = d / "minilm-l6.onnx"
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="spdy-probe-")) / "accuracy"
    heldout_path, train_path = d / "minilm_heldout.npz", d / "minilm_probe_train.npz"
    heldout = load_npz(heldout_path)
    labels = heldout.pop("labels")
    train = load_npz(train_path)
    train_labels = train.pop("labels")
    runner = Runner(dense, engine="deepsparse", cores=args.cores)
    train_dense = cached_outputs(cache, "minilm-probe-train", dense, train_path, len(train_labels), "deepsparse",
                                 lambda: runner.outputs(train, embed))
    embeddings = {"dense": cached_outputs(cache, "minilm-heldout", dense, heldout_path, len(labels), "deepsparse",
                                          lambda: runner.outputs(heldout, embed))}
    del runner
    for item in items:
        embeddings[item["name"]] = Runner(item["path"], engine="deepsparse", cores=args.cores).outputs(heldout, embed)
        print(f"  {item['name']}: embedded", flush=True)
    return embeddings, labels, train_dense, train_labels, (
        f"files optimize wrote ({', '.join(i['path'].name for i in items)}) | DeepSparse on {args.cores} core(s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", help="probe_oracle.py result files or a loss_validity.py --out file")
    p.add_argument("--models-dir", required=True, type=Path)
    p.add_argument("--table", help="the latency table those runs used (profiles)")
    p.add_argument("--cache-dir", default=None, help="the cache folder those runs used (the OBS database, dense embeddings)")
    p.add_argument("--profiles", default=None, help="comma-separated profile names (as loss_validity.py prints them)")
    p.add_argument("--files", nargs="+", type=Path, default=None,
                   help="instead of profiles: files the accuracy benchmark kept (MODEL.STRATEGY.TARGET.onnx)")
    p.add_argument("--cores", type=int, default=1, help="DeepSparse cores for --files")
    p.add_argument("--C", default="0.01,0.1,1,10,100", help="the probes' inverse regularisation strengths")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from sklearn.linear_model import LogisticRegression

    t_start = time.perf_counter()
    if args.files:
        items = [file_item(f) for f in args.files]
        embeddings, labels, train_dense, train_labels, source = file_embeddings(args, items)
    else:
        if not (args.profiles and args.results and args.table):
            p.error("give --files, or --profiles with probe_oracle.py / loss_validity.py result files and --table")
        wanted = [n.strip() for n in args.profiles.split(",") if n.strip()]
        known = {x["name"]: x for x in read_named(args.results)}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise SystemExit(f"no profile named {', '.join(missing)} in the result files")
        items = [profile_item(known[n]) for n in wanted]
        embeddings, labels, train_dense, train_labels, source = profile_embeddings(args, items)

    strengths = [float(c) for c in args.C.split(",")]
    accuracy: dict[str, dict[str, float]] = {}
    gaps: dict[str, dict] = {}
    for c in strengths:
        probe = LogisticRegression(C=c, max_iter=10000, random_state=0).fit(train_dense, train_labels)
        right = {name: probe.predict(e) == labels for name, e in embeddings.items()}
        accuracy[f"{c:g}"] = {name: float(r.mean()) for name, r in right.items()}
        gaps[f"{c:g}"] = baseline_gaps(right, items)

    def order(item):
        return (item["group"], item.get("predicted", 0.0), item["name"])

    print(f"\nmodel minilm-l6.onnx | batch 1 | 128 tokens | {source} | logistic-regression probes fitted on "
          f"{len(train_labels)} dense probe-train embeddings | scored on {len(labels)} held-out sentences")
    print("| model | group | " + " | ".join(f"C = {c:g}" for c in strengths) + " |")
    print("|---|---|" + "---|" * len(strengths))
    print("| dense | - | " + " | ".join(f"{accuracy[f'{c:g}']['dense']:.1%}" for c in strengths) + " |")
    for item in sorted(items, key=order):
        print(f"| {item['name']} | {item['group']} | "
              + " | ".join(f"{accuracy[f'{c:g}'][item['name']]:.1%}" for c in strengths) + " |")
    print("\nGap to the baselines of the same group (predicted speed class, or target), points (exact McNemar p)")
    print("| model | baseline | " + " | ".join(f"C = {c:g}" for c in strengths) + " |")
    print("|---|---|" + "---|" * len(strengths))
    for item in sorted(items, key=order):
        for other in gaps[f"{strengths[0]:g}"].get(item["name"], {}):
            cells = [gaps[f"{c:g}"][item["name"]][other] for c in strengths]
            print(f"| {item['name']} | {other} | " + " | ".join(f"{g:+.1f} ({pv:.2g})" for g, pv in cells) + " |")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        write_json_atomic(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "accuracy": accuracy,
                                     "gaps": {c: {n: {o: list(v) for o, v in g.items()} for n, g in per.items()}
                                              for c, per in gaps.items()}})


if __name__ == "__main__":
    main()
