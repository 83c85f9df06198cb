"""Accuracy benchmark (issue #3): what does each strategy cost in accuracy at a measured speedup?

For each reference model, strategy and target speedup: the DeepSparse speedup measured end to end by
`optimize` itself (dense and pruned interleaved), the predicted speedup, the label-free calibration loss
(pruned vs dense outputs), the task metric(s), and the wall time of `optimize` and of each of its phases
(`phases_s` of the report). A dense reference row comes first.

- MiniLM-L6: linear-probe accuracy on held-out Rotten Tomatoes sentences (a seeded logistic regression,
  C=1, fitted ONCE on the dense model's embeddings of minilm_probe_train.npz), and the mean cosine between
  pruned and dense held-out embeddings. Embedding = mean of last_hidden_state over attention_mask, then
  L2-normalised. Also the probe's agreement with its dense predictions and the mean squared change of
  its logit: what the probe reads, without the noise of the labels. With --crossfit-folds K, the probe's
  accuracy also over every sentence the pruning never saw (7,506 with models/'s default data, against
  2,530 held-out), each scored by one of K probes fitted on the dense embeddings of the other folds.
- MobileNetV2: top-1 on the 20 labelled images, and top-1 agreement with dense on the held-out photos.

The latency table of each model is measured once (`api.profile`) and passed to every `optimize` call, so
all strategies see the same table; they also share the reconstruction database through --cache-dir (the
first strategy of a model pays for building it: see `calib s`). Dense embeddings of the probe-train and
held-out sets are cached in --cache-dir/accuracy/ as .npy, keyed by the hashes of the model and data files.
The task metrics are computed with DeepSparse on --cores cores by default: here it is faster than
onnxruntime (MiniLM, 1 core: 17 ms dense and 10 ms at 1.5x per sentence, against 21-22 ms for onnxruntime
whatever the sparsity) and their embeddings agree to a cosine of 0.9999999. `--engine onnxruntime` is
the alternative. The speedups are always DeepSparse's, measured by `optimize`.

Run it on a quiet machine; it is not a test. The full run:

    python benchmarks/accuracy.py --models-dir /work/models_out --targets 1.5,2,2.5 \
        --strategies spdy,uniform,global-magnitude,dp-loss --cores 1 \
        --cache-dir ~/.cache/spdy-onnx --out accuracy.json --markdown accuracy.md

A quick check (a few minutes):

    python benchmarks/accuracy.py --models-dir /work/models_out --model mobilenetv2 --targets 1.5 \
        --strategies uniform --search-budget 20 --out /tmp/acc.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from spdy_onnx import api  # noqa: E402
from spdy_onnx.errors import InfeasibleTarget, SpdyError, TargetMissed  # noqa: E402
from spdy_onnx.tables import write_json_atomic  # noqa: E402

log = logging.getLogger("accuracy")

MODELS = {
    "minilm": {"onnx": "minilm-l6.onnx", "calib": "minilm_calib.npz", "title": "MiniLM-L6 (all-MiniLM-L6-v2)",
               "batch": 1},
    # at batch 1 DeepSparse runs a sparse MobileNetV2 no faster than the dense one (uniform 75%: 0.78x,
    # 90%: 1.01x measured); at batch 16 sparsity pays (1.31x and 1.59x)
    "mobilenetv2": {"onnx": "mobilenetv2.onnx", "calib": "mobilenetv2_calib.npz",
                    "title": "MobileNetV2 (ImageNet-1k)", "batch": 16},
    # the same weights as torch.onnx.export's default (dynamo) exporter writes them
    # (models/export_minilm_dynamo.py): pruned from that file, scored against the legacy export's dense
    # model (the same function; DeepSparse cannot load the dynamo file itself, only the file written from it)
    "minilm-dynamo": {"onnx": "minilm-l6.dynamo.onnx", "dense": "minilm-l6.onnx", "task": "minilm",
                      "calib": "minilm_calib.npz", "title": "MiniLM-L6, torch's default (dynamo) export", "batch": 1},
}
DEFAULT_STRATEGIES = "spdy,uniform,global-magnitude,dp-loss"


# ----------------------------------------------------------------------------------------------------------
# Running a model over samples (batch 1, static shapes)

class Runner:
    """One model on one engine; `outputs(feeds, reduce)` runs every sample and returns the reduced rows."""

    def __init__(self, path, *, engine: str, cores: int):
        self.engine_name = engine
        import onnx
        model = onnx.load(str(path), load_external_data=False)
        init = {i.name for i in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in init]
        self.output_name = model.graph.output[0].name
        del model
        if engine == "onnxruntime":
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.intra_op_num_threads = cores
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        elif engine == "deepsparse":
            from deepsparse import Engine
            self._engine = Engine(model=str(path), batch_size=1, num_cores=cores)
        else:
            raise SystemExit(f"unknown engine '{engine}'")

    def _run(self, sample: dict) -> np.ndarray:
        if self.engine_name == "onnxruntime":
            return self._sess.run([self.output_name], sample)[0]
        return self._engine.run([np.ascontiguousarray(sample[n]) for n in self.input_names])[0]

    def outputs(self, data: dict, reduce) -> np.ndarray:
        n = len(next(iter(data.values())))
        rows = []
        for i in range(n):
            sample = {k: data[k][i:i + 1] for k in self.input_names}
            rows.append(reduce(self._run(sample), sample))
        return np.stack(rows)


def engine_version(engine: str) -> str:
    if engine == "onnxruntime":
        import onnxruntime
        return f"onnxruntime {onnxruntime.__version__}"
    import deepsparse
    return f"deepsparse {deepsparse.__version__}"


def file_hash(path, _memo={}) -> str:
    path = str(Path(path).resolve())
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _memo[key] = h.hexdigest()
    return _memo[key]


def cached_outputs(cache: Path, tag: str, model_path, data_path, n: int, engine: str, compute) -> np.ndarray:
    """Dense outputs, cached as .npy keyed by the model and data file hashes, the sample count and engine."""
    key = hashlib.sha256(json.dumps([tag, file_hash(model_path), file_hash(data_path), n,
                                     engine_version(engine)]).encode()).hexdigest()[:32]
    path = cache / f"{tag}-{key}.npy"
    if path.exists():
        try:
            arr = np.load(path)
            if len(arr) == n:
                log.info("dense %s from cache %s", tag, path)
                return arr
        except (OSError, ValueError):
            pass
        path.unlink(missing_ok=True)
    arr = compute()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


def load_npz(path, limit=None) -> dict:
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    if limit:
        data = {k: v[:limit] for k, v in data.items()}
    return data


# ----------------------------------------------------------------------------------------------------------
# Task metrics

CROSSFIT_METRICS = [("probe acc, cross-fit", "probe_acc_cf", "pct"),
                    ("probe logit MSE, cross-fit", "probe_logit_mse_cf", "f4")]


class MiniLMTask:
    """Linear-probe accuracy on held-out sentences, and cosine of pruned to dense embeddings. Also what
    the probe itself reads, against the dense model: agreement of its predictions, and the mean squared
    change of its logit. Accuracy against labels flips on sentences near the boundary both ways; these
    two say how far the probe's output moved, with much less noise."""

    metrics = [("probe acc", "probe_acc", "pct"), ("cos to dense", "cos_mean", "f4"),
               ("probe agree w/ dense", "probe_agree", "pct"), ("probe logit MSE", "probe_logit_mse", "f4")]

    def __init__(self, models_dir: Path, dense: Path, *, engine, cores, cache: Path, heldout: int | None, seed,
                 crossfit: int = 0):
        from sklearn.linear_model import LogisticRegression

        self.engine, self.cores = engine, cores
        self.heldout_path = models_dir / "minilm_heldout.npz"
        train_path = models_dir / "minilm_probe_train.npz"
        self.heldout = load_npz(self.heldout_path, heldout)
        self.labels = self.heldout.pop("labels")
        train = load_npz(train_path)
        train_labels = train.pop("labels")
        self.phases: dict[str, float] = {}

        t0 = time.perf_counter()
        runner = Runner(dense, engine=engine, cores=cores)
        train_emb = cached_outputs(cache, "minilm-probe-train", dense, train_path, len(train_labels), engine,
                                   lambda: runner.outputs(train, embed))
        self.phases["dense_train_embeddings_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.dense_emb = cached_outputs(cache, "minilm-heldout", dense, self.heldout_path, len(self.labels), engine,
                                        lambda: runner.outputs(self.heldout, embed))
        self.phases["dense_heldout_embeddings_s"] = time.perf_counter() - t0
        del runner
        t0 = time.perf_counter()
        self.probe = LogisticRegression(C=1.0, max_iter=5000, random_state=seed)
        self.probe.fit(train_emb, train_labels)
        self.phases["probe_fit_s"] = time.perf_counter() - t0
        self.train_acc = float(self.probe.score(train_emb, train_labels))
        self.dense_logit = self.probe.decision_function(self.dense_emb)
        self.crossfit = None
        if crossfit:
            self._fit_crossfit(models_dir, train, train_labels, train_emb, crossfit, seed)
            self.metrics = self.metrics + CROSSFIT_METRICS
        self.dense_metrics = self._score(self.dense_emb, self.crossfit["dense_emb"] if self.crossfit else None)
        self.dense_metrics["probe_train_acc"] = self.train_acc

    def _fit_crossfit(self, models_dir, train, train_labels, train_emb, folds: int, seed: int) -> None:
        """K probes for a K-fold cross-fit over every sentence the pruning never saw: the held-out ones and
        the probe-train ones that are not calibration sentences (three times the held-out set, so a
        paired accuracy gap has about 0.6x the noise). Each probe is fitted on the dense embeddings of
        the calibration sentences and the other folds, and predicts only its own fold."""
        from sklearn.linear_model import LogisticRegression

        t0 = time.perf_counter()
        calib = load_npz(models_dir / "minilm_calib.npz")
        seen = {row.tobytes() for row in np.asarray(calib["input_ids"])}
        is_calib = np.array([row.tobytes() in seen for row in np.asarray(train["input_ids"])])
        self.extra = {k: v[~is_calib] for k, v in train.items()}
        dense_emb = np.concatenate([self.dense_emb, train_emb[~is_calib]])
        labels = np.concatenate([self.labels, train_labels[~is_calib]])
        fold = np.random.default_rng(seed).permutation(len(labels)) % folds
        logits = np.empty(len(labels))
        probes = []
        for k in range(folds):
            fit_x = np.concatenate([train_emb[is_calib], dense_emb[fold != k]])
            fit_y = np.concatenate([train_labels[is_calib], labels[fold != k]])
            probe = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit(fit_x, fit_y)
            logits[fold == k] = probe.decision_function(dense_emb[fold == k])
            probes.append(probe)
        self.crossfit = {"probes": probes, "fold": fold, "labels": labels, "dense_emb": dense_emb,
                         "dense_logit": logits}
        self.phases["crossfit_probes_s"] = time.perf_counter() - t0

    def describe(self) -> str:
        text = (f"probe: logistic regression fitted once on dense embeddings of minilm_probe_train.npz "
                f"(train acc {self.train_acc:.1%}); metrics on {len(self.labels)} held-out sentences, "
                f"{engine_version(self.engine)}")
        if self.crossfit is not None:
            text += (f"; cross-fit columns: {len(self.crossfit['probes'])} probes, each fitted on the dense embeddings "
                     f"of the other folds and the calibration sentences, over {len(self.crossfit['labels'])} "
                     "sentences the pruning never saw (the held-out ones and the non-calibration probe-train ones)")
        return text

    def _score(self, emb: np.ndarray, crossfit_emb: np.ndarray | None = None) -> dict:
        cos = np.sum(emb * self.dense_emb, axis=1) / (
            np.linalg.norm(emb, axis=1) * np.linalg.norm(self.dense_emb, axis=1) + 1e-12)
        right = self.probe.predict(emb) == self.labels
        logit = self.probe.decision_function(emb)
        logit_err = np.abs(logit - self.dense_logit)
        out = {"probe_acc": float(right.mean()), "probe_right": "".join("1" if r else "0" for r in right),
               "probe_agree": float(np.mean((logit > 0) == (self.dense_logit > 0))),
               "probe_logit_mse": float(np.mean(logit_err ** 2)),
               "logit_err_each": [round(float(e), 5) for e in logit_err],
               "cos_mean": float(cos.mean()), "cos_each": [round(float(c), 5) for c in cos],
               "cos_min": float(cos.min()), "n_heldout": int(len(self.labels))}
        if crossfit_emb is not None:
            cf = self.crossfit
            logit = np.empty(len(cf["labels"]))
            for k, probe in enumerate(cf["probes"]):
                logit[cf["fold"] == k] = probe.decision_function(crossfit_emb[cf["fold"] == k])
            right = (logit > 0) == (cf["labels"] == 1)
            out.update(probe_acc_cf=float(right.mean()), probe_right_cf="".join("1" if r else "0" for r in right),
                       probe_agree_cf=float(np.mean((logit > 0) == (cf["dense_logit"] > 0))),
                       probe_logit_mse_cf=float(np.mean((logit - cf["dense_logit"]) ** 2)),
                       n_crossfit=int(len(right)))
        return out

    def evaluate(self, path) -> dict:
        runner = Runner(path, engine=self.engine, cores=self.cores)
        emb = runner.outputs(self.heldout, embed)
        crossfit_emb = None
        if self.crossfit is not None:
            crossfit_emb = np.concatenate([emb, runner.outputs(self.extra, embed)])
        return self._score(emb, crossfit_emb)


