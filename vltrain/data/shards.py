"""WebDataset shards in img2dataset's layout: finding them, writing them atomically, reading them.

A shard is a tar of samples `KEY.jpg`, `KEY.txt`, `KEY.json` (img2dataset also writes
`NNNNN_stats.json` beside each tar; we do too). Writing and streaming go through webdataset
(imported lazily: it imports torch). Random access for the training loader goes through a tar
*index* (member offsets read from the tar headers with the standard library): webdataset 1.0's
readers are sequential streams, while exact resume and worker-independent batches need to read
sample k of a shard without reading samples 0..k-1 of it.

The index of `NAME.tar` is kept beside it as `NAME.tar.idx.npz`, keyed on the tar's size and mtime:
written when a shard is written, built on first read when missing or stale (a version-1
`NAME.tar.idx.json` is converted), and never trusted once the tar changed. Where the directory is
read-only the loader scans the headers at each start. In memory an index is a few arrays, 12 bytes a
sample, and a training rank loads only its own shards' (rank_index; docs/data.md).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vltrain.common.atomic import atomic_path, atomic_write
from vltrain.common.errors import UserError
from vltrain.data.index_math import rank_shards

if TYPE_CHECKING:
    import numpy as np  # imported where used: preflight (submit) resolves shards without numpy

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # same split as webdataset's base_plus_ext


def resolve_shards(spec: str | Path, what: str = "data.shards") -> list[Path]:
    """A directory (its *.tar, sorted), a brace pattern like dir/{00000..00003}.tar, or one tar file."""
    text = str(spec)
    allowed = "allowed: a directory of .tar shards, a brace pattern like dir/{00000..00003}.tar, or a .tar file"
    if not text:
        raise UserError(f"{what}: not set; {allowed}")
    try:
        return _resolve(text, what, allowed)
    except OSError as e:  # a name too long for the filesystem, a loop of links, ...
        raise UserError(f"{what}: {text[:100]!r} cannot be read ({e.strerror}); {allowed}") from None


def _resolve(text: str, what: str, allowed: str) -> list[Path]:
    path = Path(text)
    if path.is_dir():
        paths = sorted(path.glob("*.tar"))
        if not paths:
            raise UserError(f"{what}: {text} holds no .tar shards; {allowed}")
        return paths
    if "{" in text:
        import braceexpand  # webdataset's own dependency; tiny and torch-free

        check_brace_pattern(text, what)  # before expanding: braceexpand builds every name at once
        paths = [Path(p) for p in braceexpand.braceexpand(text)]
    else:
        paths = [path]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{what}: {missing[0]} does not exist ({len(missing)} missing); {allowed}")
    return paths


MAX_BRACE_NAMES = 100_000  # shard names a brace pattern may expand to (LAION-5B is ~230,000 shards of 10,000)
MAX_BRACE_DEPTH = 8  # braces inside braces
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")  # braceexpand's own grammar
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")


def check_brace_pattern(text: str, what: str = "data.shards") -> int:
    """The number of names `text` expands to, counted without expanding it (braceexpand materialises
    every name of a group at once: `{0..10000000}` is 10M strings, nested groups multiply); one line
    when over MAX_BRACE_NAMES, deeper than MAX_BRACE_DEPTH or unbalanced."""
    allowed = f"allowed: balanced braces at most {MAX_BRACE_DEPTH} deep expanding to at most {MAX_BRACE_NAMES:,} names"
    depth = deepest = i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 1
        elif text[i] in "{}":
            depth += 1 if text[i] == "{" else -1
            deepest = max(deepest, depth)
        i += 1
    if deepest > MAX_BRACE_DEPTH:
        raise UserError(f"{what}: brace pattern nested {deepest} deep; {allowed}")
    try:
        count = _count_pattern(text)
    except ValueError:
        raise UserError(f"{what}: unbalanced braces in {text[:80]!r}; {allowed}") from None
    if count > MAX_BRACE_NAMES:
        shown = f"{count:,}" if count < 10**15 else f"at least 10^{len(str(count)) - 1}"
        raise UserError(f"{what}: brace pattern expands to {shown} names; {allowed}")
    return count


def _groups(text: str, split: bool) -> list[tuple[int, int]] | None:
    """(start, end) of the top-level brace groups of `text` (split=False), or of its comma-separated
    items (split=True; None when it has no top-level comma); backslash escapes as braceexpand's."""
    out, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth, start = depth + 1, (i if depth == 0 and not split else start)
        elif c == "}":
            depth -= 1
            if depth == 0 and not split:
                out.append((start, i))
        elif c == "," and depth == 0 and split:
            out.append((start, i))
            start = i + 1
        i += 1
    if split:
        return [*out, (start, len(text))] if out and depth == 0 else None
    if depth != 0:
        raise ValueError(f"unbalanced braces: {text}")
    return out


