"""Bounded reads of files that someone else may have written: a run directory, ./configs, a profile
directory.

A FIFO blocks `open()` until a writer comes (forever), a link to /dev/zero or /dev/urandom never
ends, and a 3 GB file of zeros is one line that a line reader holds whole. Every reader of such a
file goes through here: `open_regular` refuses anything that is not a regular file *before* it
could block (stat, then a non-blocking open and fstat of the opened file, so a swap in between is
caught), and `read_capped` / `capped_lines` bound the bytes read. A refusal is `NotReadable`, an
OSError whose text is 'PATH: what it is', so callers that already skip a missing file skip it the
same way, and callers that must refuse say it in one line; `skipped` collects one note per refused
path for a command that skips to print ("...; skipped"). Torch-free (clusterctl imports it).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

MiB = 1 << 20
LINE_MAX = MiB  # bytes of one JSONL line kept; longer lines are skipped (no record is near this)

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)

_notes: dict[str, str] = {}  # path -> note, in the order refused (one per path and process)


class NotReadable(OSError):
    """A file refused without reading it whole: not a regular file, or over its byte cap."""


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: str | Path, why: str) -> NotReadable:
    """The error ('PATH: why'), and its note for skipped() ('PATH: why; skipped')."""
    msg = f"{path}: {why}"
    _notes.setdefault(str(path), f"{msg}; skipped")
    return NotReadable(msg)


def skipped() -> list[str]:
    """The notes of every file refused so far in this process, one per path (for a command's notes)."""
    return list(_notes.values())


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for binary reading if it is a regular file (a symlink to one is); else
    NotReadable naming what it is. Never blocks on a FIFO and never opens a device."""
    st = os.stat(path)  # a missing file: FileNotFoundError as before
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, f"{_kind(st.st_mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)  # what was opened, if the path changed since the stat
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, f"{_kind(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: str | Path, cap: int) -> bytes:
    """The whole of a regular file of at most `cap` bytes; NotReadable if it is larger (a JSON or
    TOML file cut at the cap would be read wrong) or not a regular file."""
    with open_regular(path) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise _refuse(path, f"larger than {_size(cap)}, the most read of it")
    return data


def read_head(path: str | Path, cap: int) -> bytes:
    """At most the first `cap` bytes of a regular file (a reader that needs only its start)."""
    with open_regular(path) as f:
        return f.read(cap)


def read_text_capped(path: str | Path, cap: int) -> str:
    """read_capped decoded as UTF-8 (UnicodeDecodeError, a ValueError, when it is not)."""
    return read_capped(path, cap).decode("utf-8")


def capped_lines(
    f: BinaryIO, path: str | Path, total: int, line_max: int = LINE_MAX, note: bool = True
) -> Iterator[bytes]:
    """The lines of an open file, at most `total` bytes of it; a line over `line_max` bytes is
    skipped (read through in pieces, never held whole). Stopping at `total` is noted (skipped())
    unless `note` is False (a reader that wants only the head)."""
    read = 0
    while read < total:
        line = f.readline(min(line_max + 1, total - read))
        if not line:
            return
        read += len(line)
        if len(line) > line_max:
            while line and not line.endswith(b"\n") and read < total:  # the rest of the long line
                line = f.readline(min(line_max, total - read))
                read += len(line)
            continue
        yield line
    if note and f.read(1):
        _notes.setdefault(str(path), f"{path}: only its first {_size(total)} read; the rest skipped")