def embed(hidden: np.ndarray, sample: dict) -> np.ndarray:
    """Mean of last_hidden_state over the attention mask, then L2-normalised (sentence-transformers)."""
    mask = sample["attention_mask"][0].astype(np.float32)[:, None]
    pooled = (hidden[0] * mask).sum(axis=0) / max(mask.sum(), 1e-9)
    return (pooled / max(np.linalg.norm(pooled), 1e-12)).astype(np.float32)


class MobileNetTask:
    """Top-1 on the 20 labelled images; top-1 agreement with dense (and KL) on the held-out photos."""

    # KL to dense on images the calibration never saw: continuous, so it still ranks strategies when
    # every one of them has lost the top-1 (MobileNetV2 at the sparsity DeepSparse needs)
    metrics = [("top-1 (20 labelled)", "top1", "frac"), ("top-1 agree w/ dense (photos)", "agree", "pct"),
               ("KL to dense (labelled)", "kl_labelled", "f2"), ("KL to dense (photos)", "kl_photos", "f2")]

    def __init__(self, models_dir: Path, dense: Path, *, engine, cores, cache: Path, heldout, seed):
        self.engine, self.cores = engine, cores
        self.labelled = load_npz(models_dir / "mobilenetv2_heldout.npz")
        self.labels = self.labelled.pop("labels")
        self.photos = load_npz(models_dir / "mobilenetv2_photos.npz")
        self.phases: dict[str, float] = {}
        t0 = time.perf_counter()
        self.dense_lab, self.dense_photo = self._logits(dense)
        self.phases["dense_logits_s"] = time.perf_counter() - t0
        self.dense_metrics = self._score(self.dense_lab, self.dense_photo)

    def describe(self) -> str:
        return (f"metrics on {len(self.labels)} labelled images and {len(self.dense_photo)} held-out photos, "
                f"{engine_version(self.engine)}")

    def _logits(self, path):
        runner = Runner(path, engine=self.engine, cores=self.cores)
        ident = lambda out, sample: out[0].astype(np.float32)  # noqa: E731
        return runner.outputs(self.labelled, ident), runner.outputs(self.photos, ident)

    def _score(self, lab: np.ndarray, photo: np.ndarray) -> dict:
        top5 = np.argsort(-lab, axis=1)[:, :5]
        return {"top1": int((lab.argmax(1) == self.labels).sum()), "n_labelled": int(len(self.labels)),
                "top5": int((top5 == self.labels[:, None]).any(1).sum()),
                "agree": float((photo.argmax(1) == self.dense_photo.argmax(1)).mean()),
                "agree_labelled": float((lab.argmax(1) == self.dense_lab.argmax(1)).mean()),
                "kl_photos": float(_kl(self.dense_photo, photo).mean()), "n_photos": int(len(photo)),
                "kl_labelled": float(_kl(self.dense_lab, lab).mean())}

    def evaluate(self, path) -> dict:
        return self._score(*self._logits(path))