def _count_pattern(text: str) -> int:
    """Names braceexpand makes of `text`: the product of its top-level groups' counts (a literal is 1)."""
    count = 1
    for start, end in _groups(text, split=False) or ():
        count = min(count * _count_expression(text[start + 1 : end]), 10**40)
    return count


def _int(digits: str) -> int:
    """int() of a range bound, without Python's 4,300-digit limit: a bound of over 100 digits is +-10^100."""
    if len(digits.lstrip("-0")) > 100:
        return -(10**100) if digits.startswith("-") else 10**100
    return int(digits)


def _count_expression(expr: str) -> int:
    if m := _INT_RANGE.match(expr):
        step = _int(m.group(3) or "1") or 1
        return abs(_int(m.group(2)) - _int(m.group(1))) // step + 1
    if m := _CHAR_RANGE.match(expr):
        import braceexpand

        step = int(m.group(3) or 1) or 1
        a, b = (braceexpand.alphabet.index(c) for c in (m.group(1), m.group(2)))
        return abs(b - a) // step + 1
    items = _groups(expr, split=True)
    if items is None:  # not a sequence: the braces stay, the inside is a pattern
        return _count_pattern(expr)
    return sum(_count_pattern(expr[s:e]) for s, e in items)


class ShardWriter:
    """Write one shard with webdataset's TarWriter under a temporary name, renamed when complete.

    mtime is fixed so the same samples give byte-identical tars (reproducible synthetic data).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0

    def __enter__(self) -> ShardWriter:
        import webdataset as wds  # type: ignore[import-untyped]  # webdataset ships no type hints (no py.typed)

        self._target = atomic_path(self.path, mode=None)
        self._file = open(self._target.__enter__(), "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0, mode=0o644)
        return self

    def write(self, sample: dict[str, Any]) -> None:
        self._tar.write(sample)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._tar.close()
        self._file.close()
        self._target.__exit__(exc_type, exc, tb)  # renames the tar, or removes it after an error
        if exc_type is not None:
            return
        shard_index(self.path)  # the index beside it, so that the first training start need not scan it
        stats = {"count": self.count, "successes": self.count, "failed_to_download": 0, "failed_to_resize": 0}
        stats_path = self.path.with_name(self.path.stem + "_stats.json")
        atomic_write(stats_path, json.dumps(stats, indent=1) + "\n", mode=None)


def iter_samples(paths: list[Path], select: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Stream samples (raw bytes per extension, plus __key__ and __url__) through webdataset, in order.

    `select` filters member names before their data is read (e.g. only .txt for a caption corpus).
    """
    from webdataset.tariterators import tarfile_samples  # type: ignore[import-untyped]  # no py.typed

    yield from tarfile_samples(({"url": str(p)} for p in paths), select_files=select)


_U32 = 2**32


def _narrow(values: Any) -> np.ndarray:
    """Non-negative integers as uint32 where they fit (tars under 4 GiB, short key ranges), else uint64."""
    import numpy as np

    a = np.asarray(values, dtype=np.uint64)
    return a.astype(np.uint32) if not len(a) or int(a.max()) < _U32 else a


def _encode_keys(keys: list[str]) -> dict[str, np.ndarray]:
    """img2dataset's keys (decimal digits of one width) as a base and deltas; any other keys as UTF-8
    bytes with end offsets. key_meta = [base, width]; width 0 means the bytes form."""
    import numpy as np

    width = len(keys[0]) if keys else 0
    if keys and 0 < width <= 18 and all(len(k) == width and k.isascii() and k.isdigit() for k in keys):
        nums = np.array([int(k) for k in keys], dtype=np.int64)
        base = int(nums.min())
        return {"key_meta": np.array([base, width], np.int64), "key_data": _narrow(nums - base)}
    raw = [k.encode() for k in keys]
    return {
        "key_meta": np.zeros(2, np.int64),
        "key_data": np.frombuffer(b"".join(raw), np.uint8).copy(),
        "key_ends": _narrow(np.cumsum([len(r) for r in raw], dtype=np.uint64)),
    }


