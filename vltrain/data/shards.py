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
import math
import os
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vltrain.common.atomic import atomic_path, atomic_write
from vltrain.common.errors import UserError
from vltrain.data.braces import check_brace_pattern
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


def img2dataset_meta(
    key: str, caption: str, size: tuple[int, int], original: tuple[int, int], **extra: Any
) -> dict[str, Any]:
    """A sample's KEY.json with the fields img2dataset writes (what readers of its output expect:
    key, caption, status, the image's size and its source's), then `extra`, ours."""
    return {
        "key": key,
        "caption": caption,
        "status": "success",
        "width": size[0],
        "height": size[1],
        "original_width": original[0],
        "original_height": original[1],
        **extra,
    }


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

    # absolute: webdataset opens a URL-like name ("pipe:cmd.tar" globbed from ".") as a URL and runs it
    yield from tarfile_samples(({"url": str(Path(p).absolute())} for p in paths), select_files=select)


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


INDEX_VERSION = 3  # 3: the stamp has a content fingerprint (2: size and mtime only, rebuilt at load)
INDEX_SUFFIX = ".idx.npz"
LEGACY_SUFFIX = ".idx.json"  # version 1: keys and per-member [offset, size] lists in JSON; converted at load
FINGERPRINT_SAMPLES = 8  # samples whose member headers the stamp hashes: at most 17 reads of 512 bytes a shard
_ARRAYS = {"image", "text", "key_meta", "key_data"}  # and key_ends for keys stored as bytes
_OFFSETS = ("uint32", "uint64")


def index_path(path: str | Path) -> Path:
    """Where the index of a tar is kept: beside it, `NAME.tar.idx.npz`."""
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns]


