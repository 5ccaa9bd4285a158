"""Procedural image-caption pairs: a few big coloured shapes whose caption says what, where and how many.

Why synthetic: the trainer must learn something real on a CPU in minutes, and its tests need data
whose ground truth is known. A scene is a 3x3 grid; each *group* of same-shape, same-colour objects
sits in a region (left/right/top/bottom = a grid edge, center, or a corner), one object per cell.
The caption is rendered from the scene with varied wording (prefixes, synonyms, size words, joiners,
background phrases) so that a SentencePiece vocabulary of ~1000 pieces trains on it, while the
image-caption relation stays simple enough for a tiny ViT at 32-64 px. The grammar is written down
in docs/data.md. Sample i is a pure function of (seed, split, i): shard count does not change it.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vltrain.common.errors import UserError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 20),
    "orange": (250, 140, 15),
    "purple": (135, 40, 185),
    "pink": (250, 125, 195),
    "cyan": (25, 215, 225),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "beige": (222, 205, 165),
}
# Object colours that would not stand out on a background.
LOW_CONTRAST = {
    "gray": set(),
    "black": {"black", "purple", "blue"},
    "white": {"white", "yellow", "cyan"},
    "beige": {"white", "yellow", "pink"},
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
# The words a caption may use: synonyms keep the grounded content (colour, shape, size, count,
# region) while giving SentencePiece a vocabulary of realistic size to learn.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "jade"),
    "blue": ("blue", "cobalt", "sapphire"),
    "yellow": ("yellow", "lemon", "golden"),
    "orange": ("orange", "tangerine", "amber"),
    "purple": ("purple", "violet", "plum"),
    "pink": ("pink", "rose", "blush"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "white": ("white", "ivory", "snowy"),
    "black": ("black", "ebony", "inky"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "gray": ("gray", "grey", "slate"),
    "black": ("black", "dark", "pitch black"),
    "white": ("white", "pale", "bright white"),
    "beige": ("beige", "sand", "cream", "tan"),
}
# (singular, plural) pairs per shape.
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disk", "disks"), ("disc", "discs"), ("dot", "dots"), ("ball", "balls")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks"), ("tile", "tiles")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses"), ("lozenge", "lozenges")),
    "star": (("star", "stars"), ("five pointed star", "five pointed stars")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs"), ("plus symbol", "plus symbols")),
    "hexagon": (
        ("hexagon", "hexagons"),
        ("six sided polygon", "six sided polygons"),
        ("honeycomb cell", "honeycomb cells"),
    ),
}
SIZE_WORDS = {
    "small": ("small", "little", "tiny", "miniature", "petite", "compact"),
    "large": ("large", "big", "huge", "giant", "massive", "oversized", "enormous"),
}
SIZE_SCALE = {"small": 0.6, "medium": 1.0, "large": 1.2}  # radius relative to 0.4 x cell side
COUNT_WORDS = {
    1: ("a", "one", "a single", "a lone", "just one"),
    2: ("two", "a pair of", "a couple of", "2"),
    3: ("three", "a trio of", "a group of three", "3"),
}
# Regions: grid cells (row, col) they cover, the cell a single object prefers first, and their phrases.
REGIONS: dict[str, tuple[tuple[tuple[int, int], ...], tuple[str, ...]]] = {
    "left": (
        ((1, 0), (0, 0), (2, 0)),
        ("on the left", "on the left side", "to the left", "at the left", "along the left edge"),
    ),
    "right": (
        ((1, 2), (0, 2), (2, 2)),
        ("on the right", "on the right side", "to the right", "at the right", "along the right edge"),
    ),
    "top": (((0, 1), (0, 0), (0, 2)), ("at the top", "near the top", "along the top", "in the upper part", "up above")),
    "bottom": (
        ((2, 1), (2, 0), (2, 2)),
        ("at the bottom", "near the bottom", "along the bottom", "in the lower part", "down below"),
    ),
    "center": (((1, 1),), ("in the center", "in the middle", "at the centre", "right in the middle")),
    "top left": (((0, 0),), ("in the top left corner", "in the upper left corner", "at the top left")),
    "top right": (((0, 2),), ("in the top right corner", "in the upper right corner", "at the top right")),
    "bottom left": (((2, 0),), ("in the bottom left corner", "in the lower left corner", "at the bottom left")),
    "bottom right": (((2, 2),), ("in the bottom right corner", "in the lower right corner", "at the bottom right")),
}
PREFIXES = (
    "",
    "",
    "",
    "a picture of ",
    "an image of ",
    "a drawing of ",
    "a photo of ",
    "a rendering of ",
    "this image shows ",
    "a simple scene with ",
    "we see ",
    "there {be} ",
    "an illustration of ",
    "a diagram showing ",
    "a sketch of ",
    "a graphic featuring ",
    "a composition with ",
    "here we have ",
    "a snapshot of ",
    "a synthetic image of ",
    "a toy scene containing ",
    "the picture contains ",
    "a canvas with ",
    "an abstract arrangement of ",
    "clip art of ",
    "you can see ",
    "the frame holds ",
)
BACKGROUND_PHRASES = (
    "on a {} background",
    "against a {} background",
    "over a {} backdrop",
    "with a {} background",
    "on a plain {} canvas",
    "set on {} paper",
)
STYLE_SUFFIXES = (
    "flat vector illustration",
    "minimalist geometric art",
    "simple clip art",
    "digital drawing",
    "computer generated",
    "in a flat style",
    "high contrast",
    "bold colors",
    "clean edges",
    "abstract design",
    "children's book style",
    "retro poster look",
    "crisp pixels",
    "no text",
    "no people",
    "toy example",
    "procedural render",
    "soft shading",
    "icon set style",
    "textbook figure",
    "quick doodle",
    "sharp outlines",
)
JOINERS = (" and ", " as well as ", " plus ", " along with ", " together with ", " with ")
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges without a rendering library


def sample_scene(rng: np.random.Generator) -> dict[str, Any]:
    """A random scene: background and 1-3 groups in disjoint grid cells (pure given the generator)."""
    background = str(rng.choice(list(BACKGROUNDS)))
    colours = [c for c in COLOURS if c not in LOW_CONTRAST[background]]
    free = {(r, c) for r in range(3) for c in range(3)}
    groups: list[dict[str, Any]] = []
    used: set[tuple[str, str]] = set()
    for _ in range(int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))):
        options = [name for name, (cells, _) in REGIONS.items() if any(c in free for c in cells)]
        region = str(rng.choice(options))
        cells = [c for c in REGIONS[region][0] if c in free]
        count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        count = min(count, len(cells))
        # A single object takes the region's preferred cell (its middle); more take random free cells.
        chosen = cells[:1] if count == 1 else [cells[i] for i in sorted(rng.choice(len(cells), count, replace=False))]
        while True:
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(colours))
            if (shape, colour) not in used:
                break
        used.add((shape, colour))
        size = str(rng.choice(["medium", "small", "large"], p=[0.5, 0.25, 0.25]))
        free -= set(chosen)
        groups.append(
            {
                "count": count,
                "shape": shape,
                "colour": colour,
                "size": size,
                "region": region,
                "cells": [list(c) for c in chosen],
            }
        )
    return {"background": background, "groups": groups}


def place_objects(scene: dict[str, Any], size: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Pixel geometry for every object: centre jittered inside its cell, radius by size, a small tilt."""
    cell = size / 3
    objects = []
    for g in scene["groups"]:
        radius = 0.4 * cell * SIZE_SCALE[g["size"]]
        slack = max(cell / 2 - radius, 0.0) * 0.8
        for row, col in g["cells"]:
            cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
            jitter = rng.integers(-12, 13, size=3)
            rgb = [int(np.clip(v + j, 0, 255)) for v, j in zip(COLOURS[g["colour"]], jitter)]
            objects.append(
                {
                    "shape": g["shape"],
                    "colour": g["colour"],
                    "rgb": rgb,
                    "cx": round(cx, 2),
                    "cy": round(cy, 2),
                    "radius": round(radius, 2),
                    "angle": round(rng.uniform(-20, 20), 1),
                }
            )
    return objects


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]]  # unit outline, centred on the origin
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "triangle":  # centroid at the centre, so the centre pixel is inside
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif shape == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "hexagon":
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in range(0, 360, 60)]
    elif shape == "star":
        pts = [
            (
                (1 if i % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * i)),
                (1 if i % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * i)),
            )
            for i in range(10)
        ]
    elif shape == "cross":
        w = 0.34
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render(scene: dict[str, Any], objects: list[dict[str, Any]], size: int) -> Image.Image:
    """Draw the objects on the background at SUPERSAMPLE x resolution, then downsample."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r, fill = o["cx"] * k, o["cy"] * k, o["radius"] * k, tuple(o["rgb"])
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r, o["angle"]), fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def caption(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """Describe a scene in words; every group appears once with its count, size, colour, shape, region."""

    def pick(options):
        return str(options[int(rng.integers(len(options)))])

    phrases = []
    for g in scene["groups"]:
        singular, plural = SHAPE_WORDS[g["shape"]][int(rng.integers(len(SHAPE_WORDS[g["shape"]])))]
        words = [pick(COLOUR_WORDS[g["colour"]]), singular if g["count"] == 1 else plural]
        if g["size"] != "medium":
            words.insert(0, pick(SIZE_WORDS[g["size"]]))
        count = pick(COUNT_WORDS[g["count"]])
        if count == "a" and words[0][0] in "aeiou":
            count = "an"
        phrases.append(" ".join([count, *words, pick(REGIONS[g["region"]][1])]))
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + pick(JOINERS) + phrases[-1]
    if rng.random() < 0.7:
        text += " " + pick(BACKGROUND_PHRASES).format(pick(BACKGROUND_WORDS[scene["background"]]))
    if rng.random() < 0.3:
        text += ", " + pick(STYLE_SUFFIXES)
    return pick(PREFIXES).format(be="is" if scene["groups"][0]["count"] == 1 else "are") + text


def make_sample(seed: int, split: int, index: int, image_size: int) -> tuple[bytes, str, dict[str, Any]]:
    """One sample as (JPEG bytes, caption, scene): a pure function of (seed, split, index, size)."""
    rng = np.random.default_rng([seed, split, index])
    scene = sample_scene(rng)
    objects = place_objects(scene, image_size, rng)
    text = caption(scene, rng)
    buf = io.BytesIO()
    render(scene, objects, image_size).save(
        buf, format="JPEG", quality=90, subsampling=0
    )  # 4:4:4: small shapes keep their colour
    return buf.getvalue(), text, {**scene, "objects": objects}


def _split_counts(n: int, shards: int) -> list[int]:
    return [n // shards + (1 if i < n % shards else 0) for i in range(shards)]


def _write_split(out: Path, n: int, shards: int, seed: int, split: int, first_key: int, image_size: int) -> list[str]:
    from vltrain.data.shards import ShardWriter, img2dataset_meta

    paths, index = [], 0
    for k, count in enumerate(_split_counts(n, shards)):
        with ShardWriter(out / f"{k:05d}.tar") as writer:
            for _ in range(count):
                key = f"{first_key + index:09d}"
                jpg, text, scene = make_sample(seed, split, index, image_size)
                side = (image_size, image_size)
                meta = img2dataset_meta(key, text, side, side, scene=scene)
                writer.write({"__key__": key, "jpg": jpg, "txt": text.encode(), "json": json.dumps(meta).encode()})
                index += 1
        paths.append(str(writer.path))
    return paths


def write_synthetic_shards(
    out_dir: str | Path, n: int, shards: int, seed: int, image_size: int = 64, holdout: int = 0
) -> dict[str, Any]:
    """Write n samples as shards {00000..}.tar in out_dir, and `holdout` more under out_dir/eval.

    Held-out samples come from a separate random stream and continue the key numbering after the
    training keys, so the two splits never share a key or a scene draw.
    """
    out = Path(out_dir)
    if image_size < 16 or image_size > 1024:
        raise UserError(f"--image-size: {image_size}; allowed: 16 to 1024")
    if holdout < 0:
        raise UserError(f"--holdout: {holdout}; allowed: 0 or more samples")
    if n < 1:
        raise UserError(f"--n: {n}; allowed: at least 1 sample")
    if not 1 <= shards <= n:
        raise UserError(f"--shards: {shards} shards for {n} samples; allowed: 1 to {n}")
    for d in (out, out / "eval"):
        if d.is_dir() and any(d.glob("*.tar")):
            raise UserError(f"--out: {d} already holds shards; allowed: a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "out": str(out),
        "samples": n,
        "shards": _write_split(out, n, shards, seed, 0, 0, image_size),
        "seed": seed,
        "image_size": image_size,
        "eval_out": None,
        "eval_samples": 0,
        "eval_shards": [],
    }
    if holdout:
        eval_dir = out / "eval"
        eval_dir.mkdir(exist_ok=True)
        eval_shards = max(1, min(holdout, round(shards * holdout / n)))
        summary.update(
            eval_out=str(eval_dir),
            eval_samples=holdout,
            eval_shards=_write_split(eval_dir, holdout, eval_shards, seed, 1, n, image_size),
        )
    return summary
