"""`vltrain data photos`: every hand-written caption entry names a scikit-image photo that loads
offline, the shards hold what photo_captions.json says, held-out crops are not training crops (box and
pixels), the same seed writes the same bytes, the written config's tokenizer fits the captions, and bad
flags or a missing scikit-image are one line with nothing written."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli, run_without
from vltrain.data import photos
from vltrain.data.shards import iter_samples, resolve_shards

SIZE, CROPS = 16, 3


def read_split(d: Path) -> list[dict]:
    return [{**s, "meta": json.loads(s["json"])} for s in iter_samples(resolve_shards(d))]


def pixels(s: dict) -> bytes:
    return hashlib.sha256(np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes()).digest()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos") / "p"
    summary = photos.write_photos(out, image_size=SIZE, crops=CROPS, seed=5)
    return out, summary, read_split(out), read_split(out / "eval")


def test_every_caption_entry_names_a_photo_that_loads():
    captions = photos.load_captions()
    assert len(captions) >= 20
    for name, entry in captions.items():
        img = photos.load_photo(name)
        assert img is not None and img.mode == "RGB" and min(img.size) >= 100, name
        assert len(entry["train"]) >= 2 and entry["heldout"] not in entry["train"], name
    assert photos.load_photo("no_such_photo") is None


def test_shards_hold_what_the_json_says(written):
    _, summary, train, held = written
    captions = photos.load_captions()
    assert summary["skipped"] == [] and summary["photos"] == sorted(captions)
    assert Counter(s["meta"]["photo"] for s in train) == dict.fromkeys(captions, CROPS)
    assert Counter(s["meta"]["photo"] for s in held) == dict.fromkeys(captions, 1)
    for s in [*train, *held]:
        name, text = s["meta"]["photo"], s["txt"].decode()
        assert text == s["meta"]["caption"]
        assert text in captions[name]["train"] if s["meta"]["split"] == "train" else text == captions[name]["heldout"]
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    assert len({s["__key__"] for s in [*train, *held]}) == len(train) + len(held)


def test_held_out_crops_are_not_training_crops(written):
    _, _, train, held = written
    boxes, seen = defaultdict(set), {pixels(s) for s in train}
    for s in train:
        boxes[s["meta"]["photo"]].add(tuple(s["meta"]["box"]))
    for s in held:
        assert tuple(s["meta"]["box"]) not in boxes[s["meta"]["photo"]]
        assert pixels(s) not in seen


def test_boxes_lie_inside_the_photo_at_their_share():
    rng = np.random.default_rng(0)
    for w, h in ((451, 300), (200, 200), (384, 191)):
        for left, top, right, bottom in [*photos.random_boxes(w, h, 50, rng), photos.centre_box(w, h)]:
            side = right - left
            assert side == bottom - top and left >= 0 and right <= w and top >= 0 and bottom <= h
            assert photos.CROP_SHARE[0] - 0.01 <= side / min(w, h) <= photos.CROP_SHARE[1] + 0.01


def test_same_seed_same_bytes_and_the_tokenizer_fits(tmp_path, written):
    from vltrain.config import load_train_config
    from vltrain.tokenizer import train_tokenizer_from_shards

    out, _, _, _ = written
    photos.write_photos(tmp_path / "again", image_size=SIZE, crops=CROPS, seed=5)
    for tar in [*out.glob("*.tar"), *out.glob("eval/*.tar")]:
        assert (tmp_path / "again" / tar.relative_to(out)).read_bytes() == tar.read_bytes()
    cfg = load_train_config(out / "train.toml")
    assert cfg.data.hflip is False and Path(cfg.data.shards) == out and Path(cfg.data.eval_shards) == out / "eval"
    tok = train_tokenizer_from_shards(cfg.data.shards, photos.VOCAB_SIZE, tmp_path / "tok.model")
    assert tok.vocab_size == photos.VOCAB_SIZE


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--crops", "0"], "--crops: 0; allowed: 1 to 1000"),
        (["--image-size", "30"], "--image-size: 30; allowed: 8 to 512, a multiple of 4"),
    ],
)
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, args, said):
    r = run_cli("data", "photos", "--out", str(tmp_path / "p"), *args, prog="vltrain")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {said}"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_scikit_image_names_the_extra(tmp_path):
    out = tmp_path / "p"
    r = run_without("skimage", tmp_path, "data", "photos", "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: vltrain data photos: needs skimage, which is not installed; pip install '.[realdata]'"
    ]
    assert not out.exists()
