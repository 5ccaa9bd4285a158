"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Every writer of a file that someone else reads while it may change (run-directory JSON and TOML, the
tokenizer, shards, eval.json, report plots) writes a temporary name in the same directory, flushes
and fsyncs it, then renames it over the target (rename is atomic within a filesystem). Checkpoints
are directories and have their own protocol (vltrain.checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside `path` to write to (by any means: a library's save(), a stream);
    renamed over `path` when the block ends without an error, removed when it raises. `mode`: the
    file's permissions (None: as open() would make it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may not have synced: do it before the rename
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _default_mode() -> int:
    """What open() would have given a new file: 0666 less the umask (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, data: str | bytes, mode: int | None = 0o600) -> None:
    """Write `data` to `path` atomically (mode 0600 by default: run directories hold private state)."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: Path, obj: Any) -> None:
    """Pretty, sorted JSON (diffable between runs), written atomically, private to the user."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_toml(path: Path, obj: dict[str, Any]) -> None:
    """TOML (unset optional fields left out: TOML has no null), written atomically, private to the user."""
    import tomli_w

    atomic_write(path, tomli_w.dumps(drop_none(obj)))


def drop_none(obj: Any) -> Any:
    """TOML has no null: leave unset optional fields out."""
    if isinstance(obj, dict):
        return {k: drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [drop_none(v) for v in obj]
    return obj