def fingerprint(index: ShardIndex, size: int) -> bytes:
    """A hash of the tar's first block and of the headers just before the image and text data of up to
    FINGERPRINT_SAMPLES samples spread over the index (first and last included), with the tar's size:
    a tar rewritten in another order with its size and mtime kept (`cp -p`, `rsync -t`) moves the
    members those offsets point at. Cheap enough for every start; each read checks its own header."""
    import hashlib

    n, k = len(index), FINGERPRINT_SAMPLES
    picks = sorted({i * (n - 1) // (k - 1) for i in range(k)}) if n else []
    digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    fd = os.open(index.path, os.O_RDONLY)
    try:
        digest.update(os.pread(fd, tarfile.BLOCKSIZE, 0))
        for i in picks:
            for offset in (index.image(i), index.text(i)):
                digest.update(os.pread(fd, tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE))
    finally:
        os.close(fd)
    return digest.digest()


def check_index_arrays(arrays: dict[str, np.ndarray], size: int) -> None:
    """ValueError unless `arrays` are an index a tar of `size` bytes could have: the arrays and dtypes
    ShardIndex writes, 1-D and of one length, at most one sample per 1 KiB of tar (two headers),
    data offsets on 512-byte blocks inside the tar, keys that decode (digits: at most 18, in range)."""
    import numpy as np

    extra = set(arrays) - _ARRAYS - {"key_ends"}
    if extra or _ARRAYS - set(arrays) or any(a.ndim != 1 for a in arrays.values()):
        raise ValueError(f"arrays {sorted(arrays)}, shapes {[a.shape for a in arrays.values()]}")
    n = len(arrays["image"])
    image, text, meta = arrays["image"], arrays["text"], arrays["key_meta"]
    if image.dtype.name not in _OFFSETS or text.dtype.name not in _OFFSETS or len(text) != n:
        raise ValueError("offsets of another type or length")
    if n > size // 1024 or meta.dtype != np.int64 or len(meta) != 2:
        raise ValueError(f"{n} samples in {size} bytes, or key_meta {meta.dtype} {meta.shape}")
    for a in (image, text):
        if n and (int(a.min()) < tarfile.BLOCKSIZE or int(a.max()) > size or (a % tarfile.BLOCKSIZE).any()):
            raise ValueError("a data offset outside the tar or off a block")
    base, width = int(meta[0]), int(meta[1])
    keys = arrays["key_data"]
    if width:
        top = base + int(keys.max()) if n else base
        if not 0 < width <= 18 or keys.dtype.name not in _OFFSETS or len(keys) != n or not 0 <= base <= top < 10**width:
            raise ValueError(f"digit keys of width {width} from {base}")
        return
    ends = arrays.get("key_ends")
    if base or keys.dtype != np.uint8 or ends is None or ends.dtype.name not in _OFFSETS or len(ends) != n:
        raise ValueError("byte keys of another type or length")
    if n and (int(ends[-1]) != len(keys) or (ends[1:] < ends[:-1]).any()):
        raise ValueError("key ends out of order")
    keys.tobytes().decode()  # UnicodeDecodeError is a ValueError


def _load_npz(f: Any, limit: int) -> dict[str, np.ndarray]:
    """The arrays of an .npz, each .npy header read first: no array that claims more bytes than its
    member holds, nor members over `limit` bytes in all, is allocated (a lying header is a MemoryError)."""
    import numpy as np
    from numpy.lib import format as npy

    arrays = {}
    with zipfile.ZipFile(f) as z:
        infos = z.infolist()
        if len(infos) > 8 or sum(i.file_size for i in infos) > limit:
            raise ValueError(f"{len(infos)} members of {sum(i.file_size for i in infos)} bytes")
        for info in infos:
            with z.open(info) as m:
                major, _ = npy.read_magic(m)
                shape, fortran, dtype = (npy.read_array_header_1_0 if major == 1 else npy.read_array_header_2_0)(m)
                size = math.prod(shape) * dtype.itemsize
                if dtype.hasobject or size > info.file_size:
                    raise ValueError(f"{info.filename}: {shape} {dtype} in {info.file_size} bytes")
                raw = m.read(size)
            if len(raw) != size:
                raise ValueError(f"{info.filename}: {len(raw)} of {size} bytes")
            array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")
            arrays[info.filename.removesuffix(".npy")] = array
    return arrays


_NOT_AN_INDEX = (OSError, ValueError, KeyError, TypeError, EOFError, OverflowError, RecursionError, zipfile.BadZipFile)


def read_index(path: str | Path, st: os.stat_result) -> ShardIndex | None:
    """The index kept beside `path` if it was made from the tar as it is now (same size, mtime and
    fingerprint as `st` and the tar), else None: missing, unreadable, malformed (check_index_arrays),
    of another version, or stale (the tar was changed, replaced or rewritten in another order)."""
    try:
        with open(index_path(path), "rb") as f:
            arrays = _load_npz(f, 2 * st.st_size + 65536)  # keys and offsets: less than the tar's headers
        head = {k: arrays.pop(k) for k in ("version", "tar", "fingerprint")}
        if head["version"].shape or int(head["version"]) != INDEX_VERSION or head["tar"].tolist() != _stamp(st):
            return None
        check_index_arrays(arrays, st.st_size)
        index = ShardIndex(str(path), arrays)
        return index if head["fingerprint"].tobytes() == fingerprint(index, st.st_size) else None
    except _NOT_AN_INDEX:
        return None


def read_legacy_index(path: str | Path, st: os.stat_result) -> ShardIndex | None:
    """A version-1 index (`NAME.tar.idx.json`, written before issue 23) converted to arrays, if it
    matches the tar and check_index_arrays; the caller keeps the converted one beside the tar. Parsing
    it makes Python objects per sample for a moment (this shard's only)."""
    try:
        with open(Path(path).with_name(Path(path).name + LEGACY_SUFFIX), "rb") as f:
            text = f.read(st.st_size + (1 << 20))
        doc = json.loads(text)
        if doc.get("version") != 1 or doc.get("tar") != {"size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return None
        members = ({str(e): int(w[0]) for e, w in m.items()} for m in doc["members"])
        if len(doc["keys"]) != len(doc["members"]):
            return None
        index = _from_samples(str(path), zip((str(k) for k in doc["keys"]), members))
        check_index_arrays(dict(index.arrays), st.st_size)
        return index
    except (*_NOT_AN_INDEX, AttributeError, IndexError):
        return None


def write_index(index: ShardIndex, st: os.stat_result) -> bool:
    """Keep `index` beside its tar (atomically), stamped with the tar's size and mtime from `st`, taken
    before the headers were read, and its fingerprint; nothing is written if the tar changed meanwhile
    or the directory is read-only (the loader then scans at each start). True when written."""
    import numpy as np

    try:
        if _stamp(os.stat(index.path)) != _stamp(st):
            return False
        head = {
            "version": np.int64(INDEX_VERSION),
            "tar": np.array(_stamp(st), np.int64),
            "fingerprint": np.frombuffer(fingerprint(index, st.st_size), np.uint8),
        }
        with atomic_path(index_path(index.path), mode=None) as tmp, open(tmp, "wb") as f:
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


def read_member(handle: Any, offset: int, path: str, key: str, exts: tuple[str, ...]) -> bytes:
    """The data at `offset`, after checking the tar header just before it (tar puts every member's data
    right after its own header, also after pax or GNU long-name records): a regular file named
    KEY.EXT with EXT one of `exts`, its data inside the tar. The index holds no sizes (12 bytes a
    sample): the header gives it. A mismatch is one line naming the shard and the key: an index that
    lies (or a tar changed during the run) never pairs one sample's caption with another's image."""
    handle.seek(offset - tarfile.BLOCKSIZE)
    try:
        info = tarfile.TarInfo.frombuf(handle.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        info = None
    end = os.fstat(handle.fileno()).st_size
    want = f"{key}.{exts[0] if len(exts) == 1 else '|'.join(exts)}"
    if info is None:
        problem = f"no tar header before offset {offset}"
    elif not info.isreg() or not _names_match(info.name, key, exts):
        problem = f"the member at offset {offset} is {info.name[:120]!r}, not {want}"
    elif offset + info.size > end:
        problem = f"{info.name[:120]!r} at offset {offset} ({info.size} bytes) runs past the end of the tar ({end})"
    else:
        return handle.read(info.size)
    raise UserError(
        f"data.shards: {path}: sample {key[:120]!r}: {problem}; allowed: an index that matches its tar "
        f"(delete {index_path(path).name} to rebuild it) and shards left unchanged during a run"
    )


def _names_match(name: str, key: str, exts: tuple[str, ...]) -> bool:
    """`name` is KEY.EXT. A name a ustar header cannot hold (over 90 bytes, or not ASCII) is in a pax or
    GNU record before the header, which keeps a cut copy (pax: ASCII with '?' for the rest; GNU: the
    UTF-8 bytes): its first 90 bytes are compared with the key's."""
    m = _KEY_EXT.match(name)
    if m and m.group(1) == key and m.group(2).lower() in exts:
        return True
    if key.isascii() and len(key) < 90:
        return False
    raw = name.encode("utf-8", "surrogateescape")
    for full in (key.encode(), key.encode("ascii", "replace")):
        n = min(len(full), 90)
        if raw[:n] == full[:n]:
            return True
    return False
