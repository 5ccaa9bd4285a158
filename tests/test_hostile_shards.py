"""Hostile and unlucky shard input (issue 24 points 5 and 6): the shard index beside a tar is verified,
not trusted, and a brace pattern in data.shards is counted before it is expanded.

- an index that lies but looks well formed (captions shifted by one sample, swapped images, shifted
  keys, offsets into member data) fails the first read in one line naming the shard and the key: no
  batch pairs one sample's caption with another's image;
- a tar rewritten in another order with its size and mtime kept (`cp -p`, `rsync -t`) gets a fresh index
  (the stamp's fingerprint), and the batches pair each image with its own caption;
- malformed index values (negative, huge or off-block offsets, NaN, wrong dtypes, shapes or arrays, a
  lying .npy header, truncated files, legacy JSON nested too deep) are never a MemoryError,
  OverflowError, KeyError or RecursionError: the index is rebuilt from the tar, or one line where the
  tar cannot be read;
- brace patterns over 100,000 names or nested more than 8 deep are one line at submit (preflight) and
  in the trainer's loader, before braceexpand builds a single name.
Each case failed on the code before (a wrong pair trained, a stale index used, a traceback, memory
exhausted)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import braceexpand
import numpy as np
import pytest

from tests.test_data import HOLDOUT, SIZE, loader, take
from vltrain.common.errors import UserError
from vltrain.config import TrainConfig
from vltrain.data import shards
from vltrain.data.shards import ShardIndex, index_path, index_shard, iter_samples, read_index, resolve_shards
from vltrain.data.synth import write_synthetic_shards
from vltrain.tokenizer import train_tokenizer_from_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = write_synthetic_shards(root, 60, 3, seed=11, image_size=SIZE, holdout=HOLDOUT)
    return root, summary, train_tokenizer_from_shards(root, 150, root / "tok.model")


@pytest.fixture
def copy(data, tmp_path):
    """A private copy of the shards (tars, stats, indexes) that a test may damage."""
    root, _, _ = data
    out = tmp_path / "shards"
    out.mkdir()
    for p in root.iterdir():
        if p.is_file():
            shutil.copy2(p, out / p.name)
    return out


@pytest.fixture
def scanned(monkeypatch):
    """The tars whose headers were scanned (index_shard), by name."""
    seen: list[str] = []
    real = shards.index_shard

    def counting(path):
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(shards, "index_shard", counting)
    return seen


def captions_of(tar: Path) -> dict[str, str]:
    return {s["__key__"]: s["txt"].decode().strip() for s in iter_samples([tar])}


def stored(tar: Path) -> dict[str, np.ndarray]:
    with np.load(index_path(tar)) as z:
        return dict(z)


def assert_pairs_true(ld, tars: list[Path]) -> None:
    """Every sample of an evaluation pass carries its own caption (no flip at evaluation)."""
    truth = {k: v for t in tars for k, v in captions_of(t).items()}
    seen = 0
    for batch in ld:
        for key, caption in zip(batch["keys"], batch["captions"]):
            assert caption == truth[key], key
            seen += 1
    assert seen == sum(len(index_shard(t)) for t in tars)


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ================================================================ lies that look well formed: each read checks its header


def _roll_text(a):
    return a | {"text": np.roll(a["text"], -1)}  # sample i gets sample i+1's caption


def _roll_image(a):
    return a | {"image": np.roll(a["image"], 1)}


def _shift_keys(a):
    return a | {"key_data": a["key_data"] + 1}  # every key names the next sample


def _image_at_caption(a):
    return a | {"image": a["text"].copy()}  # the right key, the caption's member as its image


def _into_data(a):
    return a | {"image": a["image"] + 512}  # a block inside the image data, or the next member


@pytest.mark.parametrize(
    "lie, found",
    [
        (_roll_text, r"the member at offset \d+ is '\d+\.txt', not \d+\.txt"),
        (_roll_image, r"the member at offset \d+ is '\d+\.\w+', not \d+\.jpg\|"),
        (_shift_keys, r"the member at offset \d+ is '\d+\.\w+', not \d+\."),
        (_image_at_caption, r"the member at offset \d+ is '\d+\.txt', not \d+\.jpg\|jpeg\|png\|webp"),
        (_into_data, r"(no tar header before offset \d+|the member at offset \d+ is )"),
    ],
    ids=["captions-shifted-by-one", "images-rolled", "keys-shifted", "image-at-caption", "offset-into-data"],
)
@pytest.mark.parametrize("train", [True, False])
def test_a_lying_index_fails_the_first_read_naming_shard_and_key(data, copy, lie, found, train, scanned):
    """The lie is stamped as the real tool would (size, mtime and a fingerprint of the lie's own
    offsets), so it is loaded; the first batch fails instead of pairing wrong samples."""
    tar = resolve_shards(copy)[0]
    arrays = {k: v for k, v in stored(tar).items() if k not in ("version", "tar", "fingerprint")}
    assert shards.write_index(ShardIndex(str(tar), lie(arrays)), tar.stat())
    ld = loader(data, shards=tar, train=train, batch_size=4)
    assert scanned == []  # the lie was loaded, not rebuilt: the read must catch it
    with pytest.raises(UserError) as e:
        take(iter(ld), 1)
    text = one_line(e)
    assert text.startswith(f"data.shards: {tar}: sample '")
    assert re.search(found, text), text
    assert f"delete {index_path(tar).name} to rebuild it" in text


def test_a_tar_cut_short_during_a_run_is_one_line(data, copy):
    tar = resolve_shards(copy)[0]
    ld = loader(data, shards=tar, train=False, batch_size=4)
    last = max(int(ld.index[0].arrays["image"].max()), int(ld.index[0].arrays["text"].max()))
    os.truncate(tar, last + 1)  # the member whose data starts last loses all but one byte
    with pytest.raises(UserError) as e:
        take(iter(ld), 100)
    assert "runs past the end of the tar" in one_line(e)


# ================================================================ a tar rewritten in place keeps size and mtime


def _rewrite(tar: Path, order) -> None:
    """The same members in another sample order, its size and mtime restored (as `cp -p`, `rsync -t`)."""
    st = tar.stat()
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
        fmt = src.format
    groups: dict[str, list] = {}
    for m, body in members:
        groups.setdefault(m.name.split(".")[0], []).append((m, body))
    keys = order(list(groups))
    tmp = tar.with_name("rewrite.tmp")
    with tarfile.open(tmp, "w", format=fmt) as out:
        for k in keys:
            for m, body in groups[k]:
                out.addfile(m, io.BytesIO(body))
    assert tmp.stat().st_size == st.st_size  # precondition: the same size
    os.replace(tmp, tar)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    "order",
    [
        lambda keys: keys[::-1],
        lambda keys: keys[1:] + keys[:1],  # rotated by one: every sample's members move
        lambda keys: random.Random(5).sample(keys, len(keys)),
    ],
    ids=["reversed", "rotated-by-one", "shuffled"],
)
def test_a_tar_rewritten_with_size_and_mtime_kept_gets_a_fresh_index(data, copy, order, scanned):
    tars = resolve_shards(copy)
    before = tars[1].stat()
    _rewrite(tars[1], order)
    assert (tars[1].stat().st_size, tars[1].stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    ld = loader(data, shards=copy, train=False, batch_size=8)
    assert scanned == [tars[1].name]
    assert ld.index[1].keys == index_shard(tars[1]).keys  # the new order
    assert_pairs_true(ld, tars)
    assert read_index(tars[1], tars[1].stat()) == index_shard(tars[1])  # rewritten beside it


def test_a_swap_the_fingerprint_does_not_sample_fails_at_the_first_read(data, copy, scanned):
    """The fingerprint hashes at most 8 samples' headers; two neighbours between them swapped keep it,
    and the read of the first of them refuses the index."""
    tar = resolve_shards(copy)[0]
    n = len(index_shard(tar))
    k = shards.FINGERPRINT_SAMPLES
    picks = {i * (n - 1) // (k - 1) for i in range(k)}  # the samples the fingerprint hashes
    a = next(i for i in range(n - 1) if not {i, i + 1} & picks)
    _rewrite(tar, lambda keys: [*keys[:a], keys[a + 1], keys[a], *keys[a + 2 :]])
    scanned.clear()
    ld = loader(data, shards=tar, train=False, batch_size=4)
    assert scanned == []  # the stamp still matches: the old index is loaded
    with pytest.raises(UserError) as e:
        take(iter(ld), 100)
    assert one_line(e).startswith(f"data.shards: {tar}: sample '{ld.index[0].key(a)}': ")


# ================================================================ malformed index values: rebuilt, never a raw error


def _lying_npy_header() -> bytes:
    """A member whose .npy header claims 10^12 elements in a few bytes (np.load allocates first)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<u4", "fortran_order": False, "shape": (10**12,)})
    return buf.getvalue() + b"\0" * 64