def _kl(p_logits, q_logits):
    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


TASKS = {"minilm": MiniLMTask, "mobilenetv2": MobileNetTask}


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=Path("/work/models_out"),
                   help="folder with the exports of models/ (ONNX files and .npz data)")
    p.add_argument("--model", action="append", choices=sorted(MODELS), default=[],
                   help="minilm or mobilenetv2 (repeatable; default both)")
    p.add_argument("--targets", default="1.5,2,2.5", help="comma-separated speedups")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="comma-separated optimize strategies")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--search-budget", default=None,
                   help="spdy search budget: evaluations (600) or time (5m, 90s); default optimize's own")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="calibration samples per search candidate; default optimize's own")
    p.add_argument("--cache-dir", default=None, help="spdy-onnx cache (latency tables, databases, dense outputs)")
    p.add_argument("--heldout", type=int, default=None,
                   help="use only the first N held-out sentences (MiniLM; default all 2,530)")
    p.add_argument("--crossfit-folds", type=int, default=0, metavar="K",
                   help="MiniLM: also score K cross-fitted probes on every sentence the pruning never saw "
                        "(7,506 with the default data, against 2,530 held-out), for paired gaps with less noise")
    p.add_argument("--engine", choices=("deepsparse", "onnxruntime"), default="deepsparse",
                   help="engine computing the task metrics (speedups are always DeepSparse's, from optimize)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size to time at (default: per model, MiniLM 1, MobileNetV2 16)")
    p.add_argument("--correct-epochs", type=int, default=None,
                   help="optimize's global correction epochs (default: optimize's default)")
    p.add_argument("--correct-layers", type=float, default=None, metavar="W",
                   help="optimize's --correct-layers for every strategy (default: optimize's, off)")
    p.add_argument("--loss", choices=["auto", "kl", "mse"], default=None,
                   help="optimize's --loss for every strategy (its search and its global correction)")
    p.add_argument("--search-prior", choices=["auto", "shape", "losses"], default=None,
                   help="optimize's --search-prior (default: optimize's own)")
    p.add_argument("--reconstruct", choices=["obs", "magnitude"], default=None,
                   help="optimize's --reconstruct (default: optimize's own)")
    p.add_argument("--margin", type=float, default=None,
                   help="optimize's --margin (default: optimize's own); a negative one accepts a shortfall, "
                        "e.g. to see a baseline at the grid level just under the target")
    p.add_argument("--exclude", action="append", metavar="PATTERN", default=None,
                   help="optimize's --exclude (repeatable regex over site names): these sites stay dense")
    p.add_argument("--level-context", action="store_true",
                   help="profile with optimize's --level-context (level factors, spdy_onnx.context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("accuracy.json"), help="all rows as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables to this Markdown file")
    p.add_argument("--keep-models", type=Path, default=None, help="keep the pruned models in this folder")
    p.add_argument("-v", "--verbose", action="store_true", help="log optimize's progress (INFO)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only print (and with --markdown write) the tables of an earlier run's --out JSON")
    args = p.parse_args(argv)
    if args.render:
        return render_saved(args.render, args.markdown)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    log.setLevel(logging.INFO)
    random.seed(args.seed)
    np.random.seed(args.seed)

    models = args.model or list(MODELS)
    targets = [api.parse_target(t) for t in args.targets.split(",") if t.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        if s not in api.STRATEGIES:
            p.error(f"unknown strategy '{s}'; choose from {', '.join(api.STRATEGIES)}")
    if args.heldout is not None and args.heldout < 1:
        p.error("--heldout must be >= 1")
    if args.crossfit_folds and args.crossfit_folds < 2:
        p.error("--crossfit-folds must be 0 (off) or at least 2")
    from spdy_onnx import cache as spdy_cache
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else spdy_cache.default_cache_dir()
    work = Path(tempfile.mkdtemp(prefix="spdy-accuracy-"))
    keep = args.keep_models
    if keep:
        keep.mkdir(parents=True, exist_ok=True)

    result = {"meta": {"cpu": cpu_name(), "cores": args.cores, "batch_size": args.batch_size or "per model", "deepsparse": deepsparse_version(),
                       "metrics_engine": engine_version(args.engine), "python": platform.python_version(),
                       "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")},
              "models": {}, "rows": []}
    t_all = time.perf_counter()
    for name in models:
        spec = MODELS[name]
        onnx_path = args.models_dir / spec["onnx"]
        calib = args.models_dir / spec["calib"]
        for f in (onnx_path, calib):
            if not f.exists():
                raise SystemExit(f"missing {f}: run the scripts of models/ first (see models/README.md)")
        batch = args.batch_size or spec["batch"]
        info = {"title": spec["title"], "onnx": str(onnx_path), "calib": str(calib), "batch_size": batch}
        result["models"][name] = info
        say(f"[{name}] profiling on DeepSparse ({args.cores} core(s), batch {batch}) ...")
        t0 = time.perf_counter()
        table, table_path = api.profile(onnx_path, output=work / f"{name}.latency.json", cores=args.cores,
                                        batch_size=batch, cache_dir=cache_dir, progress=False,
                                        level_context=args.level_context)
        info.update(profile_s=time.perf_counter() - t0, table=str(table_path), levels=list(table.levels),
                    dense_table_ms=table.dense_total_ms, table_meta=_jsonable(table.meta))
        say(f"[{name}] latency table: {len(table.times)} sites x {len(table.levels)} levels, dense "
            f"{table.dense_total_ms:.2f} ms (sum of layers), {_profile_time(info)}")

        say(f"[{name}] dense reference ({args.engine}) ...")
        t0 = time.perf_counter()
        kind = spec.get("task", name)
        extra = {"crossfit": args.crossfit_folds} if kind == "minilm" and args.crossfit_folds else {}
        task = TASKS[kind](args.models_dir, args.models_dir / spec.get("dense", spec["onnx"]), engine=args.engine, cores=args.cores,
                           cache=cache_dir / "accuracy", heldout=args.heldout, seed=args.seed, **extra)
        info.update(dense_s=time.perf_counter() - t0, dense_phases_s=task.phases, describe=task.describe())
        dense_row = {"model": name, "strategy": "dense", "target": None, "status": "dense", "measured": 1.0,
                     "predicted": 1.0, "calibration_loss": 0.0, **task.dense_metrics, "eval_s": info["dense_s"]}
        result["rows"].append(dense_row)
        say(f"[{name}] dense: {_metrics_text(task, dense_row)} ({info['dense_s']:.1f} s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in task.phases.items()) + ")")
        _write_json(args.out, result)

        for strategy in strategies:
            for target in targets:
                row = run_one(name, onnx_path, calib, table_path, task, strategy=strategy, target=target,
                              args=args, cache_dir=cache_dir, work=work, keep=keep, batch=batch)
                result["rows"].append(row)
                say(f"[{name}] {_row_text(task, row)}")
                _write_json(args.out, result)

        print()
        print(render_table(name, info, task, [r for r in result["rows"] if r["model"] == name], args), flush=True)
        info["markdown"] = render_table(name, info, task, [r for r in result["rows"] if r["model"] == name], args)

    result["meta"]["seconds_total"] = time.perf_counter() - t_all
    _write_json(args.out, result)
    if args.markdown:
        args.markdown.write_text("\n\n".join(m["markdown"] for m in result["models"].values()) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    say(f"rows written to {args.out} ({result['meta']['seconds_total']:.0f} s in all)")


def render_saved(path: Path, markdown: Path | None) -> None:
    """The tables of a saved run, rendered with the current notes (the metrics are those its rows hold)."""
    result = json.loads(path.read_text())
    saved = argparse.Namespace(**{k: v for k, v in result["meta"]["args"].items()}, cpu=result["meta"].get("cpu"))
    tables = []
    for name, info in result["models"].items():
        rows = [r for r in result["rows"] if r["model"] == name]
        task = argparse.Namespace(metrics=[m for m in TASKS[MODELS[name].get("task", name)].metrics + CROSSFIT_METRICS
                                           if any(r.get(m[1]) is not None for r in rows)])
        tables.append(render_table(name, info, task, rows, saved))
        print(tables[-1] + "\n", flush=True)
    if markdown:
        markdown.write_text("\n\n".join(tables) + "\n")


def run_one(name, onnx_path, calib, table_path, task, *, strategy, target, args, cache_dir, work, keep,
            batch: int = 1) -> dict:
    out = (keep or work) / f"{name}.{strategy}.{target:g}x.onnx"
    report = (keep or work) / f"{name}.{strategy}.{target:g}x.report.json"
    row = {"model": name, "strategy": strategy, "target": target}
    t0 = time.perf_counter()
    rep = None
    try:
        extra = {} if args.correct_epochs is None else {"correct_epochs": args.correct_epochs}
        if args.margin is not None:
            extra["margin"] = args.margin
        if args.eval_samples is not None:
            extra["eval_samples"] = args.eval_samples
        if args.reconstruct is not None:
            extra["reconstruct"] = args.reconstruct
        if args.search_prior is not None:
            extra["search_prior"] = args.search_prior
        if args.loss is not None:
            extra["loss"] = args.loss
        if args.correct_layers is not None:
            extra["correct_layers"] = args.correct_layers
        rep = api.optimize(onnx_path, target=target, data=str(calib), strategy=strategy, cores=args.cores,
                           batch_size=batch, cache_dir=cache_dir, search_budget=args.search_budget, seed=args.seed,
                           latency_table=str(table_path), output=out, report=report, progress=False,
                           exclude=args.exclude, **extra)
        row["status"] = rep["status"]
    except InfeasibleTarget as exc:
        row.update(status="unreachable", max_achievable=exc.max_speedup, reason=str(exc))
    except TargetMissed as exc:
        row.update(status="missed", measured=exc.measured, reason=str(exc))
        rep = _read_report(report)       # written before the error: predicted, loss and phases are there
    except SpdyError as exc:
        row.update(status="error", reason=str(exc))
    except Exception as exc:  # a long unattended run records the failure and goes on
        traceback.print_exc()
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    row["optimize_s"] = time.perf_counter() - t0
    if rep:
        phases = rep.get("phases_s", {})
        quality = rep.get("quality", {})
        row.update(measured=rep.get("measured_speedup", row.get("measured")), predicted=rep.get("predicted_speedup"),
                   max_achievable=rep.get("max_achievable_speedup"), calibration_loss=quality.get("calibration_loss"),
                   loss=quality.get("loss"), sparsity=rep.get("weighted_mean_sparsity"),
                   dense_ms=rep.get("dense_ms"), pruned_ms=rep.get("pruned_ms"),
                   attempts=len(rep.get("attempts", [])), phases_s=phases,
                   table_s=phases.get("latency_table_s"), calib_s=phases.get("calibration_s"),
                   choose_s=_sum_phase(phases, "choose_s_"), bench_s=_sum_phase(phases, "benchmark_s_"),
                   correct_s=_sum_phase(phases, "correct_s_"),
                   loss_before_correction=quality.get("calibration_loss_before_correction"),
                   correction=quality.get("global_correction"),
                   search=quality.get("search"), search_prior=quality.get("search_prior"),
                   attempt_speedups=[(a.get("predicted_speedup"), a.get("measured_speedup"))
                                     for a in rep.get("attempts", [])],
                   fused_groups_from_drafts=rep.get("fused_groups_from_drafts", []),
                   profile={s["name"]: s["sparsity"] for s in rep.get("sites", [])})
    if row["status"] in ("met", "not_measured") and out.exists():
        t0 = time.perf_counter()
        try:
            row.update(task.evaluate(out))
        except Exception as exc:
            traceback.print_exc()
            row["eval_error"] = f"{type(exc).__name__}: {exc}"
        row["eval_s"] = time.perf_counter() - t0
        if not keep:
            out.unlink(missing_ok=True)
    return row


def _read_report(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _sum_phase(phases: dict, prefix: str):
    vals = [v for k, v in phases.items() if k.startswith(prefix)]
    return sum(vals) if vals else None


# ----------------------------------------------------------------------------------------------------------
# Output

def render_table(name, info, task, rows, args) -> str:
    meta = info.get("table_meta", {})
    loss = next((r.get("loss") for r in rows if r.get("loss")), "label-free")
    lines = [
        f"### {info['title']}: `{Path(info['onnx']).name}`",
        "",
        f"DeepSparse {meta.get('version', deepsparse_version())}, batch {info.get('batch_size', 1)}, {args.cores} core(s), CPU: {getattr(args, 'cpu', None) or cpu_name()}. "
        f"Calibration `{Path(info['calib']).name}`, loss {loss} vs dense. Latency table profiled once "
        f"({len(info['levels'])} levels, {_profile_time(info)}) and shared by every strategy. "
        f"{info['describe'][0].upper() + info['describe'][1:]}. Seed {args.seed}"
        + (f", search budget {args.search_budget}" if args.search_budget else "")
        + (f", margin {args.margin:g}" if args.margin is not None else "")
        + (f", --reconstruct {args.reconstruct}" if args.reconstruct else "")
        + (f", --search-prior {args.search_prior}" if args.search_prior else "")
        + (f", --loss {args.loss}" if args.loss else "")
        + (f", --correct-layers {args.correct_layers:g}" if getattr(args, "correct_layers", None) else "")
        + (f", --exclude {' '.join(args.exclude)}" if getattr(args, "exclude", None) else "")
        + (f", {args.eval_samples} samples per search evaluation" if args.eval_samples else "") + ".",
        "",
    ]
    metric_heads = [h for h, _, _ in task.metrics]
    heads = (["strategy", "target", "status", "measured", "predicted", "calib loss"] + metric_heads
             + ["sparsity", "optimize s", "table s", "calib s", "choose s", "correct s", "bench s", "attempts",
                "eval s"])
    lines.append("| " + " | ".join(heads) + " |")
    lines.append("|" + "---|" * len(heads))
    for r in rows:
        metrics = [_fmt_metric(r, key, kind) for _, key, kind in task.metrics]
        cells = ([r["strategy"], "-" if r["target"] is None else f"{r['target']:g}x", r["status"],
                  _x(r.get("measured")), _x(r.get("predicted")), _g(r.get("calibration_loss"))] + metrics
                 + [_pct(r.get("sparsity")), _s(r.get("optimize_s")), _s(r.get("table_s"), 2), _s(r.get("calib_s")),
                    _s(r.get("choose_s")), _s(r.get("correct_s")), _s(r.get("bench_s")), str(r.get("attempts", "-")),
                    _s(r.get("eval_s"))])
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["dense: `eval s` is the whole dense reference (" + ", ".join(
        f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in info.get("dense_phases_s", {}).items())
        + "); `optimize s` is the wall time of `api.optimize`, the next five columns its `phases_s` "
        "(choose, correct and bench summed over attempts; `calib s` is the Hessians and the reconstruction "
        "database, `correct s` the global correction); `eval s` runs the pruned model on the held-out data"]
    notes += [f"{r['strategy']} {r['target']:g}x: {r['reason']}" for r in rows if r.get("reason")]
    notes += paired_notes(rows)
    notes += flip_notes(rows)
    notes += profile_notes(rows)
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def mcnemar(a: str, b: str) -> tuple[int, int, float, float]:
    """Sentences right only with a, right only with b, McNemar's z (normal approximation), two-sided p;
    a and b are strings of "1" (right) and "0" (wrong) over the same sentences."""
    import math
    only_a = sum(1 for x, y in zip(a, b) if x == "1" and y == "0")
    only_b = sum(1 for x, y in zip(a, b) if x == "0" and y == "1")
    n = only_a + only_b
    z = (only_a - only_b) / math.sqrt(n) if n else 0.0
    return only_a, only_b, z, math.erfc(abs(z) / math.sqrt(2))


def paired_notes(rows) -> list[str]:
    """SPDY against each baseline on the same held-out sentences (McNemar's test, normal approximation):
    a probe-accuracy gap means something only when the sentences one gets right and the other wrong are
    lopsided enough."""
    out = []
    by = {(r["strategy"], r["target"]): r for r in rows if r.get("probe_right")}
    for (strategy, target), r in sorted(by.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        if strategy == "spdy" or ("spdy", target) not in by:
            continue
        for key, where in (("probe_right", "held-out"), ("probe_right_cf", "cross-fit")):
            a, b = by[("spdy", target)].get(key), r.get(key)
            if not a or not b or len(a) != len(b):
                continue
            only_spdy, only_other, z, p = mcnemar(a, b)
            out.append(f"paired, {target:g}x, spdy vs {strategy}, {len(a)} {where} sentences: {only_spdy} right "
                       f"only with spdy, {only_other} only with {strategy} (McNemar z = {z:+.2f}, two-sided p = {p:.2g})")
        ca, cb = by[("spdy", target)].get("cos_each"), r.get("cos_each")
        if ca and cb and len(ca) == len(cb):
            out.append(_sign_test(f"paired, {target:g}x, spdy vs {strategy}: spdy's embedding is closer to dense "
                                  "(cosine) on", [x - y for x, y in zip(ca, cb)]))
        la, lb = by[("spdy", target)].get("logit_err_each"), r.get("logit_err_each")
        if la and lb and len(la) == len(lb):
            out.append(_sign_test(f"paired, {target:g}x, spdy vs {strategy}: the probe's logit is closer to its "
                                  "dense value with spdy on", [y - x for x, y in zip(la, lb)]))
    return out


def flip_notes(rows) -> list[str]:
    """Per target, how many of the dense probe's cross-fit decisions each strategy flips, and which way.

    Binary labels: a pruned prediction differs from the dense one exactly where one is right and the
    other wrong. Fewer flips is what a label-free method can aim for; the share of flips that land on
    the right label is what decides accuracy beyond that, and no label-free loss sees it."""
    dense = next((r.get("probe_right_cf") for r in rows if r["strategy"] == "dense"), None)
    if not dense:
        return []
    out = []
    for target in sorted({r["target"] for r in rows if r["target"] is not None}):
        parts = []
        for r in rows:
            right = r.get("probe_right_cf")
            if r["target"] != target or not right or len(right) != len(dense):
                continue
            lost = sum(1 for d, x in zip(dense, right) if d == "1" and x == "0")
            gained = sum(1 for d, x in zip(dense, right) if d == "0" and x == "1")
            share = gained / (lost + gained) if lost + gained else 0.0
            parts.append(f"{r['strategy']} {lost + gained} ({gained} to the right label, {share:.1%})")
        if parts:
            out.append(f"{target:g}x, dense probe decisions flipped on the {len(dense)} cross-fit sentences: "
                       + "; ".join(parts))
    return out


def profile_notes(rows, max_kinds: int = 8) -> list[str]:
    """Per target and strategy, the mean sparsity of each kind of site (the site's name with its layer
    numbers dropped): where each strategy puts its zeros. Only for models with a few kinds of site."""
    import re

    def kind(name: str) -> str:
        parts = [p for p in re.sub(r"\d+", "N", name).split("/") if p]
        kept = [p for p in parts if "N" not in p and p not in ("model", "encoder", "MatMul", "Gemm", "Conv")]
        return "/".join(kept) or name

    out = []
    for r in rows:
        prof = r.get("profile")
        if r["target"] is None or not isinstance(prof, dict) or not prof:
            continue
        groups: dict[str, list[float]] = {}
        for name, sparsity in prof.items():
            groups.setdefault(kind(name), []).append(float(sparsity))
        if len(groups) > max_kinds:
            continue
        out.append(f"{r['target']:g}x, {r['strategy']}, mean sparsity by kind of site: "
                   + ", ".join(f"{k} {np.mean(v):.0%}" for k, v in groups.items()))
    return out


def _sign_test(text: str, diffs) -> str:
    """'<text> K of N sentences (sign test ...)': K = how many diffs are positive, ties dropped from the test."""
    import math
    closer = sum(1 for d in diffs if d > 0)
    m = sum(1 for d in diffs if d != 0)
    z = (closer - m / 2) / math.sqrt(m / 4) if m else 0.0
    return f"{text} {closer} of {len(diffs)} sentences (sign test z = {z:+.1f}, two-sided p = {math.erfc(abs(z) / math.sqrt(2)):.2g})"


def _profile_time(info) -> str:
    measured = info.get("table_meta", {}).get("seconds")
    if measured and info["profile_s"] < 0.5 * measured:
        return f"measured in {measured:.0f} s, read from the cache"
    return f"{info['profile_s']:.0f} s"


def _fmt_metric(r, key, kind):
    v = r.get(key)
    if v is None:
        return "-"
    if kind == "pct":
        return f"{v:.1%}"
    if kind == "frac":
        return f"{v}/{r.get('n_labelled', '?')}"
    if kind == "f2":
        return f"{v:.2f}"
    return f"{v:.4f}"


def _metrics_text(task, r):
    return ", ".join(f"{h} {_fmt_metric(r, k, kind)}" for h, k, kind in task.metrics)


def _row_text(task, r):
    text = (f"{r['strategy']} {r['target']:g}x: {r['status']}, measured {_x(r.get('measured'))}, predicted "
            f"{_x(r.get('predicted'))}, loss {_g(r.get('calibration_loss'))}")
    if any(r.get(k) is not None for _, k, _ in task.metrics):
        text += ", " + _metrics_text(task, r)
    text += f" | optimize {_s(r.get('optimize_s'))} s"
    if r.get("phases_s"):
        text += " (" + ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items()) + ")"
    if r.get("eval_s") is not None:
        text += f", eval {_s(r['eval_s'])} s"
    if r.get("reason") and r["status"] != "missed":
        text += f" [{r['reason']}]"
    return text


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _g(v):
    return "-" if v is None else f"{v:.4g}"


def _pct(v):
    return "-" if v is None else f"{v:.0%}"


def _s(v, digits=0):
    return "-" if v is None else f"{v:.{digits}f}"


def say(text):
    print(text, flush=True)


def cpu_name():
    from spdy_onnx.runtimes.deepsparse import cpu_name as name
    return name()


def deepsparse_version():
    try:
        import deepsparse
        return deepsparse.__version__
    except ImportError:
        return "?"


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _write_json(path: Path, obj):
    write_json_atomic(path, json.loads(json.dumps(obj, default=_json_default)))


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
