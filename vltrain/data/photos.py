"""The scikit-image photographs as a small real-photo retrieval and captioning check.

Why: the digits are grey 8x8 glyphs; these are ~20 real photographs (colour and grey, not square,
512 px and more) that ship inside scikit-image's wheel, so the whole pipeline (decode, crop, resize,
shards, loader, model, evaluation) is exercised on photos without a download. Their captions were
written once, by hand (vltrain/data/photo_captions.json). `vltrain data photos --out DIR` writes
DIR/*.tar: `--crops` random square crops of each photo, each with one of its training captions, and
DIR/eval/*.tar: one centre crop per photo, never a training box, with a held-out wording. One held-out
pair per photo, because Recall@K counts only a pair's own caption as a hit: two crops of a photo with
one caption would count each other as misses. What it can show: caption-photo binding on photos seen
in training; what it cannot: generalisation to unseen photos (docs/data.md, "Real photos check").
"""

from __future__ import annotations

import io
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vltrain.common.errors import UserError
from vltrain.data.digits import check_out, require, staged_dir, write_shards

Box = tuple[int, int, int, int]  # left, top, right, bottom (PIL's crop box)
DEFAULT_IMAGE_SIZE = 32
DEFAULT_CROPS = 32
CROP_SHARE = (0.5, 0.9)  # a training crop's side, as a share of the photo's shorter side
CENTRE_SHARE = 0.7  # the held-out crop's side
VOCAB_SIZE = 200  # the captions' SentencePiece size: they hold ~330 distinct words and pieces fit under it


def load_captions() -> dict[str, dict[str, Any]]:
    """{photo: {"train": [captions], "heldout": caption}} from the package's photo_captions.json."""
    text = resources.files("vltrain.data").joinpath("photo_captions.json").read_text()
    photos: dict[str, dict[str, Any]] = json.loads(text)["photos"]
    return photos


def load_photo(name: str) -> Any:
    """skimage.data.NAME() as an RGB PIL image, or None when it needs a download (pooch) or is absent.

    Grey (uint8), binary (bool) and float images become 8-bit; an alpha channel is laid on white."""
    from PIL import Image

    data = require("skimage.data", "vltrain data photos")
    try:
        a = np.asarray(getattr(data, name)())
    except (AttributeError, ImportError, OSError, ValueError):  # pooch missing, no network, renamed
        return None
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        lo, hi = float(a.min()), float(a.max())
        a = np.round((a - lo) * 255 / max(hi - lo, 1e-12)).astype(np.uint8)
    img = Image.fromarray(a)
    if img.mode == "RGBA":
        paper = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, img)
    return img.convert("RGB")


def random_boxes(width: int, height: int, n: int, rng: np.random.Generator) -> list[Box]:
    """n square crop boxes inside width x height, side CROP_SHARE of the shorter side, anywhere."""
    short, boxes = min(width, height), []
    for _ in range(n):
        side = round(short * rng.uniform(*CROP_SHARE))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        boxes.append((left, top, left + side, top + side))
    return boxes


def centre_box(width: int, height: int) -> Box:
    side = round(min(width, height) * CENTRE_SHARE)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def crop_png(img: Any, box: Box, image_size: int) -> bytes:
    """The box resized to image_size (Lanczos: photos shrink 5-30x) as a PNG (lossless: small and exact)."""
    from PIL import Image

    buf = io.BytesIO()
    img.crop(box).resize((image_size, image_size), Image.Resampling.LANCZOS).save(buf, format="PNG")
    return buf.getvalue()


def photo_sample(key: int, name: str, img: Any, box: Box, text: str, image_size: int, split: str) -> dict[str, Any]:
    from vltrain.data.shards import img2dataset_meta

    side, source = (image_size, image_size), f"skimage.data.{name}()"
    meta = img2dataset_meta(f"{key:09d}", text, side, img.size, photo=name, box=list(box), split=split, source=source)
    png = crop_png(img, box, image_size)
    return {"__key__": meta["key"], "png": png, "txt": text.encode(), "json": json.dumps(meta).encode()}


def photo_samples(
    photos: dict[str, Any], captions: dict[str, dict[str, Any]], crops: int, image_size: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, held-out) samples: per photo `crops` random boxes with a training caption each, and its
    centre box with the held-out wording. A pure function of its arguments (one generator per photo)."""
    train, held = [], []
    for p, (name, img) in enumerate(photos.items()):
        rng = np.random.default_rng([seed, p])
        centre = centre_box(img.width, img.height)
        boxes = [b for b in random_boxes(img.width, img.height, crops + 1, rng) if b != centre][:crops]
        texts = captions[name]["train"]
        for i, box in enumerate(boxes):
            text = texts[int(rng.integers(len(texts)))]
            train.append(photo_sample(p * crops + i, name, img, box, text, image_size, "train"))
        held.append(
            photo_sample(len(photos) * crops + p, name, img, centre, captions[name]["heldout"], image_size, "eval")
        )
    return train, held


def photos_recipe(shards: str, eval_shards: str, image_size: int) -> dict[str, Any]:
    """The check's train config: the tiny preset at image_size, its own 200-piece tokenizer, no flip (the
    page and the handwriting would be mirrored text), no random crop (the crops are the augmentation)."""
    import dataclasses

    from vltrain.presets import get_preset

    model = {
        **dataclasses.asdict(get_preset("tiny")),
        "name": "tiny-photos",
        "image_size": image_size,
        "vocab_size": VOCAB_SIZE,
    }
    return {
        "model": model,
        "global_batch": 64,
        "steps": 300,
        "precision": "fp32",
        "seed": 0,
        "log_every": 10,
        "checkpoint_every": 0,
        "eval_every": 0,
        "data": {"shards": shards, "eval_shards": eval_shards, "hflip": False, "random_crop": False},
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "weight_decay": 0.05, "warmup_steps": 30, "grad_clip": 1.0},
    }


def write_photos(
    out_dir: str | Path, image_size: int = DEFAULT_IMAGE_SIZE, crops: int = DEFAULT_CROPS, seed: int = 0
) -> dict[str, Any]:
    """Write the photos' training and held-out shards and DIR/train.toml; a summary (skipped photos named)."""
    from vltrain.data.digits import write_config

    out = Path(out_dir).absolute()
    if not (8 <= image_size <= 512 and image_size % 4 == 0):
        raise UserError(f"--image-size: {image_size}; allowed: 8 to 512, a multiple of 4 (the tiny preset's patch)")
    if not 1 <= crops <= 1000:
        raise UserError(f"--crops: {crops}; allowed: 1 to 1000 training crops per photo")
    check_out(out)
    captions = load_captions()
    loaded = {name: load_photo(name) for name in captions}
    photos = {name: img for name, img in loaded.items() if img is not None}
    if not photos:
        raise UserError("vltrain data photos: no scikit-image photo could be loaded; pip install '.[realdata]'")
    train, held = photo_samples(photos, captions, crops, image_size, seed)
    with staged_dir(out) as tmp:
        shards = write_shards(tmp, iter(train))
        eval_shards = write_shards(tmp / "eval", iter(held))
        write_config(tmp / "train.toml", photos_recipe(str(out), str(out / "eval"), image_size), "vltrain data photos")
    return {
        "out": str(out),
        "photos": sorted(photos),
        "skipped": sorted(set(loaded) - set(photos)),
        "samples": len(train),
        "shards": shards,
        "eval_out": str(out / "eval"),
        "eval_samples": len(held),
        "eval_shards": eval_shards,
        "image_size": image_size,
        "config": str(out / "train.toml"),
    }