MALFORMED = {
    "negative-offsets": lambda a: a | {"text": a["text"].astype(np.int64) - 1024},
    "huge-offsets": lambda a: a | {"image": a["image"].astype(np.uint64) + np.uint64(2**63)},
    "nan-offsets": lambda a: a | {"image": np.full(len(a["image"]), np.nan)},
    "float-offsets": lambda a: a | {"text": a["text"].astype(np.float32)},
    "offset-off-a-block": lambda a: a | {"image": a["image"] + 1},
    "offset-past-the-end": lambda a: a | {"text": a["text"] + np.uint32(10**9)},
    "two-dimensional": lambda a: a | {"image": a["image"].reshape(-1, 1)},
    "no-text-array": lambda a: {k: v for k, v in a.items() if k != "text"},
    "an-extra-array": lambda a: a | {"payload": np.zeros(3)},
    "shorter-text": lambda a: a | {"text": a["text"][:-1]},
    "key-width-a-million": lambda a: a | {"key_meta": np.array([0, 10**6], np.int64)},
    "negative-key-base": lambda a: a | {"key_meta": np.array([-(10**12), 9], np.int64)},
    "keys-past-their-width": lambda a: a | {"key_meta": np.array([10**9 - 1, 9], np.int64)},
    "key-meta-of-floats": lambda a: a | {"key_meta": np.array([np.nan, np.inf])},
    "byte-keys-without-ends": lambda a: a | {"key_meta": np.zeros(2, np.int64), "key_data": np.zeros(5, np.uint8)},
    "byte-keys-not-utf8": lambda a: (
        a
        | {
            "key_meta": np.zeros(2, np.int64),
            "key_data": np.full(len(a["image"]), 0xFF, np.uint8),
            "key_ends": np.arange(1, len(a["image"]) + 1, dtype=np.uint32),
        }
    ),
    "byte-key-ends-backwards": lambda a: (
        a
        | {
            "key_meta": np.zeros(2, np.int64),
            "key_data": np.full(len(a["image"]), 0x41, np.uint8),
            "key_ends": np.arange(len(a["image"]), 0, -1, dtype=np.uint32),
        }
    ),
    "a-million-samples": lambda a: {k: (np.resize(v, 10**6) if k != "key_meta" else v) for k, v in a.items()},
    "object-array": lambda a: a | {"text": np.array([{"x": 1}] * len(a["text"]), dtype=object)},
}


