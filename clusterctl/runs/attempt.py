"""What a run's job runs on the nodes: the trainer, with clusterctl's duties of one attempt around it.

Every attempt (first submission, requeue, resume, retry) pickles an `Attempt`, not the bare trainer
(vltrain.loop.TrainJob), because some things only the job can observe with no clusterctl process
running: that it started, where it ran, that it completed or was requeued. The trainer stays
clusterctl-free (vltrain never imports clusterctl); this wrapper is the one place the job calls back
into clusterctl. `registry` is the registry file the run was submitted to (the job is on another
machine, where $CLUSTERCTL_REGISTRY and the user's data directory may differ).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import submitit

from clusterctl.runs import notify
from clusterctl.runs.provenance import record_attempt
from vltrain.startup import mark


class Attempt(submitit.helpers.Checkpointable):
    """One attempt of run `run_id` in `run_dir`: trains (TrainJob), resuming if it can."""

    def __init__(self, run_dir: str, run_id: str, registry: str) -> None:
        self.run_dir = str(run_dir)
        self.run_id = run_id
        self.registry = str(registry)

    def __call__(self) -> dict[str, Any]:
        mark("launch")  # Python, submitit and unpickling this class (vltrain.startup: the startup event)
        record_attempt(self.run_dir)  # where it runs: hosts/nodeNNN-<attempt>.json, by each node's local rank 0
        job_id, nodes, rank0 = _job()
        start = time.time()
        if rank0:  # "started" once per run: a requeue or a retry is its own event
            notify.from_job(self.registry, self.run_dir, self.run_id, "started", {"job_id": job_id, "nodes": nodes})
        mark("attempt")
        from vltrain.loop import TrainJob  # here: submit pickles this class and must not import torch

        result = TrainJob(self.run_dir)()
        if rank0 and result.get("finished"):  # not a slice of the run (stop_after)
            notify.from_job(self.registry, self.run_dir, self.run_id, "completed", {"job_id": job_id}, started=start)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit's requeue (time-out, preemption): the same attempt again; the trainer wrote its
        checkpoint at the step boundary before submitit's handler ran. Only rank 0 gets here (submitit
        requeues from rank 0): the requeue is notified, keyed by the job and its requeue count (the
        count sacct's RestartCnt will show, so a status refresh that sees it first uses the same key)."""
        job_id, _, _ = _job()
        count = requeue_number(self.run_dir)
        data = {"job_id": job_id, "count": count, "reason": notify.requeue_reason(self.run_dir)}
        notify.from_job(self.registry, self.run_dir, self.run_id, "requeued", data, key=f"requeued:{job_id}:{count}")
        return submitit.helpers.DelayedSubmission(Attempt(self.run_dir, self.run_id, self.registry))


def requeue_number(run_dir: str) -> int:
    """Which requeue of this job the one under way is (1 for the first): on Slurm the job's restart count
    plus one (what sacct's RestartCnt says after it); under the local executor, which has no count, the
    attempts the trainer logged (start and resume events, this one's included)."""
    if "SLURM_JOB_ID" in os.environ:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0) + 1
    from vltrain.metrics import attempt_number

    return max(1, attempt_number(Path(run_dir)))


def _job() -> tuple[str | None, str | None, bool]:
    """(job id, its nodes, is this global rank 0) from submitit's job environment; outside a submitit
    job (a test calling the attempt), no id and rank 0 unless $RANK says otherwise."""
    try:
        env = submitit.JobEnvironment()
        return str(env.job_id), ",".join(env.hostnames), env.global_rank == 0
    except Exception:  # submitit raises when no job environment is set
        return None, None, os.environ.get("RANK", "0") == "0"
