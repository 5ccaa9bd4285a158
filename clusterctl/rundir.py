"""The run directory: one place for everything a run writes, and atomic writes into it.

Layout (docs/architecture.md keeps the full list):
  runs/<run-id>/config.toml    resolved train config (micro batch and accumulation filled in)
               plan.json       the plan the run was submitted with
               launch.json     submitit parameters and environment of the last attempt
               submitit/<job>/ submitit's pickles and per-rank logs (<job>_<rank>_log.out/.err)
               metrics.jsonl, events.jsonl, checkpoints/, energy/, eval.json   (written by vltrain)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def runs_root() -> Path:
    """Where new run directories go: $CLUSTERCTL_RUNS_DIR or ./runs (must be on a shared filesystem)."""
    return Path(os.environ.get("CLUSTERCTL_RUNS_DIR", "runs")).absolute()


def atomic_write(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_toml(path: Path, obj: dict[str, Any]) -> None:
    import tomli_w

    atomic_write(path, tomli_w.dumps(_drop_none(obj)))


def _drop_none(obj: Any) -> Any:
    """TOML has no null: leave unset optional fields out."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


def task_log(run_dir: Path, job_id: str, rank: int = 0, stderr: bool = False) -> Path:
    """Per-rank log file that submitit writes for `job_id` (same naming for Slurm and local)."""
    return run_dir / "submitit" / job_id / f"{job_id}_{rank}_log.{'err' if stderr else 'out'}"
