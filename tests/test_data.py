"""Data: synthetic shards (deterministic, captions true to scenes), img2dataset layout, dedup, loader
order / rank split / worker independence / exact resume, transforms."""

from __future__ import annotations

import io
import itertools
import json
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vltrain.common.errors import UserError
from vltrain.config import DataConfig
from vltrain.data import synth
from vltrain.data.dedup import dedup_shards
from vltrain.data.loader import EpochOrder, ShardLoader
from vltrain.data.shards import ShardWriter, index_shard, iter_samples, resolve_shards
from vltrain.data.synth import write_synthetic_shards
from vltrain.data.transforms import ImageTransform, flip_caption, randaugment
from vltrain.tokenizer import train_tokenizer_from_shards

N, SHARDS, HOLDOUT, SIZE = 121, 3, 24, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = write_synthetic_shards(root, N, SHARDS, seed=7, image_size=SIZE, holdout=HOLDOUT)
    tok = train_tokenizer_from_shards(root, 200, root / "tok.model")
    return root, summary, tok


def loader(data, **kw):
    root, _, tok = data
    args = dict(
        rank=0,
        world_size=1,
        batch_size=8,
        seed=3,
        image_size=SIZE,
        tokenizer=tok,
        max_len=48,
        train=True,
        data_cfg=DataConfig(shuffle_buffer=50),
    )
    shards = kw.pop("shards", root)
    args.update(kw)
    return ShardLoader(str(shards), **args)


def take(it, n):
    return list(itertools.islice(it, n))


def same_batches(a, b):
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x["images"], y["images"])
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["attention_mask"], y["attention_mask"])
        assert torch.equal(x["mlm_draws"], y["mlm_draws"])


# ---------------------------------------------------------------- synthetic data


def _words(options):
    return "|".join(sorted((re.escape(o) for o in options), key=len, reverse=True))


def parse_caption(text: str) -> tuple[list[tuple], str | None]:
    """Groups (count, size, colour, shape, region) and the background named by a caption."""
    inverse = lambda table: {w: k for k, ws in table.items() for w in ws}
    colours, sizes = inverse(synth.COLOUR_WORDS), inverse(synth.SIZE_WORDS)
    counts = inverse(synth.COUNT_WORDS) | {"an": 1}
    shapes = {w: k for k, pairs in synth.SHAPE_WORDS.items() for pair in pairs for w in pair}
    regions = {p: k for k, (_, ps) in synth.REGIONS.items() for p in ps}
    group = re.compile(
        rf"\b({_words(counts)}) (?:({_words(sizes)}) )?({_words(colours)}) ({_words(shapes)}) ({_words(regions)})\b"
    )
    found = [
        (counts[c], sizes.get(s, "medium"), colours[col], shapes[sh], regions[r])
        for c, s, col, sh, r in group.findall(text)
    ]
    bg = re.search(rf"\b({_words(inverse(synth.BACKGROUND_WORDS))}) (?:background|backdrop|canvas|paper)\b", text)
    return found, inverse(synth.BACKGROUND_WORDS)[bg.group(1)] if bg else None


