"""Why a rank failed, where clusterctl's status finds it (RunDir.failure_file), and which failures are a
lost peer or communicator (exit 75: clusterctl retries them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from vltrain.common.errors import UserError
from vltrain.rundir import RunDir, scheduler_job_id

COMM_ERROR_WORDS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "gloo",
    "nccl",
    "timed out",
    "socket timeout",
    "rendezvous",
    "tcpstore",
    "processgroup",
)


def is_comm_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in COMM_ERROR_WORDS)


def record_failure(run_dir: str | Path, exc: BaseException, kind: str, rank: int | None = None) -> None:
    """Why this rank failed, where clusterctl's status finds it (RunDir.failure_file): the UserError's
    line, or the exception's type and last line. Never raises: it runs while something else failed."""
    import json

    from vltrain.common.atomic import atomic_write

    try:
        if rank is None:
            rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
        text = str(exc).strip().splitlines()[-1:] or [""]
        plain = kind == "user" or isinstance(exc, UserError)  # its line already says what and where
        reason = text[0] if plain else f"{type(exc).__name__}: {text[0]}".rstrip(": ")
        record = {
            "kind": kind,
            "reason": reason[:500],
            "rank": rank,
            "time": time.time(),
            "job_id": scheduler_job_id(os.environ),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        }
        atomic_write(RunDir(run_dir).failure_file(rank), json.dumps(record) + "\n", mode=None)
    except Exception:  # a full disk or a vanished run directory must not hide the original error
        pass
