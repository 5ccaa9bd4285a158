"""How a submitit job ended, read from its result pickle without unpickling it (no code runs, no
torch import): the one source of truth for a job that no scheduler knows (local jobs, and Slurm
jobs that accounting forgot)."""

from __future__ import annotations

import io

from clusterctl.specs import RunState
from vltrain.common import safe_read
from vltrain.rundir import RunDir


def pickle_outcome(head: bytes) -> RunState | None:
    """submitit's result pickle starts with the string 'success' or 'error': read it without
    unpickling (no code runs, no torch import)."""
    import pickletools  # on use (~2.5 ms with pickle): polls that find every job in squeue or sacct never read one

    try:
        for _op, arg, _pos in pickletools.genops(io.BytesIO(head)):
            if isinstance(arg, str):
                return {"success": RunState.COMPLETED, "error": RunState.FAILED}.get(arg)
    except Exception:  # truncated or not a pickle: no outcome
        return None
    return None


def submitit_outcome(run_dir: str, job_id: str) -> tuple[RunState | None, float | None]:
    """(COMPLETED|FAILED|None, result file mtime) from rank 0's result pickle of `job_id`."""
    for p in RunDir(run_dir).result_pickles(job_id):
        try:
            with p.open("rb") as f:
                return pickle_outcome(f.read(256)), p.stat().st_mtime
        except OSError:
            continue
    return None, None


def pickle_error(data: bytes) -> str | None:
    """The last line of the traceback in an 'error' result pickle ("error", traceback text), read
    the same way: without unpickling."""
    import pickletools

    strings = []
    try:
        for _op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if isinstance(arg, str):
                strings.append(arg)
                if len(strings) == 2:
                    break
    except Exception:  # truncated or not a pickle
        return None
    if len(strings) < 2 or strings[0] != "error":
        return None
    lines = [ln.strip() for ln in strings[1].strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None


def submitit_error(run_dir: str, job_id: str) -> str | None:
    """Why rank 0 of `job_id` failed, as submitit recorded it (the last line of its traceback)."""
    for p in RunDir(run_dir).result_pickles(job_id):
        try:
            return pickle_error(safe_read.read_head(p, 1 << 20))  # not a FIFO or /dev/zero
        except OSError:
            continue
    return None
