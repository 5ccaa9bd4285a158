"""`vltrain data digits`: scikit-learn's real handwritten digits as class-labelled shards. The held-out
split is stratified and never in training (keys and pixels), samples say their class four ways that
agree (.cls, .json, caption, the scan the key names), the same seed writes the same bytes, the written
train.toml loads (hflip off) and trains from another directory, and bad input or a missing
scikit-learn is one line with nothing written."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli, run_without
from vltrain.common.errors import UserError
from vltrain.data import digits
from vltrain.data.digits_recipe import CAPTION_TEMPLATES, CLASS_NAMES, DEFAULT_IMAGE_SIZE, PROMPT_TEMPLATES
from vltrain.data.shards import iter_samples, resolve_shards

HOLDOUT = 250


def read_split(d: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_samples(resolve_shards(d))}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "d"
    r = run_cli("data", "digits", "--out", str(out), "--holdout", str(HOLDOUT), "--seed", "3", prog="vltrain")
    assert r.returncode == 0, r.stderr
    return out, read_split(out), read_split(out / "eval")


def test_split_sizes_are_stratified_and_disjoint_in_keys_and_pixels(written):
    _, train, held = written
    _, labels = digits.load_digits_arrays()
    assert len(train) + len(held) == len(labels) and len(held) == HOLDOUT
    assert not set(train) & set(held)
    pixels = {
        k: hashlib.sha256(np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes()).digest() for k, s in train.items()
    }
    held_pixels = {
        hashlib.sha256(np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes()).digest() for s in held.values()
    }
    assert len(held_pixels) == HOLDOUT and not held_pixels & set(pixels.values())
    counts, held_counts = Counter(labels.tolist()), Counter(int(s["cls"]) for s in held.values())
    for c in range(10):  # each class holds out its share of HOLDOUT, to rounding
        assert abs(held_counts[c] - counts[c] * HOLDOUT / len(labels)) <= 1


def test_each_sample_names_its_class_four_ways_that_agree(written):
    _, train, held = written
    images, labels = digits.load_digits_arrays()
    for key, s in {**train, **held}.items():
        label, meta, text = int(s["cls"]), json.loads(s["json"]), s["txt"].decode()
        assert label == labels[int(key)] == meta["label"] and meta["class"] == CLASS_NAMES[label]
        assert text in {t.format(name=CLASS_NAMES[label], digit=label) for t in CAPTION_TEMPLATES}
        assert s["png"] == digits.glyph_png(images[int(key)], DEFAULT_IMAGE_SIZE)  # the key names its scan
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "RGB" and img.size == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    assert len({s["txt"] for s in train.values()}) > 30  # captions vary per image, not one per class


def test_glyph_keeps_the_scans_grey_levels():
    ink = np.arange(64, dtype=np.uint8).reshape(8, 8) % 17
    img = np.asarray(Image.open(io.BytesIO(digits.glyph_png(ink, 8))))
    assert (img[..., 0] == 255 - np.round(ink.astype(float) * 255 / 16)).all() and (img[..., 0] == img[..., 2]).all()


def test_classes_json_and_config_load_with_hflip_off(written):
    from vltrain.config import load_train_config

    out, _, _ = written
    for d in (out, out / "eval"):
        assert json.loads((d / "classes.json").read_text()) == {"classes": CLASS_NAMES, "templates": PROMPT_TEMPLATES}
    cfg = load_train_config(out / "train.toml")
    assert cfg.data.hflip is False
    assert Path(cfg.data.shards) == out and Path(cfg.data.eval_shards) == out / "eval"
    assert Path(cfg.data.shards).is_absolute()


def test_same_seed_same_bytes_other_seed_other_split(tmp_path, written):
    out, _, held = written
    digits.write_digits(tmp_path / "a", holdout=HOLDOUT, seed=3)
    for tar in [*out.glob("*.tar"), *out.glob("eval/*.tar")]:
        assert (tmp_path / "a" / tar.relative_to(out)).read_bytes() == tar.read_bytes()
    digits.write_digits(tmp_path / "b", holdout=HOLDOUT, seed=4)
    assert set(read_split(tmp_path / "b" / "eval")) != set(held)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--holdout", "5"], "--holdout: 5; allowed: 10 to 1787"),
        (["--holdout", "1790"], "--holdout: 1790; allowed: 10 to 1787"),
        (["--image-size", "30"], "--image-size: 30; allowed: 8 to 256, a multiple"),
        (["--image-size", "1024"], "--image-size: 1024; allowed: 8 to 256"),
    ],
)
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, args, said):
    r = run_cli("data", "digits", "--out", str(tmp_path / "d"), *args, prog="vltrain")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {said}"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_non_empty_out_is_refused_and_left_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="--out: .* is not empty; allowed: a new or empty directory"):
        digits.write_digits(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(digits, "write_config", broken)
    with pytest.raises(OSError):
        digits.write_digits(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_missing_scikit_learn_names_the_extra(tmp_path):
    out = tmp_path / "d"
    r = run_without("sklearn", tmp_path, "data", "digits", "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: vltrain data digits: needs sklearn, which is not installed; pip install '.[realdata]'"
    ]
    assert not out.exists()


@pytest.mark.slow
def test_written_config_trains_from_another_directory(tmp_path, written):
    out, _, _ = written
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli(
        "train", "--config", str(out / "train.toml"), "--run-dir", "run", "--set", "steps=3",
        cwd=elsewhere, prog="vltrain", timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((elsewhere / "run" / "eval.json").read_text())
    assert result["n"] == HOLDOUT  # the held-out shards were read through the trainer's loader
