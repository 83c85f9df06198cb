"""Export a BERT-base-size encoder (12 layers, hidden 768, 72 MatMuls, about 85M weights) with seeded
random weights, to time the tool on a model of that size.

Why random weights: no BERT-base checkpoint installs offline here. The tool's time depends on shapes,
not on weight values, so this model measures how long `optimize` takes at this size; accuracy figures
on it would mean nothing. It takes the same inputs as minilm-l6.onnx (the same WordPiece vocabulary),
so `minilm_calib.npz` serves as its calibration data.

Writes DIR/bert-base.onnx. Usage: python models/export_bert_base.py --out /work/models_out [--seq-len 128]
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import argparse
import logging
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from _common import constant_weight_nodes, io_summary, max_abs_diff, run_onnxruntime, setup_logging
from export_minilm import INPUT_NAMES, KeywordEncoder, export_encoder, full_length_inputs

log = logging.getLogger("models")

ONNX_NAME = "bert-base.onnx"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    setup_logging()
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    config = BertConfig(attn_implementation="eager")   # the defaults are BERT-base's shapes
    model = BertModel(config, add_pooling_layer=False).eval()
    n_weights = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder") and p.ndim == 2)
    log.info("BERT-base-size encoder: %.1fM weights in the encoder's matrices", n_weights / 1e6)
    wrapper = KeywordEncoder(model).eval()
    feeds = full_length_inputs(args.batch, args.seq_len, config.vocab_size)
    final = args.out / ONNX_NAME
    onnx_model = export_encoder(wrapper, feeds, final)
    log.info("%s", io_summary(onnx_model))
    log.info("constant-weight nodes: %s", constant_weight_nodes(onnx_model))
    with torch.no_grad():
        want = wrapper(*(torch.from_numpy(feeds[k]) for k in INPUT_NAMES)).numpy()
    (got,) = run_onnxruntime(final, feeds)
    diff = max_abs_diff(got, want)
    log.info("onnxruntime vs torch: max|diff| = %.2e", diff)
    if diff > 1e-3:
        raise RuntimeError(f"onnxruntime differs from torch by {diff:.2e} > 1e-3")
    log.info("wrote %s", final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
