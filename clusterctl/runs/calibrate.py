"""`clusterctl profiles calibrate NAME`: measure a profile's machines with one real job on its nodes.

The job is laid out as an attempt of a run is (Backend.launch_spec: the profile's nodes, one task per
GPU, its partition, CPUs, memory, container, set-up lines and environment), but it is not a run: no
registry row; its files go to `<runs root>/.calibrate/<profile>-<UTC time>/` (the runs root is on the
filesystem the nodes share). Every rank joins the gloo group from the launcher's environment as the
trainer does (vltrain.distenv, vltrain.engines.process_group), calls vltrain.calibrate.measure_rank
at the same time as the others, and rank 0 gathers the figures and returns their aggregate (`aggregate`).
The caller writes it into the profile (runs.calibration_file).

Waiting asks the backend (Backend.poll: squeue, then sacct; /proc for a local job), never the registry;
Ctrl-C, the time-out and a failure cancel the job (Backend.cancel: scancel) before the one-line error.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.specs import FINAL_STATES, JobRecord, RunRecord, RunState
from vltrain.common.errors import ServiceUnavailable, UserError

if TYPE_CHECKING:
    from clusterctl.backends.api import Backend
    from clusterctl.planning.profiles import ClusterProfile
    from clusterctl.specs import LaunchSpec

RANK0_KEYS = ("allreduce_gb_s", "allreduce_latency_us")  # between the nodes: what rank 0's group saw
POLL_S = 2.0  # seconds between two questions to the scheduler (squeue answers in a few ms)
TIMEOUT_S = 900.0  # the default --timeout: queueing and a ~10-30 s measurement on a busy machine
RESULT_LAG_S = 15.0  # how long rank 0's result file may lag a COMPLETED job (submitit waits as long)
DIGITS = 4  # significant digits kept of each figure: run-to-run noise is larger than the 4th


# --- pure ---------------------------------------------------------------------------------------


def _round(x: float) -> float:
    return float(f"{x:.{DIGITS}g}")


def aggregate(per_rank: list[dict[str, Any]], slurm_job: str, measured_at: str) -> dict[str, Any]:
    """The [calibration] table from every rank's measure_rank dict (pure): measured_at, slurm_job and
    ranks first, then each figure: the median over the ranks (per size for a table of sizes, the lower
    median for whole numbers), except the all-reduce figures, rank 0's (RANK0_KEYS: every rank times the
    same collectives; rank 0's is the one a run's step waits on). Keys are those the ranks returned."""
    if not per_rank:
        raise ValueError("no rank returned figures")
    out: dict[str, Any] = {"measured_at": measured_at, "slurm_job": slurm_job, "ranks": len(per_rank)}
    for key, first in per_rank[0].items():
        if key in RANK0_KEYS:
            out[key] = _round(first) if isinstance(first, float) else first
        elif isinstance(first, dict):
            out[key] = {k: _round(statistics.median(r[key][k] for r in per_rank)) for k in first}
        elif isinstance(first, bool) or not isinstance(first, int | float):
            out[key] = first
        elif isinstance(first, int):
            out[key] = statistics.median_low(r[key] for r in per_rank)
        else:
            out[key] = _round(statistics.median(r[key] for r in per_rank))
    return out


def utc_now() -> str:
    """measured_at: UTC, ISO 8601, to the second ("2026-12-07T09:12:00Z")."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_name(profile: str) -> str:
    """The job's Slurm name (64 characters at most)."""
    return f"calibrate-{profile}"[:64]


def work_dir(root: Path, profile: str, stamp: str) -> Path:
    """Where the job's files go: `<runs root>/.calibrate/<profile>-<stamp>` (pure)."""
    return root / ".calibrate" / f"{profile}-{stamp.replace(':', '')}"


# --- in every rank of the job -------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationJob:
    """What each task of the job runs (pickled by submitit, imported by name in the ranks): join the
    job's gloo group as the trainer does, measure at once with the other ranks, gather on rank 0."""

    device: str = "cpu"

    def __call__(self) -> dict[str, Any] | None:
        import os

        import torch.distributed as tdist

        from vltrain import distenv
        from vltrain.calibrate import measure_rank
        from vltrain.engines.process_group import init_torch_process_group
        from vltrain.teardown import NativeTeardown

        NativeTeardown.install()  # gloo's threads can abort the interpreter's exit, as a training rank's
        dist = distenv.current()
        init_torch_process_group(dist, self.device)
        print(f"rank {dist.rank} of {dist.world_size}: in the group, measuring", flush=True)
        try:
            mine = measure_rank()
            everyone: list[Any] = [None] * dist.world_size
            tdist.all_gather_object(everyone, mine)
        finally:
            tdist.destroy_process_group()
        print(f"rank {dist.rank}: done", flush=True)
        NativeTeardown.decide(0)
        if not dist.is_main:
            return None
        return aggregate(everyone, os.environ.get("SLURM_JOB_ID") or "local", utc_now())


# --- the edge: submit, wait, cancel ---------------------------------------------------------------


