"""Common architectures with seeded random weights, exported the way users export them (torch legacy
exporter, static shapes), each with a random calibration set: the models of `benchmarks/architectures.py`.

Random weights say nothing about accuracy; these models check that the pipeline (sites, profiling, the
database, the search, the correction, the end-to-end check) runs on graphs beyond the two reference
models, and how far the engine's real speed is from the latency table's on each.

    python models/architectures.py --out out                 # all of them
    python models/architectures.py --out out resnet18 gpt    # some

Needs torch (`pip install -r models/requirements.txt`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from _common import atomic_path, atomic_savez, export_all


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so folding them into the convs is exercised."""
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = mod.num_features
            mod.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
            mod.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            mod.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups=1, dilation=1):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, groups=groups, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.sc = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return F.relu(y + (x if self.sc is None else self.sc(x)))


class ResNet18(nn.Module):
    """ResNet-18; groups/dilation > 1 give grouped convs (stages 2-4) and a dilated last stage."""

    def __init__(self, groups=1, dilation=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, c = [], 64
        for i, w in enumerate([64, 128, 256, 512]):
            layers += [BasicBlock(c, w, 1 if i == 0 else 2, groups=groups if i else 1,
                                  dilation=dilation if i == 3 else 1), BasicBlock(w, w, 1)]
            c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class Block(nn.Module):
    """Pre-norm transformer block: hand-written attention, nn.MultiheadAttention, or causal."""

    def __init__(self, d, heads, causal=False, mha=False, max_len=64):
        super().__init__()
        self.heads, self.causal, self.mha = heads, causal, mha
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        if mha:
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        # a constant mask (an exported torch.triu is a Trilu node, which DeepSparse 1.8 cannot run)
        self.register_buffer("mask", torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), 1))

    def forward(self, x):
        b, t, d = x.shape
        y = self.ln1(x)
        if self.mha:
            y = self.attn(y, y, y, need_weights=False)[0]
        else:
            q, k, v = self.qkv(y).split(d, dim=2)
            q, k, v = [z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v)]
            a = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
            if self.causal:
                a = a.masked_fill(self.mask[:t, :t], float("-inf"))
            y = self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        x = x + y
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh" if self.causal else "none"))


class ViT(nn.Module):
    """ViT-Tiny shape (192 wide, 3 heads), 4 blocks, 224x224 in 16x16 patches."""

    def __init__(self, d=192, depth=4, heads=3, mha=False):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 16, 16)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 197, d))
        self.blocks = nn.Sequential(*[Block(d, heads, mha=mha) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1000)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


class TinyGPT(nn.Module):
    """A GPT-2-style decoder (4 blocks, 256 wide, 8,000 tokens), output head tied to the embedding."""

    def __init__(self, vocab=8000, d=256, depth=4, heads=4, max_len=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.Sequential(*[Block(d, heads, causal=True, max_len=max_len) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        return self.head(self.ln(self.blocks(x)))


class AudioConv1d(nn.Module):
    """A keyword-spotting-style 1-D conv net on 1 s of 16 kHz audio: strided, dilated, grouped convs."""

    def __init__(self):
        super().__init__()
        layers, c = [], 1
        for w, k, stride, dil, groups in [(64, 10, 5, 1, 1), (128, 3, 2, 1, 1), (128, 3, 1, 2, 8),
                                          (256, 3, 2, 1, 1), (256, 3, 1, 4, 1)]:
            layers += [nn.Conv1d(c, w, k, stride, dilation=dil, groups=groups, padding=dil), nn.BatchNorm1d(w),
                       nn.GELU()]
            c = w
        self.net = nn.Sequential(*layers)
        self.fc = nn.Linear(256, 35)

    def forward(self, x):
        return self.fc(self.net(x).mean(-1))


class UNetSmall(nn.Module):
    """Two-level U-Net: a ConvTranspose upsampling and a skip concatenation."""

    def __init__(self):
        super().__init__()
        self.d1 = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
        self.d2 = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU())
        self.up = nn.ConvTranspose2d(64, 32, 2, 2)
        self.out = nn.Sequential(nn.Conv2d(64, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 2, 1))

    def forward(self, x):
        a = self.d1(x)
        return self.out(torch.cat([a, self.up(self.d2(a))], 1))


class MLP(nn.Module):
    """784-1024-1024-10 on flat features, exported with a dynamic batch dimension (Gemm, transB)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                 nn.Linear(1024, 10))

    def forward(self, x):
        return self.net(x)


def _images(rng, n, size):
    return rng.standard_normal((n, 3, size, size)).astype(np.float32)


# name: (builder, example input shape or ids, input name, opset, dynamic batch, what it is)
ARCHITECTURES = {
    "resnet18": (lambda: ResNet18(), (1, 3, 128, 128), "x", 13, False, "ResNet-18, 128x128"),
    "resnet18-grouped-dilated": (lambda: ResNet18(groups=8, dilation=2), (1, 3, 128, 128), "x", 13, False,
                                 "ResNet-18 with grouped convs and a dilated last stage, 128x128"),
    "vit-tiny": (lambda: ViT(), (1, 3, 224, 224), "x", 13, False, "ViT-Tiny shape, 4 blocks, 224x224"),
    "vit-tiny-mha": (lambda: ViT(mha=True), (1, 3, 224, 224), "x", 14, False,
                     "the same with nn.MultiheadAttention (opset 14)"),
    "gpt": (lambda: TinyGPT(), "ids", "ids", 13, False, "GPT-2-style decoder, 64 tokens, tied head"),
    "audio-conv1d": (lambda: AudioConv1d(), (1, 1, 16000), "x", 13, False, "1-D conv net, 1 s of 16 kHz audio"),
    "unet": (lambda: UNetSmall(), (1, 3, 96, 96), "x", 13, False, "small U-Net with ConvTranspose, 96x96"),
    "mlp-dynamic-batch": (lambda: MLP(), (1, 784), "x", 13, True, "784-1024-1024-10 MLP, dynamic batch"),
}


def export(name: str, out: Path, calib: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write NAME.onnx and NAME_calib.npz (`calib` random samples) into `out`."""
    build, shape, input_name, opset, dynamic, _ = ARCHITECTURES[name]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = _randomize_batchnorm(build()).eval()
    if shape == "ids":
        example = torch.randint(0, 8000, (1, 64))
        data = rng.integers(0, 8000, (calib, 64)).astype(np.int64)
    else:
        example = torch.randn(*shape)
        data = rng.standard_normal((calib,) + tuple(shape[1:])).astype(np.float32)
    onnx_path, data_path = out / f"{name}.onnx", out / f"{name}_calib.npz"
    axes = {input_name: {0: "batch"}, "out": {0: "batch"}} if dynamic else None
    with atomic_path(onnx_path, suffix=".onnx") as tmp, torch.no_grad():
        torch.onnx.export(model, (example,), str(tmp), input_names=[input_name], output_names=["out"],
                          opset_version=opset, dynamo=False, dynamic_axes=axes)
    atomic_savez(data_path, {input_name: data})
    return onnx_path, data_path


def main(argv=None):
    export_all(__doc__, list(ARCHITECTURES), export, argv)


if __name__ == "__main__":
    main()
