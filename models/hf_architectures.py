"""Small Hugging Face transformers architectures with seeded random weights, exported the way users
export them (torch legacy exporter, static shapes, eager attention), each with random calibration
data: more models for `benchmarks/architectures.py`, beyond the hand-written ones of `architectures.py`.

Random weights say nothing about accuracy. These check that the pipeline runs, and that the engine
check holds, on the graphs the transformers library exports: relative position biases (DeBERTa-v2, T5),
bottlenecks (MobileBERT), Conv1D-as-Gemm layers with a tied head (GPT-2), windowed attention (Swin),
depthwise 7x7 convs with LayerNorm (ConvNeXt), a convolutional front end (wav2vec2), opset-17
LayerNormalization (BERT). No download: every model is built from a config.

    python models/hf_architectures.py --out out/hf                 # all of them
    python models/hf_architectures.py --out out/hf gpt2 deberta-v2  # some

Needs torch and transformers (`pip install -r models/requirements.txt`). With --dynamo it exports with
torch.onnx.export's default (dynamo) exporter instead, at its default opset, as today's users do; that
exporter needs onnxscript and a newer onnx than the project's, so run it in its own environment (see
models/export_minilm_dynamo.py): `python models/hf_architectures.py --dynamo --out out/hf_dynamo`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from _common import atomic_path, atomic_savez, export_all

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ, IMAGE, VOCAB, AUDIO = 64, 64, 1000, 4000
TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)


def _text(cls_name, config_name, out="last_hidden_state", **config):
    def build():
        import transformers as tf
        cfg = getattr(tf, config_name)(**config)
        return getattr(tf, cls_name)._from_config(cfg, attn_implementation="eager"), out
    return build


def _vision(cls_name, config_name, out, eager=True, **config):
    def build():
        import transformers as tf
        cfg = getattr(tf, config_name)(**config)
        kw = {"attn_implementation": "eager"} if eager else {}
        return getattr(tf, cls_name)._from_config(cfg, **kw), out
    return build


# name: (builder -> (model, output attribute), inputs kind, opset, what)
HF_ARCHITECTURES = {
    "distilbert-cls": (_text("DistilBertForSequenceClassification", "DistilBertConfig", out="logits", dim=256,
                             hidden_dim=1024, n_layers=2, n_heads=4, vocab_size=VOCAB, num_labels=3),
                       "text", 14, "DistilBERT with a 3-class head, 64 tokens"),
    "roberta": (_text("RobertaModel", "RobertaConfig", max_position_embeddings=SEQ + 4, **TEXT),
                "text", 14, "RoBERTa encoder, 64 tokens"),
    "bert-opset17": (_text("BertModel", "BertConfig", max_position_embeddings=SEQ, **TEXT),
                     "text", 17, "BERT encoder at opset 17 (LayerNormalization ops), 64 tokens"),
    "deberta-v2": (_text("DebertaV2Model", "DebertaV2Config", max_position_embeddings=SEQ, **TEXT),
                   "text", 14, "DeBERTa-v2 encoder (relative position attention), 64 tokens"),
    "mobilebert": (_text("MobileBertModel", "MobileBertConfig", hidden_size=256, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=256, intra_bottleneck_size=64,
                         true_hidden_size=64, embedding_size=64, num_feedforward_networks=2, vocab_size=VOCAB,
                         max_position_embeddings=SEQ),
                   "text", 14, "MobileBERT (bottlenecks, NoNorm, 2 stacked FFNs), 64 tokens"),
    "gpt2-lm": (_text("GPT2LMHeadModel", "GPT2Config", out="logits", n_embd=256, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                      vocab_size=VOCAB, n_positions=SEQ),
                "text", 14, "GPT-2 with its LM head (Conv1D layers as Gemm), 64 tokens"),
    "t5-encoder": (_text("T5EncoderModel", "T5Config", d_model=256, d_ff=1024, num_layers=2, num_heads=4, d_kv=64,
                         vocab_size=VOCAB),
                   "text", 14, "T5 encoder (RMSNorm, relative position bias), 64 tokens"),
    "vit-cls": (_vision("ViTForImageClassification", "ViTConfig", "logits", hidden_size=192, intermediate_size=768,
                        num_hidden_layers=2, num_attention_heads=3, image_size=IMAGE, patch_size=8, num_labels=10),
                "image", 14, "ViT classifier, 64x64, patch 8"),
    "swin-cls": (_vision("SwinForImageClassification", "SwinConfig", "logits", image_size=IMAGE, patch_size=4,
                         embed_dim=48, depths=[2, 2], num_heads=[3, 6], window_size=4, num_labels=10),
                 "image", 14, "Swin classifier (windowed attention), 64x64"),
    "convnext-cls": (_vision("ConvNextForImageClassification", "ConvNextConfig", "logits", eager=False,
                             hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], num_labels=10, image_size=IMAGE),
                     "image", 14, "ConvNeXt classifier (depthwise 7x7, LayerNorm), 64x64"),
    "resnet-hf": (_vision("ResNetModel", "ResNetConfig", "pooler_output", eager=False, embedding_size=32,
                          hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1], layer_type="basic"),
                  "image", 14, "transformers' ResNet (basic blocks), pooled features, 64x64"),
    "wav2vec2": (_text("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=256, intermediate_size=1024,
                       num_hidden_layers=2, num_attention_heads=4, conv_dim=[64, 64, 64], conv_stride=[5, 4, 4],
                       conv_kernel=[10, 4, 4], num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
                 "audio", 14, "wav2vec2 (conv front end, grouped positional conv), 0.25 s of 16 kHz audio"),
}


class _Outputs(nn.Module):
    """Calls the model with keyword arguments (their order changed across transformers versions) and
    returns one plain tensor."""

    def __init__(self, model, attribute, names):
        super().__init__()
        self.model, self.attribute, self.names = model, attribute, names

    def forward(self, *args):
        return getattr(self.model(**dict(zip(self.names, args))), self.attribute)


def _data(kind: str, n: int, rng) -> dict[str, np.ndarray]:
    if kind == "text":
        ids = rng.integers(5, VOCAB, (n, SEQ)).astype(np.int64)
        lengths = rng.integers(SEQ // 2, SEQ + 1, n)
        mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)   # right padding
        return {"input_ids": ids * mask, "attention_mask": mask}
    if kind == "image":
        return {"pixel_values": rng.standard_normal((n, 3, IMAGE, IMAGE)).astype(np.float32)}
    return {"input_values": rng.standard_normal((n, AUDIO)).astype(np.float32)}


def export(name: str, out: Path, calib: int = 64, seed: int = 0, dynamo: bool = False) -> tuple[Path, Path]:
    """Write NAME.onnx and NAME_calib.npz (`calib` random samples) into `out`."""
    build, kind, opset, _ = HF_ARCHITECTURES[name]
    torch.manual_seed(seed)
    model, attribute = build()
    data = _data(kind, calib, np.random.default_rng(seed))
    names = list(data)
    wrapper = _Outputs(model.eval(), attribute, names).eval()
    example = tuple(torch.from_numpy(data[k][:1]) for k in names)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path, data_path = out / f"{name}.onnx", out / f"{name}_calib.npz"
    with atomic_path(onnx_path, suffix=".onnx") as tmp, torch.no_grad():
        if dynamo:   # its default opset (20 with torch 2.13), one file
            torch.onnx.export(wrapper, example, str(tmp), input_names=names, output_names=["out"], dynamo=True,
                              external_data=False)
        else:
            torch.onnx.export(wrapper, example, str(tmp), input_names=names, output_names=["out"],
                              opset_version=opset, dynamo=False)
    atomic_savez(data_path, data)
    return onnx_path, data_path


def main(argv=None):
    import functools
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    dynamo = "--dynamo" in argv
    export_all(__doc__, list(HF_ARCHITECTURES), functools.partial(export, dynamo=dynamo),
               [a for a in argv if a != "--dynamo"])


if __name__ == "__main__":
    main()