def check_profile(profile: ClusterProfile) -> Backend:
    """The profile's backend, or one line on why it cannot calibrate: a GPU profile (the figures are
    those of CPU ranks), a scheduler that refuses the request or does not answer."""
    from clusterctl.backends import get_backend

    if profile.gpu.kind != "cpu":
        raise UserError(
            f"NAME: profile {profile.name!r} has gpu.kind = {profile.gpu.kind!r}; calibration measures CPU ranks "
            "(fp32 matmul, gloo); allowed: a profile with gpu.kind = 'cpu'"
        )
    backend = get_backend(profile.executor)
    check = backend.check_profile(profile)
    if check.skipped:
        why = check.skipped.partition(" (")[2].removesuffix(")") or check.skipped  # "... (REASON)"
        raise UserError(
            f"Slurm unreachable ({why}): nothing submitted; allowed: a machine where the profile's "
            "scheduler answers (sinfo; SLURM_CONF)"
        )
    if check.problems:
        raise UserError(check.problems[0])
    return backend


def submit(backend: Backend, profile: ClusterProfile, folder: Path) -> tuple[LaunchSpec, str]:
    """Start the job (edge): the attempt's launch spec of the profile, run directory `folder`."""
    import submitit

    spec = backend.launch_spec(profile, folder, job_name(profile.name))
    with submitit.helpers.clean_env():  # from inside a job: its SLURM_* must not shape this one
        job_id = backend.submit(spec, CalibrationJob(profile.gpu.kind))
    return spec, job_id


def task_paths(spec: LaunchSpec, job_id: str, task: int) -> Any:
    """submitit's files of one task (its result pickle, logs), as submitit names them."""
    from submitit.core.utils import JobPaths

    return JobPaths(Path(spec.folder) / "%j", job_id=job_id, task_id=task)


def failure_line(spec: LaunchSpec, job_id: str, tasks: int, state: str) -> str:
    """Why the job failed, in one line with the log to read: the first task whose result is an error
    (the last line of its traceback), else task 0's log."""
    from clusterctl.backends.results import pickle_error
    from vltrain.common import safe_read

    for t in range(tasks):
        paths = task_paths(spec, job_id, t)
        try:
            why = pickle_error(safe_read.read_head(paths.result_pickle, 1 << 20))
        except OSError:
            continue
        if why:
            return f"calibration job {job_id} failed ({state}): {why}; its log: {paths.stderr}"
    return f"calibration job {job_id} ended {state} without figures; its log: {task_paths(spec, job_id, 0).stderr}"


def read_result(spec: LaunchSpec, job_id: str) -> tuple[str, Any] | None:
    """Rank 0's submitit result ("success", figures) or ("error", traceback), None before there is one."""
    from submitit.core.utils import pickle_load

    path = task_paths(spec, job_id, 0).result_pickle
    if not path.is_file():
        return None
    try:
        return tuple(pickle_load(path))  # type: ignore[return-value]
    except (EOFError, OSError):  # being written: next round
        return None


def wait(
    backend: Backend,
    spec: LaunchSpec,
    job_id: str,
    profile: ClusterProfile,
    timeout_s: float,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Wait for the figures (edge). Cancels the job on the time-out, on Ctrl-C (re-raised) and on a
    failure; a failure or a time-out is one line (UserError) with the log's path."""
    start = time.monotonic()
    run = RunRecord(
        "calibrate", spec.job_name, profile.name, profile.executor, str(Path(spec.folder).parent), time.time(),
        "", profile.world_size, 0, RunState.RUNNING,
    )  # fmt: skip
    job = JobRecord(job_id, run.run_id, 1, "submit", time.time(), str(backend.initial_state))
    ended: float | None = None  # when the scheduler first said COMPLETED
    try:
        while True:
            time.sleep(POLL_S)  # first: a local job's process is not yet itself right after the fork
            result = read_result(spec, job_id)
            if result is not None and result[0] == "success":
                return dict(result[1])
            poll = backend.poll([(run, job)], time.time(), None)
            for k, v in poll.changes[0].items():
                setattr(job, k, v)
            if result is None and job.state == RunState.COMPLETED:  # rank 0's file may lag (NFS caches)
                ended = ended or time.monotonic()
                if time.monotonic() - ended < RESULT_LAG_S:
                    continue
            if result is not None or job.state in FINAL_STATES:
                if job.state not in FINAL_STATES:  # rank 0 failed first: the others still run
                    job.state = RunState.FAILED
                raise UserError(failure_line(spec, job_id, profile.world_size, job.state))
            elapsed = time.monotonic() - start
            if elapsed > timeout_s:
                raise UserError(
                    f"--timeout: calibration job {job_id} did not finish in {timeout_s:g} s ({job.state}); "
                    f"cancelled it; its log: {task_paths(spec, job_id, 0).stderr}"
                )
            why = poll.waiting.get(job_id, {}).get("reason")  # the scheduler's, while it holds the job back
            progress(f"calibration job {job_id}: {job.state.lower()}{f' ({why})' if why else ''}, {elapsed:.0f} s")
    except BaseException:
        cancel(backend, job_id)
        raise


def cancel(backend: Backend, job_id: str) -> None:
    """Stop the job, best effort: a job that already ended, or a scheduler that does not answer, is
    left as it is (the error that got us here is the one to show)."""
    with contextlib.suppress(UserError, ServiceUnavailable, OSError):
        backend.cancel(job_id)


def calibrate(
    profile: ClusterProfile,
    root: Path,
    timeout_s: float = TIMEOUT_S,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run the calibration job of `profile` with its files under `root` and return its table (edge)."""
    backend = check_profile(profile)
    folder = work_dir(root, profile.name, utc_now())
    folder.mkdir(parents=True, exist_ok=True)
    spec, job_id = submit(backend, profile, folder)
    progress(f"calibration job {job_id}: submitted")
    return wait(backend, spec, job_id, profile, timeout_s, progress)