def _write_npz(tar: Path, arrays: dict[str, np.ndarray], raw: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(index_path(tar), "w") as z:
        for k, v in arrays.items():
            if v is None:
                continue
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(v), allow_pickle=True)
            z.writestr(k + ".npy", buf.getvalue())
        for k, v in (raw or {}).items():
            z.writestr(k + ".npy", v)


def _head(tar: Path) -> dict[str, np.ndarray]:
    """The head of a true index (version, stamp, fingerprint): the lie gets past the stamp."""
    return {k: v for k, v in stored(tar).items() if k in ("version", "tar", "fingerprint")}


def _body(tar: Path) -> dict[str, np.ndarray]:
    return {k: v for k, v in stored(tar).items() if k not in ("version", "tar", "fingerprint")}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_index_values_are_rebuilt_from_the_tar(data, copy, name, scanned):
    tar = resolve_shards(copy)[0]
    _write_npz(tar, _head(tar) | MALFORMED[name](_body(tar)))
    ld = loader(data, shards=copy, train=False, batch_size=8)
    assert scanned == [tar.name]
    assert ld.index[0] == index_shard(tar)
    assert_pairs_true(ld, resolve_shards(copy))
    assert read_index(tar, tar.stat()) == index_shard(tar)  # the true one written over the lie


