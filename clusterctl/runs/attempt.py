"""What a run's job runs on the nodes: the trainer, with clusterctl's duties of one attempt around it.

Every attempt (first submission, requeue, resume, retry) pickles an `Attempt`, not the bare trainer
(vltrain.loop.TrainJob), because some things only the job can observe with no clusterctl process
running: that it started, where it ran, that it completed or was requeued. The trainer stays
clusterctl-free (vltrain never imports clusterctl); this wrapper is the one place the job calls back
into clusterctl. `registry` is the registry file the run was submitted to (the job is on another
machine, where $CLUSTERCTL_REGISTRY and the user's data directory may differ).
"""

from __future__ import annotations

from typing import Any

import submitit

from clusterctl.runs.provenance import record_attempt
from vltrain.loop import TrainJob


class Attempt(submitit.helpers.Checkpointable):
    """One attempt of run `run_id` in `run_dir`: trains (TrainJob), resuming if it can."""

    def __init__(self, run_dir: str, run_id: str, registry: str) -> None:
        self.run_dir = str(run_dir)
        self.run_id = run_id
        self.registry = str(registry)

    def __call__(self) -> dict[str, Any]:
        record_attempt(self.run_dir)  # where it runs: hosts/nodeNNN-<attempt>.json, by each node's local rank 0
        return TrainJob(self.run_dir)()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit's requeue (time-out, preemption): the same attempt again; the trainer wrote its
        checkpoint at the step boundary before submitit's handler ran."""
        return submitit.helpers.DelayedSubmission(Attempt(self.run_dir, self.run_id, self.registry))
