"""The nouns every layer of clusterctl shares: run states, run and job records, launch specs.

The bottom of clusterctl's own stack (as torchx's `specs` is for its runner and schedulers):
backends report job states in `RunState`, the runs layer stores `RunRecord`/`JobRecord` rows, and
every command renders them. It imports nothing of clusterctl, so every layer can import it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RunState(enum.StrEnum):
    """The one vocabulary of run and job states (Slurm's many states fold into these).

    Active states may still change: they are polled by `status`, waited on by `submit --wait`,
    followed by `logs --follow` and watched by `watch`. Final states never change again. UNKNOWN is
    active: it means no scheduler source knows the job right now (a state Slurm added after this
    release, or a job neither squeue nor accounting reports), which may still resolve; it is
    shown, polled and waited on like any active state, never taken as an ending.
    """

    SUBMITTING = "SUBMITTING"  # registry row written, scheduler not yet answered (or a retry claimed it)
    SUBMITTED = "SUBMITTED"  # a job's state before any scheduler report
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    REQUEUED = "REQUEUED"  # pending again after Slurm requeued it (preemption, time-out)
    COMPLETING = "COMPLETING"
    SUSPENDED = "SUSPENDED"
    UNKNOWN = "UNKNOWN"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    PREEMPTED = "PREEMPTED"
    NODE_FAIL = "NODE_FAIL"

    def is_final(self) -> bool:
        return self in FINAL_STATES

    @classmethod
    def final(cls, state: str) -> bool:
        """Whether a state read back as text (registry, JSON) is final; unknown text is not."""
        return state in FINAL_STATES


FINAL_STATES = frozenset(
    {RunState.COMPLETED, RunState.FAILED, RunState.CANCELLED, RunState.TIMEOUT, RunState.PREEMPTED, RunState.NODE_FAIL}
)
ACTIVE_STATES = frozenset(RunState) - FINAL_STATES
# Final states whose cause may be the cluster's (clusterctl.runs.retry reads the exit code to decide).
FAILURE_STATES = frozenset({RunState.FAILED, RunState.NODE_FAIL})


@dataclass
class RunRecord:
    """One training run: what was asked for (config, plan) and where it lives."""

    run_id: str
    name: str
    profile: str
    executor: str  # a key of clusterctl.backends.BACKENDS
    run_dir: str
    created_at: float
    user: str
    gpus: int  # world size
    total_steps: int
    state: str
    config: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobRecord:
    """One scheduler job (Slurm job or local process) of a run; one per submission, resume or retry.

    `requeues` counts Slurm's own restarts of this job id (time-out, preemption); `elapsed_s` is
    the time the job held its allocation over all those restarts (GPU-hours = alloc_gpus x elapsed).
    """

    job_id: str
    run_id: str
    attempt: int  # 1-based, per run
    kind: str  # 'submit' | 'resume' | 'retry'
    submitted_at: float
    state: str
    started_at: float | None = None
    ended_at: float | None = None
    elapsed_s: float | None = None
    alloc_gpus: int | None = None
    requeues: int = 0
    node_list: str | None = None
    exit_code: str | None = None


JOB_KINDS = ("submit", "resume", "retry")

# Where jobs can run: a profile's `executor`, each the name of a module in clusterctl/backends/.
EXECUTORS = ("slurm", "local")


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to start one attempt of a run; JSON-able, kept in the run directory."""

    executor: str  # a key of clusterctl.backends.BACKENDS
    folder: str  # submitit's folder (inside the run directory)
    job_name: str
    params: dict[str, Any]  # submitit executor parameters
    env: dict[str, str] = field(default_factory=dict)
    max_num_timeout: int = 1000  # requeues on time-out/preemption before submitit gives up
    # the command that starts Python for each task (submitit's `python`): None, this machine's interpreter;
    # in a container, the image's (pyxis) or `apptainer exec ... IMAGE python` (backends.container)
    python: str | None = None