@pytest.mark.parametrize(
    "damage",
    [
        lambda tar: _write_npz(tar, _head(tar) | _body(tar) | {"image": None}, raw={"image": _lying_npy_header()}),
        lambda tar: index_path(tar).write_bytes(index_path(tar).read_bytes()[: index_path(tar).stat().st_size // 2]),
        lambda tar: _write_npz(tar, _body(tar) | {"version": np.array("3"), "tar": _head(tar)["tar"]}),
        lambda tar: _write_npz(tar, _head(tar) | _body(tar) | {"tar": np.zeros((2, 2), np.int64)}),
        lambda tar: _write_npz(tar, {k: v for k, v in (_head(tar) | _body(tar)).items() if k != "fingerprint"}),
        lambda tar: _write_npz(tar, {f"a{i}": np.zeros(1) for i in range(50)}),
    ],
    ids=[
        "npy-header-claims-4-TB",
        "truncated-npz",
        "version-a-string",
        "stamp-of-another-shape",
        "no-fingerprint",
        "fifty-members",
    ],
)
def test_a_damaged_index_file_is_rebuilt_from_the_tar(data, copy, damage, scanned):
    tar = resolve_shards(copy)[0]
    damage(tar)
    ld = loader(data, shards=copy, train=False, batch_size=8)
    assert scanned == [tar.name] and ld.index[0] == index_shard(tar)
    assert_pairs_true(ld, resolve_shards(copy))


def _legacy(tar: Path, keys, members) -> None:
    st = tar.stat()
    doc = {"version": 1, "tar": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}, "keys": keys, "members": members}
    tar.with_name(tar.name + shards.LEGACY_SUFFIX).write_text(json.dumps(doc))
    index_path(tar).unlink()


@pytest.mark.parametrize(
    "members",
    [
        lambda n: [{"jpg": [-512, 10], "txt": [-1024, 10]}] * n,
        lambda n: [{"jpg": [10**30, 10], "txt": [512, 10]}] * n,
        lambda n: [{"jpg": [float("inf"), 1], "txt": [512, 1]}] * n,
        lambda n: [{"jpg": [512, 1], "txt": [1536, 1]}] * n,  # every sample at the same (wrong) members
    ],
    ids=["negative", "huge", "infinite", "all-at-one-offset"],
)
def test_a_lying_version_1_index_is_not_converted(data, copy, members, scanned):
    tar = resolve_shards(copy)[0]
    keys = list(index_shard(tar).keys)
    scanned.clear()
    _legacy(tar, keys, members(len(keys)))
    ld = loader(data, shards=copy, train=False, batch_size=8)
    if scanned:  # refused at load: rebuilt
        assert ld.index[0] == index_shard(tar)
        assert_pairs_true(ld, resolve_shards(copy))
    else:  # well formed enough to load: the first read refuses it
        with pytest.raises(UserError) as e:
            take(iter(ld), 100)
        assert f"data.shards: {tar}: sample '" in one_line(e)


def test_a_version_1_index_nested_too_deep_is_rebuilt(data, copy, scanned):
    tar = resolve_shards(copy)[0]
    keys = list(index_shard(tar).keys)
    scanned.clear()
    _legacy(tar, keys, [])
    legacy = tar.with_name(tar.name + shards.LEGACY_SUFFIX)
    legacy.write_text(legacy.read_text().replace('"members": []', '"members": ' + "[" * 100_000 + "]" * 100_000))
    ld = loader(data, shards=copy, train=False, batch_size=8)
    assert scanned == [tar.name] and ld.index[0] == index_shard(tar)


def test_a_malformed_index_beside_a_file_that_is_not_a_tar_is_one_line(data, copy):
    tar = resolve_shards(copy)[0]
    good = _head(tar) | MALFORMED["huge-offsets"](_body(tar))
    size = tar.stat().st_size
    tar.write_bytes(b"not a tar" * (size // 9) + b"\0" * (size % 9))
    _write_npz(tar, good)
    with pytest.raises(UserError) as e:
        loader(data, shards=copy, train=False)
    assert one_line(e).startswith(f"data.shards: {tar} is not a readable tar")


# ================================================================ brace patterns: bounded, counted before expanding


REFUSED = [
    ("/d/{0..10000000}.tar", "brace pattern expands to 10,000,001 names"),
    ("/d/{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}.tar", "brace pattern expands to 1,000,000 names"),
    ("/d/" + "{a,b}" * 40 + ".tar", "brace pattern expands to 1,099,511,627,776 names"),
    ("/d/{0.." + "9" * 200 + "}.tar", "brace pattern expands to at least 10^"),
    ("/d/" + "{a," * 30 + "b" + "}" * 30 + ".tar", "brace pattern nested 30 deep"),
    ("/d/" + "{" * 9 + "a,b" + "}" * 9 + ".tar", "brace pattern nested 9 deep"),
    ("/d/{1{2,3}.tar", "unbalanced braces in '/d/{1{2,3}.tar'"),
]
ALLOWED = "allowed: balanced braces at most 8 deep expanding to at most 100,000 names"


@pytest.fixture
def no_expansion(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("braceexpand called on a pattern that should have been refused")

    monkeypatch.setattr(braceexpand, "braceexpand", refuse)


@pytest.mark.parametrize("pattern, says", REFUSED, ids=[f"case{i}" for i in range(len(REFUSED))])
def test_a_brace_pattern_over_the_bound_is_one_line_at_submit(pattern, says, no_expansion):
    from clusterctl.runs import preflight

    cfg = TrainConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=pattern))
    (line,) = [p for p in preflight.data(cfg) if p.startswith("data.shards")]
    assert line.startswith(f"data.shards: {says}") and ALLOWED in line and "\n" not in line


@pytest.mark.parametrize("pattern, says", REFUSED, ids=[f"case{i}" for i in range(len(REFUSED))])
def test_a_brace_pattern_over_the_bound_is_one_line_in_the_trainer(data, pattern, says, no_expansion):
    with pytest.raises(UserError) as e:
        loader(data, shards=pattern)
    assert one_line(e).startswith(f"data.shards: {says}") and ALLOWED in str(e.value)


def _patterns():
    fixed = [
        "d/{00000..00003}.tar",
        "python{2.{5..7},3.{2,3}}",
        "{{a}}",
        "{a..c}x{07..10}",
        "{1..10..0}",
        "{4..1}",
        "{-3..3..2}",
        "{Z..a}",
        "{a,b,{c,d}}{}",
        "{a\\,b,c}",
        "x{{a,b}}",
        "}{",
        "{1..100000}",
        "{" * 8 + "a,b" + "}" * 8,
    ]
    rng = random.Random(0)
    return fixed + ["".join(rng.choice("{},ab1.\\") for _ in range(rng.randint(1, 10))) for _ in range(300)]


def test_the_count_is_braceexpands_own():
    """Counted with braceexpand's grammar: the same number of names it builds, the same unbalanced
    patterns refused (fixed cases and 300 seeded random ones)."""
    from vltrain.data.braces import check_brace_pattern

    for p in _patterns():
        try:
            want: int | str = len(list(braceexpand.braceexpand(p)))
        except braceexpand.UnbalancedBracesError:
            want = "unbalanced"
        try:
            got: int | str = check_brace_pattern(p)
        except UserError as e:
            got = "unbalanced" if "unbalanced" in str(e) else str(e)
        assert got == want, p


def test_a_pattern_at_the_bound_is_accepted(tmp_path):
    (tmp_path / "00001.tar").write_bytes(b"")
    from vltrain.data.braces import MAX_BRACE_NAMES, check_brace_pattern

    assert check_brace_pattern(str(tmp_path / "{1..100000}.tar")) == MAX_BRACE_NAMES
    assert resolve_shards(str(tmp_path / "{00001..00001}.tar")) == [tmp_path / "00001.tar"]


# ================================================================ true names the header check must not refuse


def _odd_tar(path: Path, fmt: int, keys: list[str], caption: bytes | None = None) -> None:
    with tarfile.open(path, "w", format=fmt) as t:
        for k in keys:
            for ext, body in (("jpg", _jpeg()), ("txt", caption or f"a red disk {k}".encode())):
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(body)
                t.addfile(info, io.BytesIO(body))


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt, keys",
    [
        (tarfile.PAX_FORMAT, ["a" * 120, "日本語キー", "x" * 95 + "é" * 10, "é" * 200, "sub/dir/000001"]),
        (tarfile.GNU_FORMAT, ["a" * 120, "日本語キー", "x" * 95 + "é" * 10, "é" * 200]),
        (tarfile.USTAR_FORMAT, ["d" * 80 + "/" + "b" * 90, "sub/000001"]),
    ],
    ids=["pax", "gnu", "ustar-prefix"],
)
def test_long_and_non_ascii_names_are_read_without_a_false_alarm(data, tmp_path, fmt, keys):
    """Names a ustar header cannot hold whole live in pax or GNU records before the header; the check
    reads the cut copy in the header and must not refuse a true index."""
    tar = tmp_path / "00000.tar"
    _odd_tar(tar, fmt, keys)
    ld = loader(data, shards=tar, train=False, batch_size=len(keys))
    (batch,) = take(iter(ld), 1)
    assert sorted(batch["keys"]) == sorted(keys)
    assert all(c == f"a red disk {k}" for k, c in zip(batch["keys"], batch["captions"]))
    index = index_shard(tar)
    with open(tar, "rb") as handle:  # and each of them refuses the next sample's key
        for i in range(len(index)):
            with pytest.raises(UserError, match="the member at offset"):
                shards.read_member(handle, index.text(i), str(tar), index.key((i + 1) % len(index)), ("txt",))


def test_a_caption_that_is_not_utf8_is_one_line(data, tmp_path):
    tar = tmp_path / "00000.tar"
    _odd_tar(tar, tarfile.PAX_FORMAT, ["000000001"], caption=b"caf\xe9")
    with pytest.raises(UserError) as e:
        take(iter(loader(data, shards=tar, train=False, batch_size=1)), 1)
    assert one_line(e).startswith(f"data.shards: {tar}: sample '000000001': its caption is not UTF-8")
