"""Why a checkpoint write failed, in one line: free space, quota, the filesystem that holds a path.

Used by the checkpoint protocol (vltrain.checkpoint) and by the engines, which record a failed write
instead of raising it inside their collectives (is_write_error)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

_MB = 1e6
# torch.save to a path writes through C++ and loses errno: a failed write reads like this
_TORCH_WRITE_WORDS = ("unexpected pos", "file write failed", "PytorchStreamWriter failed", "No space left", "quota")


def is_write_error(exc: BaseException) -> bool:
    """A failed file write (full disk, quota, read-only or failing filesystem), not a lost peer."""
    if isinstance(exc, OSError):
        return not isinstance(exc, (ConnectionError, TimeoutError))
    return isinstance(exc, RuntimeError) and any(w in str(exc) for w in _TORCH_WRITE_WORDS)


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (or its nearest
    existing parent); -1 when unknown."""
    try:
        st = os.statvfs(_existing(Path(path)))
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def filesystem(path: str | Path) -> str:
    """The device and mount point holding `path`, e.g. '/dev/nvme0n1p2 mounted at /scratch' (Linux's
    /proc/self/mountinfo; 'the filesystem' elsewhere)."""
    target = os.path.realpath(_existing(Path(path)))
    best: tuple[str, str] | None = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[1])):
            best = (tail[1] if tail[1] not in ("none", "") else tail[0], mount)
    return f"{best[0]} mounted at {best[1]}" if best else "the filesystem"


def _mb(n: float) -> str:
    return f"{n / _MB:.1f}" if 0 <= n < 10 * _MB else f"{n / _MB:,.0f}"


def write_problem(exc: BaseException, need: int, where: Path, name: str, free_before: int, keep: int) -> str:
    """One line for a failed checkpoint write: 'no space left on <device> (<path>): N MB free, the
    checkpoint needs ~M MB; allowed: ...' when the disk is full (ENOSPC, or torch's errno-less write
    failure with less free space than a checkpoint takes), 'disk quota exceeded ...' for EDQUOT, else
    what the write said. `need`: what the checkpoint takes (vltrain.checkpoint.estimate_bytes), 0 if unknown."""
    now = free_bytes(where)
    fs = filesystem(where)
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    code = getattr(exc, "errno", None)
    torch_write = isinstance(exc, RuntimeError) and any(w in text for w in _TORCH_WRITE_WORDS)
    quota = code == errno.EDQUOT or "quota" in text.lower()
    full = code == errno.ENOSPC or "No space left" in text or (torch_write and 0 <= now < max(need, _MB))
    free = free_before if free_before >= 0 else now
    needs = f"~{_mb(need)} MB" if need else "more"
    if full or quota:
        head = "disk quota exceeded" if quota else "no space left"
        return (
            f"{head} on {fs} ({where}): {_mb(free)} MB free, checkpoint {name} needs {needs}; allowed: "
            f"free space there{' (or a larger quota)' if quota else ''}, a lower keep_checkpoints (now {keep}), "
            f"or a run directory on a larger filesystem"
        )
    return (
        f"cannot write checkpoint {name} to {where} ({type(exc).__name__}: {text}); {_mb(free)} MB free on "
        f"{fs}, it needs {needs}; allowed: a writable run directory with room for {keep + 1} checkpoints"
    )
