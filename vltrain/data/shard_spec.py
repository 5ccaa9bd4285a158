"""Shard specs the trainer cannot read, found without reading the data (torch- and numpy-free).

The trainer reads shards by random access through a tar index (vltrain.data.shards), from local files
only. webdataset, which streams the captions when a run trains its own tokenizer, opens whatever
urllib reads as a URL: a `pipe:` spec goes to a shell, `s3:`/`gs:`/`http(s):` ones to a downloader.
So a spec with a URL scheme is refused, by submit and by the trainer alike (`url_problem`), and a
local shard whose first header is not a tar header is said before a job is queued (`tar_problem`).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

BLOCK = 512  # tarfile.BLOCKSIZE; tarfile (and what it imports) is loaded only by the check that parses
LOCAL = "a local directory of .tar shards, a brace pattern like dir/{00000..00003}.tar, or a .tar file"


def url_scheme(spec: str) -> str:
    """The URL scheme webdataset's gopen would see in `spec` (urllib's reading), '' for a path."""
    try:
        return urlsplit(spec).scheme
    except ValueError:  # a malformed netloc ('http://[x'): the scheme was read before it failed
        head, sep, _ = spec.partition(":")
        return head.lower() if sep and head.isascii() and head[:1].isalpha() and "/" not in head else ""


def url_problem(spec: str, what: str) -> str | None:
    """One line when `spec` is a URL or a `pipe:` command (pure); None for a path. A relative path
    that starts like a URL (`data:2024/...`) is written `./data:2024/...`."""
    scheme = url_scheme(spec)
    if not scheme:
        return None
    why = "would run a shell command in every rank" if scheme == "pipe" else "is a URL"
    return (
        f"{what}: {spec[:80]!r} {why} ({scheme}:), and the trainer reads shards by random access from local "
        f"files only; allowed: {LOCAL} (remote shards through a mount such as s3fs or gcsfuse; a relative path "
        "with a colon written ./like:this)"
    )


def tar_problem(path: Path, what: str) -> str | None:
    """One line when the file's first 512-byte block is not a tar header (tarfile's own check of the
    checksum and fields): one read per shard, where the trainer would fail after queueing. An empty
    tar (its first block zeros) is a tar: the trainer skips it."""
    import tarfile

    if not path.is_file():  # a FIFO named 0.tar would block the read (and the trainer)
        return f"{what}: {path} is not a regular file; allowed: WebDataset .tar shards"
    try:
        with open(path, "rb") as f:
            block = f.read(BLOCK)
    except OSError as e:
        return f"{what}: {path} cannot be read ({e.strerror or e}); allowed: shards the job's user can read"
    if len(block) < BLOCK:
        return (
            f"{what}: {path} is not a tar ({len(block)} bytes, less than one header); allowed: WebDataset .tar shards"
        )
    if block.count(0) == BLOCK:  # the end-of-archive block first: an empty tar
        return None
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        return f"{what}: {path} is not a tar (its first header: {e}); allowed: WebDataset .tar shards (uncompressed)"
    return None


def empty_tar(path: Path) -> bool:
    """The file starts with tar's end-of-archive block: a tar of no members (no samples)."""
    try:
        with open(path, "rb") as f:
            return f.read(BLOCK) == bytes(BLOCK)
    except OSError:
        return False
