"""Where does a pruned MiniLM-L6 lose probe accuracy? Total embedding error against the probe's direction.

Why: in the accuracy benchmark SPDY's embeddings are closer to the dense ones than the baselines' on
nearly every held-out sentence, yet its probe accuracy at 1.5x is not higher. This splits each pruned
model's error (pruned minus dense embedding, held-out sentences) into what the probe sees and the rest:

- flips: sentences whose probe prediction differs from the dense model's, and how many of those the
  dense model had right (a flip of a right one costs a point, of a wrong one gains it);
- the error's mean squared norm, and its share along the probe's weight vector;
- the correlation of pruned and dense probe logits, the slope of one on the other and their mean
  difference (a slope under 1 is a contraction toward the mean: boundary sentences move one way);
- the spread ratio: the pruned embeddings' variance across sentences over the dense ones'.

    python benchmarks/accuracy.py --model minilm --targets 1.5 --strategies spdy,uniform \
        --keep-models kept --cache-dir CACHE ...
    python benchmarks/probe_errors.py --models-dir out --cache-dir CACHE kept/minilm.spdy.1.5x.onnx \
        kept/minilm.uniform.1.5x.onnx
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import MiniLMTask, Runner, embed  # noqa: E402


def split_errors(dense: np.ndarray, pruned: np.ndarray, labels: np.ndarray, coef: np.ndarray,
                 intercept: float) -> dict:
    """The probe-facing and total parts of pruned - dense (rows: sentences)."""
    u = coef / np.linalg.norm(coef)
    err = pruned - dense
    ld, lp = dense @ coef + intercept, pruned @ coef + intercept
    flipped = (ld > 0) != (lp > 0)
    dense_right = (ld > 0) == labels
    total = float(np.mean(np.sum(err * err, axis=1)))
    along = float(np.mean((err @ u) ** 2))
    return {"probe_acc": float(((lp > 0) == labels).mean()), "flips": int(flipped.sum()),
            "flips_of_right": int((flipped & dense_right).sum()), "err_sq": total, "along_probe": along,
            "along_share": along / total if total else 0.0, "logit_corr": float(np.corrcoef(ld, lp)[0, 1]),
            "cos": float(np.mean(np.sum(pruned * dense, axis=1))),
            # a contraction toward the mean (slope under 1) moves boundary sentences one way, not at random
            "logit_slope": float(np.polyfit(ld, lp, 1)[0]), "logit_shift": float(np.mean(lp - ld)),
            "spread_ratio": float(np.sum(np.var(pruned, axis=0)) / np.sum(np.var(dense, axis=0)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="pruned MiniLM-L6 files")
    p.add_argument("--models-dir", type=Path, required=True, help="folder of models/make_data_minilm.py's files")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the dense embeddings are cached")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="spdy-probe-"))
    task = MiniLMTask(args.models_dir, args.models_dir / "minilm-l6.onnx", engine="deepsparse", cores=args.cores,
                      cache=cache / "accuracy", heldout=None, seed=args.seed)
    coef, intercept = task.probe.coef_[0], float(task.probe.intercept_[0])
    print(f"MiniLM-L6, batch 1, DeepSparse on {args.cores} core(s); {task.describe()}; "
          f"dense probe {task.dense_metrics['probe_acc']:.1%}")
    print("| model | probe acc | cos to dense | flips vs dense (of them dense-right) | mean sq. error | "
          "along probe (share) | logit corr | logit slope | logit shift | spread ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.models:
        pruned = Runner(path, engine="deepsparse", cores=args.cores).outputs(task.heldout, embed)
        r = split_errors(task.dense_emb, pruned, task.labels, coef, intercept)
        print(f"| {path.name} | {r['probe_acc']:.1%} | {r['cos']:.4f} | {r['flips']} ({r['flips_of_right']}) | "
              f"{r['err_sq']:.4f} | {r['along_probe']:.5f} ({r['along_share']:.2%}) | {r['logit_corr']:.3f} | "
              f"{r['logit_slope']:.3f} | {r['logit_shift']:+.3f} | {r['spread_ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
