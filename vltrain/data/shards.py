"""WebDataset shards in img2dataset's layout: finding them, writing them atomically, reading them.

A shard is a tar of samples `KEY.jpg`, `KEY.txt`, `KEY.json` (img2dataset also writes
`NNNNN_stats.json` beside each tar; we do too). Writing and streaming go through webdataset
(imported lazily: it imports torch). Random access for the training loader goes through a tar
*index* (member offsets read from the tar headers with the standard library): webdataset 1.0's
readers are sequential streams, while exact resume and worker-independent batches need to read
sample k of a shard without reading samples 0..k-1 of it.

The index of `NAME.tar` is kept beside it as `NAME.tar.idx.json`, keyed on the tar's size and mtime:
written when a shard is written, built on first read when missing or stale, and never trusted once
the tar changed. Where the directory is read-only the loader scans the headers at each start.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vltrain.common.atomic import atomic_path, atomic_write
from vltrain.common.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # same split as webdataset's base_plus_ext


def resolve_shards(spec: str | Path, what: str = "data.shards") -> list[Path]:
    """A directory (its *.tar, sorted), a brace pattern like dir/{00000..00003}.tar, or one tar file."""
    text = str(spec)
    allowed = "allowed: a directory of .tar shards, a brace pattern like dir/{00000..00003}.tar, or a .tar file"
    if not text:
        raise UserError(f"{what}: not set; {allowed}")
    path = Path(text)
    if path.is_dir():
        paths = sorted(path.glob("*.tar"))
        if not paths:
            raise UserError(f"{what}: {text} holds no .tar shards; {allowed}")
        return paths
    if "{" in text:
        import braceexpand  # webdataset's own dependency; tiny and torch-free

        paths = [Path(p) for p in braceexpand.braceexpand(text)]
    else:
        paths = [path]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{what}: {missing[0]} does not exist ({len(missing)} missing); {allowed}")
    return paths


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


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's members lie in one tar: keys in tar order, ext -> (data offset, size)."""

    path: str
    keys: tuple[str, ...]
    members: tuple[dict[str, tuple[int, int]], ...]

    def __len__(self) -> int:
        return len(self.keys)


def index_shard(path: str | Path) -> ShardIndex:
    """Read only the tar headers (no member data) and group members by key, like webdataset does."""
    keys: list[str] = []
    members: list[dict[str, tuple[int, int]]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                m = _KEY_EXT.match(info.name)
                if not info.isreg() or not m or ("/" not in info.name and info.name.startswith("__")):
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if not keys or keys[-1] != key:
                    keys.append(key)
                    members.append({})
                members[-1][ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"data.shards: {path} is not a readable tar ({e}); allowed: WebDataset .tar shards") from None
    keep = [i for i, m in enumerate(members) if "txt" in m and any(e in m for e in IMAGE_EXTS)]
    return ShardIndex(str(path), tuple(keys[i] for i in keep), tuple(members[i] for i in keep))


INDEX_VERSION = 1
INDEX_SUFFIX = ".idx.json"


def index_path(path: str | Path) -> Path:
    """Where the index of a tar is kept: beside it, `NAME.tar.idx.json`."""
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_index(path: str | Path, st: os.stat_result) -> ShardIndex | None:
    """The index kept beside `path` if it was made from the tar as it is now (same size and mtime as
    `st`), else None: missing, unreadable, of another version, or stale (the tar was changed or replaced)."""
    try:
        doc = json.loads(index_path(path).read_bytes())
        if doc.get("version") != INDEX_VERSION or doc.get("tar") != _stamp(st):
            return None
        keys, members = doc["keys"], doc["members"]
        if len(keys) != len(members):
            return None
        return ShardIndex(
            str(path),
            tuple(str(k) for k in keys),
            tuple({str(e): (int(w[0]), int(w[1])) for e, w in m.items()} for m in members),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


def write_index(index: ShardIndex, st: os.stat_result) -> bool:
    """Keep `index` beside its tar (atomically), stamped with the tar's size and mtime from `st`, taken
    before the headers were read; nothing is written if the tar changed meanwhile or the directory is
    read-only (the loader then scans at each start). True when written."""
    try:
        if _stamp(os.stat(index.path)) != _stamp(st):
            return False
        doc = {
            "version": INDEX_VERSION,
            "tar": _stamp(st),
            "keys": list(index.keys),
            "members": [{e: list(w) for e, w in m.items()} for m in index.members],
        }
        atomic_write(index_path(index.path), json.dumps(doc, separators=(",", ":")), mode=None)
        return True
    except OSError:
        return False


def shard_index(path: str | Path) -> ShardIndex:
    """The index of one tar: from the file beside it when it matches the tar, else by reading the tar
    headers (index_shard), then kept beside the tar for the next start where the directory allows."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"data.shards: {path} is not a readable tar ({e}); allowed: WebDataset .tar shards") from None
    cached = read_index(path, st)
    if cached is not None:
        return cached
    index = index_shard(path)
    write_index(index, st)
    return index


def read_member(handle, where: tuple[int, int]) -> bytes:
    offset, size = where
    handle.seek(offset)
    return handle.read(size)


def image_ext(members: dict[str, tuple[int, int]]) -> str:
    return next(e for e in IMAGE_EXTS if e in members)
