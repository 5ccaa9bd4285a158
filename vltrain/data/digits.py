"""The bundled real digits: scikit-learn's 1,797 handwritten 8x8 scans as class-labelled shards.

Why these: they install with scikit-learn's wheel (no download), were written by 43 people (data no
one here made), and have ten classes, so zero-shot classification has a ground truth. `vltrain data
digits --out DIR` writes DIR/*.tar (training), DIR/eval/*.tar (a seeded, class-stratified held-out
split, never in training), classes.json in both, and DIR/train.toml (vltrain.data.digits_recipe) with
absolute paths, so the run starts from any working directory.

Images are upscaled (bilinear: no overshoot, the 16 grey levels stay in range) and stored as lossless
RGB PNG: an 8x8 glyph blown up has long flat runs and hard edges, which PNG keeps exactly in ~0.3-1 KB,
while JPEG would ring around the strokes for no saving. A sample's key is its index in load_digits(),
so a held-out key names the scan it came from. Same seed, same bytes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vltrain.common.errors import UserError

DEFAULT_HOLDOUT = 300
SHARD_SAMPLES = 500  # samples per shard: 3 training shards and 1 held-out shard at the defaults
MAX_IMAGE_SIZE = 256
REALDATA_HINT = "pip install '.[realdata]'"


def require(module: str, what: str) -> Any:
    """Import an optional [realdata] package, or one line naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what}: needs {module.split('.')[0]}, which is not installed; {REALDATA_HINT}") from None


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] in 0..16 ink, labels int [1797]) from scikit-learn's wheel."""
    datasets = require("sklearn.datasets", "vltrain data digits")
    d = datasets.load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.int64)


def split_indices(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices, sorted: a seeded split with every class in the same share on both sides."""
    n, classes = len(labels), len(np.unique(labels))
    if not classes <= holdout <= n - classes:
        raise UserError(f"--holdout: {holdout}; allowed: {classes} to {n - classes} (every class on both sides)")
    selection = require("sklearn.model_selection", "vltrain data digits")
    train, held = selection.train_test_split(np.arange(n), test_size=holdout, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(held)


def glyph_png(ink: np.ndarray, image_size: int) -> bytes:
    """An 8x8 scan (0..16 ink) as a RGB PNG of image_size px: dark ink on white paper, as it was scanned."""
    from PIL import Image

    grey = (255 - np.round(ink.astype(np.float64) * 255 / 16)).astype(np.uint8)
    img = Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def digit_caption(label: int, rng: np.random.Generator) -> str:
    """One of the recipe's caption templates, filled with the class name and numeral."""
    from vltrain.data.digits_recipe import CAPTION_TEMPLATES, CLASS_NAMES

    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(name=CLASS_NAMES[label], digit=label)


def digit_sample(index: int, ink: np.ndarray, label: int, seed: int, image_size: int) -> dict[str, Any]:
    """One shard sample (webdataset's dict): a pure function of (seed, index, scan, size)."""
    from vltrain.data.digits_recipe import CLASS_NAMES
    from vltrain.data.shards import img2dataset_meta

    key = f"{index:09d}"
    text = digit_caption(label, np.random.default_rng([seed, index]))
    source = f"sklearn.datasets.load_digits()[{index}]"
    side = (image_size, image_size)
    meta = img2dataset_meta(key, text, side, (8, 8), label=label, **{"class": CLASS_NAMES[label]}, source=source)
    return {
        "__key__": key,
        "png": glyph_png(ink, image_size),
        "txt": text.encode(),
        "json": json.dumps(meta).encode(),
        "cls": str(label).encode(),
    }


def write_shards(out: Path, samples: Iterator[dict[str, Any]], per_shard: int = SHARD_SAMPLES) -> list[str]:
    """Samples into out/00000.tar, 00001.tar, ... of `per_shard` each (ShardWriter: index and stats beside)."""
    from vltrain.data.shards import ShardWriter

    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    batch: list[dict[str, Any]] = []
    for sample in [*samples, None]:
        if sample is not None:
            batch.append(sample)
        if batch and (sample is None or len(batch) == per_shard):
            with ShardWriter(out / f"{len(paths):05d}.tar") as writer:
                for s in batch:
                    writer.write(s)
            paths.append(writer.path.name)
            batch = []
    return paths


def check_out(out: Path) -> None:
    """--out must be new or an empty directory: a data command never mixes its shards with others'."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: {out} is not empty; allowed: a new or empty directory")


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block ends without an error and
    removed when it raises: a failed or interrupted command leaves no half-written dataset."""
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if out.is_dir():
            out.rmdir()  # empty (checked above): rename() cannot replace it on every platform
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_classes(dirs: list[Path], classes: list[str], templates: list[str]) -> None:
    """classes.json (the zero-shot evaluator's class names and prompt templates) in each directory."""
    text = json.dumps({"classes": classes, "templates": templates}, indent=1) + "\n"
    for d in dirs:
        (d / "classes.json").write_text(text)


def write_config(path: Path, cfg: dict[str, Any], by: str = "vltrain data digits") -> None:
    """A train config with absolute data paths: `vltrain train --config` runs it from any directory."""
    import tomli_w

    from vltrain.common.atomic import drop_none

    head = f"# Written by `{by}`; the data paths are absolute (move the data: write it again).\n"
    path.write_text(head + tomli_w.dumps(drop_none(cfg)))


def check_image_size(image_size: int, patch_of: Callable[[int], int]) -> None:
    patch = patch_of(image_size)
    if not (8 <= image_size <= MAX_IMAGE_SIZE and image_size % patch == 0):
        raise UserError(
            f"--image-size: {image_size}; allowed: 8 to {MAX_IMAGE_SIZE}, a multiple of the recipe's patch size {patch}"
        )


def write_digits(
    out_dir: str | Path, holdout: int = DEFAULT_HOLDOUT, image_size: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Write the digits' training and held-out shards, both classes.json and train.toml; a summary."""
    from vltrain.data.digits_recipe import CLASS_NAMES, DEFAULT_IMAGE_SIZE, PROMPT_TEMPLATES, digits_recipe

    out = Path(out_dir).absolute()
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    check_image_size(size, lambda s: int(digits_recipe("", "", s)["model"]["patch_size"]))
    check_out(out)
    images, labels = load_digits_arrays()
    train, held = split_indices(labels, holdout, seed)
    with staged_dir(out) as tmp:
        samples = {
            name: write_shards(
                tmp / sub, (digit_sample(int(i), images[i], int(labels[i]), seed, size) for i in indices)
            )
            for name, sub, indices in (("train", ".", train), ("eval", "eval", held))
        }
        write_classes([tmp, tmp / "eval"], CLASS_NAMES, PROMPT_TEMPLATES)
        write_config(tmp / "train.toml", digits_recipe(str(out), str(out / "eval"), size))
    return {
        "out": str(out),
        "samples": len(train),
        "shards": samples["train"],
        "eval_out": str(out / "eval"),
        "eval_samples": len(held),
        "eval_shards": samples["eval"],
        "classes": len(CLASS_NAMES),
        "image_size": size,
        "seed": seed,
        "config": str(out / "train.toml"),
    }
