"""The run directory and the job environment: the contract between clusterctl and vltrain.

clusterctl creates a run directory, writes the resolved config and plan into it, and launches the
trainer with a few environment variables; vltrain trains in it and writes metrics, events,
checkpoints, energy and evaluation beside them; clusterctl's status, watch and reports read them
back. Both packages import this module, and no other module spells a file name of the run directory
or one of these variables, so the two sides cannot drift apart.

    <run_dir>/config.toml          resolved train config (micro batch and accumulation filled in)
              plan.json            the plan the run was submitted with (clusterctl)
              profile.json         the cluster profile it was submitted to (clusterctl)
              ds_config.json       the DeepSpeed config of the plan (clusterctl; the trainer rebuilds it)
              launch.json          scheduler parameters and environment of the last attempt (clusterctl)
              submitit/<job>/      submitit's pickles and per-rank logs <job>_<rank>_log.out/.err
              metrics.jsonl        one JSON object per logged optimizer step (rank 0)
              events.jsonl         start, resume, checkpoint, preempt, timeout, end (rank 0)
              checkpoints/step_NNNNNNN/   complete checkpoints (vltrain.checkpoint)
              energy/nodeNNN-<attempt>.csv, .timeline.jsonl   one codecarbon tracker per node and attempt
              eval.json            the latest held-out evaluation
              tokenizer.model      the tokenizer, when data.tokenizer does not name one
              failures/rankNNNNN.json   why that rank's last failing attempt failed (`status` shows it)
              provenance.json, source.diff, pip-freeze.txt   what was submitted (clusterctl.runs.provenance)
              hosts/nodeNNN-<attempt>.json   where each node of each attempt ran, its CUDA/NCCL versions
              code/                the submitted source, with submit --snapshot (what every attempt imports)
              tb/                  TensorBoard event files, with [tracking] tensorboard (vltrain.tracking)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class RunDir:
    """The paths of one run directory (no I/O but the globs that list what exists)."""

    CONFIG = "config.toml"
    PLAN = "plan.json"
    PROFILE = "profile.json"
    DS_CONFIG = "ds_config.json"
    LAUNCH = "launch.json"
    SUBMITIT = "submitit"
    METRICS = "metrics.jsonl"
    EVENTS = "events.jsonl"
    CHECKPOINTS = "checkpoints"
    ENERGY = "energy"
    EVAL = "eval.json"
    TOKENIZER = "tokenizer.model"
    FAILURES = "failures"
    PROVENANCE = "provenance.json"  # what was submitted: git commit, versions, where each attempt ran
    SOURCE_DIFF = "source.diff"  # the working tree's uncommitted changes at submission
    PIP_FREEZE = "pip-freeze.txt"
    CODE = "code"  # submit --snapshot: the submitted source, what every attempt imports
    NOTIFY_LOG = "notify.log"  # notifications that could not be delivered
    NOTIFY = "notify.json"  # the [notify] settings the run was submitted with (webhook URLs: secrets, 0600)
    SIDE = "side"  # jobs beside the attempts (clusterctl's follow-up and evaluation jobs): side/<kind>/<job id>/
    TENSORBOARD = "tb"  # [tracking] tensorboard: event files of every attempt (vltrain.tracking)
    HOSTS = "hosts"  # where each attempt ran: hosts/node<NNN>-<attempt>.json, one per node (clusterctl.runs.provenance)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    config = property(lambda self: self.root / self.CONFIG)
    plan = property(lambda self: self.root / self.PLAN)
    profile = property(lambda self: self.root / self.PROFILE)
    side = property(lambda self: self.root / self.SIDE)
    provenance = property(lambda self: self.root / self.PROVENANCE)
    source_diff = property(lambda self: self.root / self.SOURCE_DIFF)
    pip_freeze = property(lambda self: self.root / self.PIP_FREEZE)
    code = property(lambda self: self.root / self.CODE)
    notify_log = property(lambda self: self.root / self.NOTIFY_LOG)
    notify = property(lambda self: self.root / self.NOTIFY)
    ds_config = property(lambda self: self.root / self.DS_CONFIG)
    launch = property(lambda self: self.root / self.LAUNCH)
    submitit = property(lambda self: self.root / self.SUBMITIT)
    metrics = property(lambda self: self.root / self.METRICS)
    events = property(lambda self: self.root / self.EVENTS)
    checkpoints = property(lambda self: self.root / self.CHECKPOINTS)
    energy = property(lambda self: self.root / self.ENERGY)
    eval = property(lambda self: self.root / self.EVAL)
    tokenizer = property(lambda self: self.root / self.TOKENIZER)
    failures = property(lambda self: self.root / self.FAILURES)
    tensorboard = property(lambda self: self.root / self.TENSORBOARD)

    def failure_file(self, rank: int) -> Path:
        """Why this rank's last attempt failed (one JSON object, replaced by each failing attempt)."""
        return self.failures / f"rank{rank:05d}.json"

    def task_log(self, job_id: str, rank: int = 0, stderr: bool = False) -> Path:
        """The per-rank log submitit writes for `job_id` (the same naming on Slurm and locally)."""
        return self.submitit / job_id / f"{job_id}_{rank}_log.{'err' if stderr else 'out'}"

    def result_pickles(self, job_id: str) -> tuple[Path, Path]:
        """Where rank 0's submitit result of `job_id` may be (per-job folder, or the folder itself)."""
        return self.submitit / job_id / f"{job_id}_0_result.pkl", self.submitit / f"{job_id}_0_result.pkl"

    def energy_file(self, node_rank: int, attempt: str) -> Path:
        """One node's codecarbon file for one attempt; its timeline sits beside it (.timeline.jsonl)."""
        return self.energy / f"node{node_rank:03d}-{attempt}.csv"

    def host_file(self, node_rank: int, attempt: str) -> Path:
        """Where one node of one attempt ran (hostnames, CUDA/NCCL versions), written by its local rank 0."""
        return self.root / self.HOSTS / f"node{node_rank:03d}-{attempt}.json"

    def host_files(self) -> list[Path]:
        return sorted((self.root / self.HOSTS).glob("node*-*.json"))

    def energy_files(self) -> list[Path]:
        return sorted(self.energy.glob("node*-*.csv"))

    def energy_timelines(self) -> list[Path]:
        return sorted(self.energy.glob("node*-*.timeline.jsonl"))

    def checkpoint_dirs(self) -> list[Path]:
        """Checkpoint directories by name (complete or not: vltrain.checkpoint decides), oldest first."""
        return sorted(self.checkpoints.glob("step_*"))


