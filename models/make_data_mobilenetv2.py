"""Make MobileNetV2 calibration and held-out image data from photos shipped inside installed wheels.

Why: pruning needs calibration activations from natural images, and accuracy needs held-out images the
calibration never saw. There is no ImageNet here, so:
- photos: the real photographs in scikit-image (data/*.png, data/*.jpg) and scikit-learn
  (datasets/images/*.jpg), minus synthetic/duplicate ones (see _images.EXCLUDED_PHOTOS). A seeded
  permutation splits them by photo: --heldout-photos of them are held out, the rest are calibration.
- calibration (mobilenetv2_calib.npz, key `input`, float32 (N,3,224,224)): each calibration photo's
  standard eval view (resize 256, center crop 224), then seeded augmented views round-robin over the
  photos until --calib samples (default 512). --augment strong (default): RandomResizedCrop(224, scale
  .08-1) or, one time in four, a 2x2 collage of crops of four photos; flips; colour jitter (.4) and 10%
  grayscale. --augment crops: RandomResizedCrop(scale .25-1) and flips only. Why strong: nine photos, most
  of them textures, are a narrow sample of ImageNet, and the search and the correction fit whatever they
  are given; at 1.1x the strong views cut SPDY's KL to dense on the 20 labelled images from 3.55 to 2.50
  (benchmarks/results/accuracy_mobilenetv2_augment.md).
- held-out photos (mobilenetv2_photos.npz, key `input`): the held-out photos, center-cropped (with
  --tencrop: torchvision-style TenCrop of the 256-resized image, 10 views each); no labels: use them
  for top-1 agreement / KL of pruned vs dense.
- labelled held-out (mobilenetv2_heldout.npz, keys `input`, `labels` int64): foolbox's 20
  imagenet_<i>_<label>.jpg, eval view (dense MobileNetV2 top-1: 18/20).
- mobilenetv2_data.json: which photo went where, seed and counts.
All inputs are ImageNet-normalised (mean .485,.456,.406; std .229,.224,.225), RGB, CHW.
Usage: python models/make_data_mobilenetv2.py --out /work/models_out [--calib 512] [--augment strong|crops]
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from _common import atomic_path, atomic_savez, setup_logging
from _images import (CROP, RESIZE, augmented_view, center_crop, eval_transform, labelled_files, load_rgb, photo_files,
                     random_resized_crop, resize_shorter, to_tensor)

log = logging.getLogger("models")


def is_gray(path: Path) -> bool:
    """True for single-channel files and RGB files whose three channels are identical."""
    a = np.asarray(load_rgb(path), dtype=np.int16)
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def ten_crop(im) -> list[np.ndarray]:
    """torchvision TenCrop(224) of the 256-resized image: 4 corners + center, and their mirrors."""
    im = resize_shorter(im, RESIZE)
    w, h = im.size
    boxes = [(0, 0), (w - CROP, 0), (0, h - CROP), (w - CROP, h - CROP)]
    crops = [im.crop((l, t, l + CROP, t + CROP)) for l, t in boxes] + [center_crop(im, CROP)]
    crops += [c.transpose(0) for c in crops]  # 0 == Image.FLIP_LEFT_RIGHT
    return [to_tensor(c) for c in crops]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--calib", type=int, default=512, help="calibration samples")
    ap.add_argument("--heldout-photos", type=int, default=None,
                    help="photos held out of calibration (default: half, rounded down)")
    ap.add_argument("--tencrop", action="store_true", help="10 views per held-out photo, not 1")
    ap.add_argument("--augment", choices=["crops", "strong"], default="strong",
                    help="calibration views: crops = RandomResizedCrop(scale .25-1) + flips; strong = also "
                         "colour jitter, random grayscale, smaller crops and 2x2 collages of four photos")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    setup_logging()
    rng = np.random.default_rng(args.seed)

    photos = photo_files()
    if args.heldout_photos is not None and not 0 < args.heldout_photos < len(photos):
        raise SystemExit(f"--heldout-photos must be in 1..{len(photos) - 1}")
    # Stratified by grayscale vs colour, so both sides get both kinds (an unstratified split can leave
    # calibration with only grey textures); within each stratum a seeded permutation.
    n_held = len(photos) // 2 if args.heldout_photos is None else args.heldout_photos
    gray = [p for p in photos if is_gray(p)]
    colour = [p for p in photos if p not in gray]
    n_gray = int(round(n_held * len(gray) / len(photos)))
    held, calib = [], []
    for group, n in ((gray, n_gray), (colour, n_held - n_gray)):
        perm = rng.permutation(len(group))
        held += [group[i] for i in perm[:n]]
        calib += [group[i] for i in perm[n:]]
    held, calib = sorted(held), sorted(calib)
    log.info("%d photos: %d for calibration, %d held out", len(photos), len(calib), len(held))
    log.info("calibration photos: %s", [p.name for p in calib])
    log.info("held-out photos: %s", [p.name for p in held])

    calib_imgs = [load_rgb(p) for p in calib]
    samples = [eval_transform(im) for im in calib_imgs][:args.calib]
    i = 0
    while len(samples) < args.calib:
        if args.augment == "strong":
            samples.append(augmented_view(calib_imgs, rng, i))
        else:
            samples.append(random_resized_crop(calib_imgs[i % len(calib_imgs)], rng))
        i += 1
    atomic_savez(args.out / "mobilenetv2_calib.npz", {"input": np.stack(samples).astype(np.float32)})

    views = [v for p in held for v in (ten_crop(load_rgb(p)) if args.tencrop
                                       else [eval_transform(load_rgb(p))])]
    atomic_savez(args.out / "mobilenetv2_photos.npz", {"input": np.stack(views).astype(np.float32)})

    files = labelled_files()
    atomic_savez(args.out / "mobilenetv2_heldout.npz", {
        "input": np.stack([eval_transform(load_rgb(f)) for f, _ in files]).astype(np.float32),
        "labels": np.array([label for _, label in files], np.int64)})

    manifest = {"seed": args.seed, "calib_samples": args.calib, "augment": args.augment, "tencrop": args.tencrop,
                "calibration_photos": [p.name for p in calib], "heldout_photos": [p.name for p in held],
                "labelled": [f.name for f, _ in files]}
    final = args.out / "mobilenetv2_data.json"
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    log.info("wrote %s", final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
