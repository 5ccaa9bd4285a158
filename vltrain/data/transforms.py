"""Image transforms: resize, random resized crop, flip, a small RandAugment, ImageNet normalisation.

torchvision is unusable with this torch build, so the few transforms we need are written with PIL
(`Image.resize(box=...)` crops and resizes in one pass). Every random choice comes from the numpy
Generator the caller passes in, which the loader seeds from (seed, epoch, key): augmentation is then
the same whatever the worker count and across a resume.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255
# Pre-training crops as in ALBEF/BLIP: keep at least half the image, since captions name positions.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FILL = (124, 116, 104)  # ImageNet mean pixel, for areas that shears/rotations expose
_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}


def flip_caption(text: str) -> str:
    """The caption of the mirrored image: 'left' and 'right' trade places (the captions name sides)."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(1)], text)


def random_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box: area in CROP_SCALE, log-uniform aspect, 10 tries, else centre."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return x0, y0, x0 + w, y0 + h
    return center_box(width, height)


def center_box(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def _shear(img, v, axis):
    return img.transform(
        img.size, Image.Transform.AFFINE, (1, v, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, v, 1, 0), fillcolor=FILL
    )


def _translate(img, v, axis):
    dx, dy = (v * img.size[0], 0) if axis == 0 else (0, v * img.size[1])
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=FILL)


# BLIP's RandomAugment op list: no colour-changing ops (Color, Solarize, Posterize, Invert), because
# captions name colours. Each op takes the signed magnitude v in [-1, 1] scaled by M/10.
RANDAUGMENT_OPS = {
    "identity": lambda img, v: img,
    "autocontrast": lambda img, v: ImageOps.autocontrast(img),
    "equalize": lambda img, v: ImageOps.equalize(img),
    "brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(1 + 0.9 * v),
    "sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(1 + 0.9 * v),
    "shear_x": lambda img, v: _shear(img, 0.3 * v, 0),
    "shear_y": lambda img, v: _shear(img, 0.3 * v, 1),
    "translate_x": lambda img, v: _translate(img, 0.2 * v, 0),  # at most 10% at M=5: objects stay in their region
    "translate_y": lambda img, v: _translate(img, 0.2 * v, 1),
    "rotate": lambda img, v: img.rotate(30 * v, resample=Image.Resampling.BILINEAR, fillcolor=FILL),
}


def randaugment(img: Image.Image, rng: np.random.Generator, n: int = 2, magnitude: int = 5) -> Image.Image:
    """RandAugment (Cubuk et al. 2020): n ops drawn uniformly, each at magnitude M/10 with a random sign."""
    names = list(RANDAUGMENT_OPS)
    for i in rng.integers(len(names), size=n):
        v = magnitude / 10 * (1 if rng.random() < 0.5 else -1)
        img = RANDAUGMENT_OPS[names[i]](img, v)
    return img


@dataclass(frozen=True)
class ImageTransform:
    """Bytes of one image (and its caption) -> normalised float32 CHW array (and the caption to use)."""

    size: int
    train: bool
    random_crop: bool = True
    hflip: bool = True
    randaugment: bool = False

    def __call__(self, image_bytes: bytes, text: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        img: Image.Image = Image.open(io.BytesIO(image_bytes))
        img.draft("RGB", (self.size, self.size))  # JPEG: decode at a reduced scale when much larger
        img = img.convert("RGB")
        box = random_crop_box(*img.size, rng) if self.train and self.random_crop else center_box(*img.size)
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if self.train and self.hflip and rng.random() < 0.5:
            img, text = ImageOps.mirror(img), flip_caption(text)
        if self.train and self.randaugment:
            img = randaugment(img, rng)
        return normalize(img), text


def normalize(img: Image.Image) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW with ImageNet mean/std."""
    arr = (np.asarray(img, dtype=np.float32) - MEAN) / STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