@dataclass(frozen=True)
class JobEnv:
    """What clusterctl tells every rank through the environment, and vltrain reads back.

    `run_dir` and `profile` are also there for the user's own job hooks (and `vltrain train` takes
    the run directory from it when --run-dir is not given); the rest sets the trainer's MFU
    denominator and the energy tracker's site.
    """

    run_dir: str
    profile: str = ""
    peak_tflops: float | None = None
    country: str | None = None
    pue: float = 1.0
    device: str = ""  # "cuda" | "cpu" from the profile; empty when run by hand (the machine decides)

    RUN_DIR = "CLUSTERCTL_RUN_DIR"
    PROFILE = "CLUSTERCTL_PROFILE"
    PEAK_TFLOPS = "VLTRAIN_PEAK_TFLOPS"
    COUNTRY = "VLTRAIN_COUNTRY"
    PUE = "VLTRAIN_PUE"
    DEVICE = "VLTRAIN_DEVICE"

    def to_env(self) -> dict[str, str]:
        env = {self.RUN_DIR: self.run_dir, self.PROFILE: self.profile, self.PUE: f"{self.pue:g}"}
        if self.device:
            env[self.DEVICE] = self.device
        if self.peak_tflops is not None:
            env[self.PEAK_TFLOPS] = f"{self.peak_tflops:g}"
        if self.country:
            env[self.COUNTRY] = self.country
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JobEnv:
        """The contract as this process sees it; unset or unreadable figures are None / defaults."""
        env = os.environ if env is None else env
        return cls(
            run_dir=env.get(cls.RUN_DIR, ""),
            profile=env.get(cls.PROFILE, ""),
            peak_tflops=_positive(env.get(cls.PEAK_TFLOPS, "")),
            country=env.get(cls.COUNTRY) or None,
            pue=_positive(env.get(cls.PUE, "")) or 1.0,
            device=env.get(cls.DEVICE, ""),
        )


# The trainer's exit code for a lost peer or communicator (EX_TEMPFAIL): clusterctl retries it.
EXIT_COMM_ERROR = 75

# Knobs of the trainer alone (set by a user or a test, never by clusterctl).
ENERGY_FLUSH_S = "VLTRAIN_ENERGY_FLUSH_S"  # seconds between energy flushes (default 60)
DIST_TIMEOUT_S = "VLTRAIN_DIST_TIMEOUT_S"  # how long a collective waits for a lost peer before step 1 (1800)
STEP_DIST_TIMEOUT_S = "VLTRAIN_STEP_DIST_TIMEOUT_S"  # the same once steps run (default 600): a lost peer shows sooner
STALL_TIMEOUT_S = "VLTRAIN_STALL_TIMEOUT_S"  # no optimizer step for this long: exit 75, requeue (default 1800)
GRAD_REDUCTION = "VLTRAIN_GRAD_REDUCTION"  # ZeRO-2 under accumulation: auto (unset), coalesced, per_micro_step


def _positive(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value > 0 else None


def scheduler_job_id(env: Mapping[str, str]) -> str | None:
    """This job's id as squeue, sacct and the registry name it: a job array's task is <array>_<task>
    (its own SLURM_JOB_ID is another number: a sweep's point, clusterctl.runs.sweep), else
    SLURM_JOB_ID, else the local executor's controller pid; None outside a job."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")