class ShardIndex:
    """Where each sample of one tar lies, as arrays (no Python object per sample): the data offsets of
    its image and text members (their sizes are read from the tar header just before the data) and its
    key (img2dataset's digits as deltas from a base, other keys as UTF-8 bytes): 12 bytes a sample for
    shards under 4 GiB (vltrain.data.index_math). The arrays are read-only: forked loader workers
    share their pages and never write to them (numpy keeps refcounts in the array object, not the data)."""

    __slots__ = ("_base", "_width", "arrays", "path")

    def __init__(self, path: str, arrays: dict[str, np.ndarray]):
        n = len(arrays["image"])
        if len(arrays["text"]) != n or len(arrays["key_meta"]) != 2:
            raise ValueError(f"{path}: index arrays of different lengths")
        self.path, self.arrays = path, arrays
        self._base, self._width = (int(v) for v in arrays["key_meta"])
        if (len(arrays["key_data"]) if self._width else len(arrays["key_ends"])) != n:
            raise ValueError(f"{path}: index keys of another length")
        for a in arrays.values():
            a.flags.writeable = False

    @classmethod
    def from_members(cls, path: str, keys: list[str], image: list[int], text: list[int]) -> ShardIndex:
        arrays = {"image": _narrow(image), "text": _narrow(text)}
        return cls(path, arrays | _encode_keys(keys))

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def key(self, i: int) -> str:
        if self._width:
            return f"{self._base + int(self.arrays['key_data'][i]):0{self._width}d}"
        ends = self.arrays["key_ends"]
        return bytes(self.arrays["key_data"][int(ends[i - 1]) if i else 0 : int(ends[i])]).decode()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key (builds one str per sample: for tools and tests, not the loader)."""
        return tuple(self.key(i) for i in range(len(self)))

    def image(self, i: int) -> int:
        """The data offset of sample i's image (the first of IMAGE_EXTS it has; PIL reads the format)."""
        return int(self.arrays["image"][i])

    def text(self, i: int) -> int:
        return int(self.arrays["text"][i])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def __eq__(self, other: object) -> bool:
        import numpy as np

        return (
            isinstance(other, ShardIndex)
            and self.path == other.path
            and self.arrays.keys() == other.arrays.keys()
            and all(np.array_equal(a, other.arrays[k]) for k, a in self.arrays.items())
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container: compared by value only


def index_shard(path: str | Path) -> ShardIndex:
    """Read only the tar headers (no member data) and group members by key, like webdataset does."""
    samples: list[tuple[str, dict[str, int]]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                m = _KEY_EXT.match(info.name)
                if not info.isreg() or not m or ("/" not in info.name and info.name.startswith("__")):
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = info.offset_data
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"data.shards: {path} is not a readable tar ({e}); allowed: WebDataset .tar shards") from None
    return _from_samples(str(path), samples)


def _from_samples(path: str, samples: Iterable[tuple[str, dict[str, int]]]) -> ShardIndex:
    """Samples (key, ext -> data offset) in tar order to an index of those with a caption and an image
    (the first of IMAGE_EXTS present)."""
    keys: list[str] = []
    image: list[int] = []
    text: list[int] = []
    for key, members in samples:
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if "txt" in members and ext is not None:
            keys.append(key)
            image.append(members[ext])
            text.append(members["txt"])
    return ShardIndex.from_members(path, keys, image, text)


INDEX_VERSION = 2
INDEX_SUFFIX = ".idx.npz"
LEGACY_SUFFIX = ".idx.json"  # version 1: keys and per-member [offset, size] lists in JSON; converted at load


def index_path(path: str | Path) -> Path:
    """Where the index of a tar is kept: beside it, `NAME.tar.idx.npz`."""
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns]


def read_index(path: str | Path, st: os.stat_result) -> ShardIndex | None:
    """The index kept beside `path` if it was made from the tar as it is now (same size and mtime as
    `st`), else None: missing, unreadable, of another version, or stale (the tar was changed or replaced)."""
    import numpy as np

    try:
        with open(index_path(path), "rb") as f, np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if int(arrays.pop("version")) != INDEX_VERSION or arrays.pop("tar").tolist() != _stamp(st):
            return None
        return ShardIndex(str(path), arrays)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None


