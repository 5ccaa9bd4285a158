"""Where a rank's start-up goes: the time from its process's creation to its first optimizer step, by phase.

Time to first step (docs/performance.md) is spread over layers that no one log shows: Python's start,
imports, the rendezvous, the tokenizer, the engine, the data loader, the first batch and step. Each
phase's end is marked in this process (`mark`: a module-level list, since the job's clusterctl wrapper
marks before the trainer exists), and rank 0 writes them as one `startup` event after its first step
(`event_fields`), with the moment the kernel created the process, so that a launcher's share (sbatch,
the scheduler, srun) is the difference between that and the submission.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_MARKS: list[tuple[str, float]] = []
_since: float | None = (
    None  # where the next phases count from, once a start-up was reported (None: the process's creation)
)


def mark(name: str, value: T = None) -> T:  # type: ignore[assignment]
    """Record that phase `name` ends now; returns `value` (so a call's result can be marked in place)."""
    _MARKS.append((name, time.time()))
    return value


def process_started(proc: Path = Path("/proc")) -> float | None:
    """When the kernel created this process (epoch seconds, to the clock tick), or None off Linux.
    Its age is /proc/uptime minus the start tick of /proc/self/stat; the boot time in /proc/stat is
    whole seconds, too coarse to split a start-up of a few seconds."""
    import os

    try:
        uptime = float((proc / "uptime").read_text().split()[0])
        stat = (proc / "self" / "stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command's parentheses
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def phases(marks: list[tuple[str, float]], started: float | None) -> dict[str, float]:
    """Seconds of each phase, in order: from the previous mark (the first from the process's creation,
    or left out when that is unknown). A phase marked twice (a second attempt in one process) keeps
    the last one's time."""
    out: dict[str, float] = {}
    prev = started
    for name, t in marks:
        if prev is not None:
            out[name] = round(t - prev, 3)
        prev = t
    return out


def finish(last: str) -> dict[str, object]:
    """Mark the `last` phase and return the `startup` event's fields: when the process was created, the
    phases and their sum. The marks are then cleared (a second run in this process, as tests do, counts
    from here)."""
    global _since
    mark(last)
    started = process_started() if _since is None else _since
    steps = phases(_MARKS, started)
    _since = _MARKS[-1][1]
    _MARKS.clear()
    return {"process_started": started, "phases": steps, "total_s": round(sum(steps.values()), 3)}


def log_line(fields: dict[str, object]) -> str:
    """The job log's line: the first step's time after the process's creation, and the phases over 0.1 s."""
    steps = fields["phases"]
    assert isinstance(steps, dict)
    big = ", ".join(f"{k} {v:.1f}" for k, v in steps.items() if v >= 0.1)
    return f"vltrain: first step {fields['total_s']:.1f} s after the process started ({big or 'no phase over 0.1 s'})"