def test_synth_is_deterministic_and_seeded(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", 20, 2, seed=1, image_size=32)
    b = write_synthetic_shards(tmp_path / "b", 20, 2, seed=1, image_size=32)
    c = write_synthetic_shards(tmp_path / "c", 20, 2, seed=2, image_size=32)
    for pa, pb, pc in zip(a["shards"], b["shards"], c["shards"]):
        with open(pa, "rb") as fa, open(pb, "rb") as fb, open(pc, "rb") as fc:
            bytes_a = fa.read()
            assert bytes_a == fb.read()
            assert bytes_a != fc.read()
    # A sample does not depend on how the set is cut into shards.
    d = write_synthetic_shards(tmp_path / "d", 20, 5, seed=1, image_size=32)
    assert [s["jpg"] for s in iter_samples(resolve_shards(d["out"]))] == [
        s["jpg"] for s in iter_samples(resolve_shards(a["out"]))
    ]


def test_captions_and_images_match_scenes(data):
    import webdataset as wds

    root, _, _ = data
    seen = 0
    for sample in wds.WebDataset(str(root / "{00000..00002}.tar"), shardshuffle=False).decode("pil"):
        meta, text = sample["json"], sample["txt"]
        scene = meta["scene"]
        groups, background = parse_caption(text)
        assert sorted(groups) == sorted(
            (g["count"], g["size"], g["colour"], g["shape"], g["region"]) for g in scene["groups"]
        ), text
        assert background in (None, scene["background"]), text
        for g in scene["groups"]:
            assert len(g["cells"]) == g["count"]
            assert all(tuple(c) in synth.REGIONS[g["region"]][0] for c in g["cells"])
        image = np.asarray(sample["jpg"], dtype=np.int32)
        assert image.shape == (SIZE, SIZE, 3)
        for obj in scene["objects"]:  # the pixel at every object's centre has the object's colour
            pixel = image[int(obj["cy"]), int(obj["cx"])]
            assert np.abs(pixel - np.array(synth.COLOURS[obj["colour"]])).max() < 70, (text, obj, pixel)
        seen += 1
    assert seen == N


def test_shards_have_img2dataset_layout(data):
    root, summary, _ = data
    assert [p.name for p in resolve_shards(root)] == ["00000.tar", "00001.tar", "00002.tar"]
    assert summary["samples"] == N and summary["eval_samples"] == HOLDOUT
    keys = []
    for path in resolve_shards(root):
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len(names) % 3 == 0
        for i in range(0, len(names), 3):
            key = names[i].split(".")[0]
            assert re.fullmatch(r"\d{9}", key) and names[i : i + 3] == [f"{key}.jpg", f"{key}.json", f"{key}.txt"]
            keys.append(key)
        stats = json.loads(path.with_name(path.stem + "_stats.json").read_text())
        assert stats["count"] == len(names) // 3
    assert keys == [f"{i:09d}" for i in range(N)]
    sample = next(iter_samples(resolve_shards(root)))
    meta = json.loads(sample["json"])
    assert meta["key"] == sample["__key__"] and meta["caption"] == sample["txt"].decode()
    assert (meta["width"], meta["height"]) == (SIZE, SIZE)
    eval_keys = [s["__key__"] for s in iter_samples(resolve_shards(summary["eval_out"]))]
    assert eval_keys == [f"{i:09d}" for i in range(N, N + HOLDOUT)]


def test_synth_refuses_bad_requests(tmp_path):
    with pytest.raises(UserError, match="--shards"):
        write_synthetic_shards(tmp_path / "x", 3, 5, seed=0)
    write_synthetic_shards(tmp_path / "y", 4, 1, seed=0, image_size=16)
    with pytest.raises(UserError, match="already holds shards"):
        write_synthetic_shards(tmp_path / "y", 4, 1, seed=0, image_size=16)


# ---------------------------------------------------------------- dedup


def test_dedup_removes_an_injected_exact_duplicate(data, tmp_path):
    root, _, _ = data
    src = tmp_path / "in"
    src.mkdir()
    for p in resolve_shards(root):
        shutil.copy(p, src / p.name)
    original = list(iter_samples(resolve_shards(src)))
    victim = original[17]
    with ShardWriter(src / "00003.tar") as w:
        w.write({"__key__": "999999999", "jpg": victim["jpg"], "txt": b"another caption", "json": b"{}"})
        w.write({"__key__": "999999998", "jpg": original[0]["jpg"][:-2] + b"\x00\xd9", "txt": b"x", "json": b"{}"})
    summary = dedup_shards(src, tmp_path / "out")
    assert summary["samples"] == N + 2 and summary["removed"] == 1 and summary["kept"] == N + 1
    assert summary["duplicates"] == [{"key": "999999999", "same_as": victim["__key__"], "shard": "00003.tar"}]
    kept = {s["__key__"]: s for s in iter_samples(resolve_shards(tmp_path / "out"))}
    assert set(kept) == {s["__key__"] for s in original} | {"999999998"}
    assert kept[victim["__key__"]]["txt"] == victim["txt"]  # the first occurrence is the one kept
    with pytest.raises(UserError, match="--out"):
        dedup_shards(src, src)


# ---------------------------------------------------------------- loader


@pytest.mark.parametrize("block", [0, 1, 40, 10_000])
def test_epoch_order_is_a_permutation(block):
    sizes = [5, 0, 7, 3, 9]
    order = EpochOrder(sizes, seed=1, epoch=2, shuffle=True, block_samples=block)
    items = [order[i] for i in range(len(order))]
    assert sorted(items) == sorted((s, i) for s, n in enumerate(sizes) for i in range(n))
    if block <= 1:  # a shard's samples stay together; 0 also keeps their tar order
        runs = [s for s, _ in itertools.groupby(shard for shard, _ in items)]
        assert len(runs) == len(set(runs))
    if block == 0:
        assert all(a[1] + 1 == b[1] for a, b in zip(items, items[1:]) if a[0] == b[0])
    again = EpochOrder(sizes, seed=1, epoch=2, shuffle=True, block_samples=block)
    assert items == [again[i] for i in range(len(again))]
    if block > 1:
        other = EpochOrder(sizes, seed=1, epoch=3, shuffle=True, block_samples=block)
        assert items != [other[i] for i in range(len(other))]


def test_ranks_split_the_shards_and_take_equal_steps(data):
    """Training gives shard i to rank i mod W: a rank's samples come from its own shards only, ranks are
    disjoint, and every rank takes the smallest rank's count per epoch (here rank 1's one shard), a
    different part of the larger rank's samples each epoch."""
    root, _, _ = data
    shard_keys = [set(index_shard(t).keys) for t in resolve_shards(root)]  # 41, 40, 40 samples
    per_rank = min(len(shard_keys[0]) + len(shard_keys[2]), len(shard_keys[1]))
    epochs = []
    for epoch in range(2):
        keys = []
        for rank in range(2):
            ld = loader(data, rank=rank, world_size=2, batch_size=per_rank)
            assert ld.samples_per_epoch == per_rank and ld.num_samples == N
            ld.load_state_dict(ld.state_dict() | {"epoch": epoch})
            keys.append(next(iter(ld))["keys"])
        assert len(set(keys[0])) == len(set(keys[1])) == per_rank
        assert set(keys[0]) <= shard_keys[0] | shard_keys[2] and set(keys[1]) == shard_keys[1]
        epochs.append(keys)
    assert epochs[0] != epochs[1] and set(epochs[0][0]) != set(epochs[1][0])  # another tail dropped


def test_workers_do_not_change_the_batches(data):
    cfg = DataConfig(shuffle_buffer=30, randaugment=True)
    a = take(iter(loader(data, data_cfg=cfg, workers=0)), 20)  # 160 samples: crosses an epoch boundary
    b = take(iter(loader(data, data_cfg=cfg, workers=2)), 20)
    same_batches(a, b)
    assert len(set([k for x in a for k in x["keys"]][:N])) == N  # an epoch holds every sample once


def test_mlm_draws_follow_the_sample_not_the_batch_or_the_worker():
    """A sample's MLM random numbers are a function of (seed, epoch, key) at its real tokens: the same
    in another batch, at another padding and from another worker; another epoch or seed, others."""
    from vltrain.data.loader import mlm_draws

    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    a = mlm_draws([[3, 0, 3, 11], [3, 0, 3, 12]], mask)
    assert a.shape == (3, 2, 5) and a.dtype == torch.float32 and bool((a[:, 0, 3:] == 1).all())
    alone = mlm_draws([[3, 0, 3, 11]], mask[:1, :3])  # another batch, padded to 3
    assert torch.equal(alone[:, 0], a[:, 0, :3])
    assert not torch.equal(mlm_draws([[3, 1, 3, 11]], mask[:1])[:, 0, :3], a[:, 0, :3])  # another epoch
    assert float(a.min()) >= 0 and float(a[:, 1].max()) < 1


def test_masking_uses_the_draws_it_is_given():
    from vltrain.model.losses import mask_tokens

    ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0]])  # bos, 4 words, eos, pad
    attn = ids != 0
    u = torch.tensor([0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
    roll = torch.tensor([0.1, 0.5, 0.85, 0.95, 0.1, 0.1, 0.1])
    rnd = torch.full((7,), 0.5)
    kw = dict(mask_prob=0.15, mask_id=4, vocab_size=105, special_ids=(0, 1, 2, 3, 4))
    masked, labels = mask_tokens(ids, attn, **kw, draws=torch.stack([u, roll, rnd])[:, None])
    # the 4 words chosen (u < 0.15), rolls 0.5, 0.85, 0.95, 0.1: <mask>, random (5 + 0.5 x 100), kept,
    # <mask>; bos, eos and pad never
    assert masked.tolist() == [[2, 4, 55, 12, 4, 3, 0]]
    assert labels.tolist() == [[-100, 10, 11, 12, 13, -100, -100]]


def test_workers_do_not_change_the_process_rng(data):
    """Starting the workers draws their base seed from the loader's own generator: the process's torch
    RNG (MIM's masks, anything the trainer draws) is where it was, with 0 workers or 2."""
    torch.manual_seed(0)
    take(iter(loader(data, workers=2)), 2)
    after_workers = torch.rand(3)
    torch.manual_seed(0)
    take(iter(loader(data, workers=0)), 2)
    assert torch.equal(after_workers, torch.rand(3))


@pytest.mark.parametrize("stop", [5, 15, 16])  # mid-epoch, the batch that straddles the boundary, after it
def test_resume_gives_exactly_the_remaining_batches(data, stop):
    full = take(iter(loader(data)), 24)
    first = loader(data)
    it = iter(first)
    head = take(it, stop)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == divmod(stop * 8, N)
    resumed = loader(data, workers=2 if stop == 15 else 0)
    resumed.load_state_dict(state)
    same_batches(head + take(iter(resumed), 24 - stop), full)


def test_state_from_another_setup_is_refused(data):
    state = loader(data).state_dict()
    with pytest.raises(UserError, match="world_size"):
        loader(data, world_size=2).load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        loader(data, seed=4).load_state_dict(state)


def test_eval_is_one_pass_over_every_sample(data):
    _root, summary, _ = data
    keys = []
    for rank in range(2):
        ld = loader(data, shards=summary["eval_out"], train=False, rank=rank, world_size=2, batch_size=5)
        batches = list(ld)
        assert [len(b["keys"]) for b in batches] == [5, 5, 2]
        assert next(iter(ld))["keys"] == batches[0]["keys"]  # a second pass starts again
        keys.append([k for b in batches for k in b["keys"]])
    assert sorted(keys[0] + keys[1]) == [f"{i:09d}" for i in range(N, N + HOLDOUT)]
    assert keys[0] == sorted(keys[0])


def test_flip_changes_image_and_caption_together(data):
    root, _, _ = data
    raw = {s["__key__"]: s for s in iter_samples(resolve_shards(root))}
    eval_tf = ImageTransform(SIZE, train=False)
    batch = next(iter(loader(data, batch_size=N, data_cfg=DataConfig(random_crop=False, hflip=True))))
    flipped = 0
    for key, image, text in zip(batch["keys"], batch["images"], batch["captions"]):
        original = raw[key]["txt"].decode()
        plain, _ = eval_tf(raw[key]["jpg"], original, np.random.default_rng(0))
        if np.array_equal(image.numpy(), plain):
            assert text == original
        else:
            mirrored, _ = eval_tf(_mirror(raw[key]["jpg"]), original, np.random.default_rng(0))
            assert np.allclose(image.numpy(), mirrored, atol=1e-5) and text == flip_caption(original)
            flipped += 1
    assert 0 < flipped < N


def _mirror(jpg: bytes) -> bytes:
    buf = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(jpg)).convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()


def test_batch_matches_the_contract(data):
    _, _, tok = data
    batch = next(iter(loader(data, max_len=12)))
    assert batch["images"].dtype == torch.float32 and batch["images"].shape == (8, 3, SIZE, SIZE)
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.bool
    assert batch["input_ids"].shape[1] <= 12 and batch["input_ids"][:, 0].eq(tok.bos_id).all()
    assert -3 < float(batch["images"].mean()) < 3 and len(batch["keys"]) == 8


def test_flip_caption_and_randaugment():
    assert (
        flip_caption("a red disk on the left and a star in the top right corner")
        == "a red disk on the right and a star in the top left corner"
    )
    img = Image.new("RGB", (32, 32), (200, 10, 10))
    out = [np.asarray(randaugment(img, np.random.default_rng(s))) for s in (5, 5)]
    assert out[0].shape == (32, 32, 3) and np.array_equal(out[0], out[1])


def test_bad_shard_spec_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no .tar shards"):
        resolve_shards(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        resolve_shards(str(tmp_path / "{00000..00001}.tar"))
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(UserError, match="not a readable tar"):
        index_shard(tmp_path / "bad.tar")