def read_legacy_index(path: str | Path, st: os.stat_result) -> ShardIndex | None:
    """A version-1 index (`NAME.tar.idx.json`, written before issue 23) converted to arrays, if it
    matches the tar; the caller keeps the converted one beside the tar. Parsing it makes Python objects
    per sample for a moment (this shard's only)."""
    try:
        with open(Path(path).with_name(Path(path).name + LEGACY_SUFFIX), "rb") as f:
            doc = json.loads(f.read())
        if doc.get("version") != 1 or doc.get("tar") != {"size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return None
        members = ({str(e): int(w[0]) for e, w in m.items()} for m in doc["members"])
        if len(doc["keys"]) != len(doc["members"]):
            return None
        return _from_samples(str(path), zip((str(k) for k in doc["keys"]), members))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


def write_index(index: ShardIndex, st: os.stat_result) -> bool:
    """Keep `index` beside its tar (atomically), stamped with the tar's size and mtime from `st`, taken
    before the headers were read; nothing is written if the tar changed meanwhile or the directory is
    read-only (the loader then scans at each start). True when written."""
    import numpy as np

    try:
        if _stamp(os.stat(index.path)) != _stamp(st):
            return False
        with atomic_path(index_path(index.path), mode=None) as tmp, open(tmp, "wb") as f:
            head = {"version": np.int64(INDEX_VERSION), "tar": np.array(_stamp(st), np.int64)}
            np.savez(f, **head, **index.arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        return True
    except OSError:
        return False


def shard_index(path: str | Path) -> ShardIndex:
    """The index of one tar: from the file beside it when it matches the tar (or a version-1 one,
    converted), else by reading the tar headers (index_shard), then kept beside the tar for the next
    start where the directory allows."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"data.shards: {path} is not a readable tar ({e}); allowed: WebDataset .tar shards") from None
    cached = read_index(path, st)
    if cached is not None:
        return cached
    index = read_legacy_index(path, st) or index_shard(path)
    write_index(index, st)
    return index


def stats_count(path: str | Path) -> int | None:
    """Samples in a tar from img2dataset's `NNNNN_stats.json` beside it (`successes`, else `count`),
    without opening its index; None where there is no readable stats file."""
    path = Path(path)
    try:
        with open(path.with_name(path.stem + "_stats.json"), "rb") as f:
            doc = json.loads(f.read())
        n = doc.get("successes", doc.get("count"))
        return int(n) if isinstance(n, int) and n >= 0 else None
    except (OSError, ValueError, AttributeError):
        return None


def rank_index(paths: list[Path], rank: int, world_size: int) -> tuple[list[ShardIndex], int, int]:
    """(this rank's non-empty shard indexes, samples in the dataset, samples per rank and epoch) with
    shards split over ranks: only this rank's index files are opened; the other shards are counted from
    img2dataset's `NNNNN_stats.json` (a shard without one is counted from its index, not kept). Every
    rank gets the smallest rank's count, so all take the same steps."""
    counts = [stats_count(p) for p in paths]
    index = []
    for i in rank_shards(len(paths), rank, world_size):
        idx = shard_index(paths[i])
        counts[i] = len(idx) if counts[i] is None else counts[i]
        if len(idx):
            index.append(idx)
    known = [len(shard_index(p)) if n is None else n for p, n in zip(paths, counts)]
    per_rank = min(sum(known[r::world_size]) for r in range(world_size))
    if sum(len(s) for s in index) < per_rank:
        raise UserError(
            f"data.shards: rank {rank}'s shards hold {sum(len(s) for s in index)} samples with a caption and an "
            f"image, fewer than their stats files count ({sum(known[rank::world_size])}); allowed: "
            f"NNNNN_stats.json whose successes match the tars (delete them to count from the tars)"
        )
    return index, sum(known), per_rank


def read_member(handle, offset: int) -> bytes:
    """The data at `offset`; its size from the tar header in the block just before it (tar puts every
    member's data right after its own header, also after pax or GNU long-name records)."""
    handle.seek(offset - tarfile.BLOCKSIZE)
    info = tarfile.TarInfo.frombuf(handle.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
    return handle.read(info.size)
