"""Profile + plan -> what submitit submits (pure), and the submission itself (edge).

Plan, render, submit are separate steps (torchx's dryrun -> schedule): `launch_spec` is pure,
`render_sbatch` renders the exact sbatch text with submitit's own renderer, and `submit` is the only
function here that talks to Slurm or starts a process. A dry run is the same path minus `submit`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterctl.profiles import ENV_NAME, SAFE_VALUE, SLURM_NAME, SLURM_NAME_DOC, ClusterProfile, comm_env
from vltrain.errors import UserError

# Exit codes that mean "the cluster failed, not the code": retried up to --max-retries.
# 137/143: killed by SIGKILL/SIGTERM outside a time-out (node reboot, OOM-killer on a sick node),
# 75: EX_TEMPFAIL, which the trainer uses for a lost rendezvous / NCCL communicator error.
CLUSTER_EXIT_CODES = (75, 137, 143)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to submit one attempt of a run; JSON-able, written to the run directory."""

    executor: str  # "slurm" | "local"
    folder: str  # submitit's folder (inside the run directory)
    job_name: str
    params: dict[str, Any]  # submitit executor parameters
    env: dict[str, str] = field(default_factory=dict)
    max_num_timeout: int = 1000  # requeues on time-out/preemption before submitit gives up


def check_job_name(name: str) -> str:
    if not re.fullmatch(SLURM_NAME, name):
        raise UserError(f"--name: {name!r} is not a valid job name; allowed: {SLURM_NAME_DOC}")
    return name


def trainer_env(profile: ClusterProfile, run_dir: Path) -> dict[str, str]:
    """Environment for every rank: the fabric's NCCL/gloo settings plus the trainer's own."""
    env = comm_env(profile)
    env |= {
        "PYTHONUNBUFFERED": "1",
        "CODECARBON_LOG_LEVEL": "error",  # codecarbon overrides logger levels at import; only this works
        "CLUSTERCTL_RUN_DIR": str(run_dir),
        "CLUSTERCTL_PROFILE": profile.name,
        "VLTRAIN_PEAK_TFLOPS": f"{profile.gpu.peak_bf16_tflops:g}",
        "VLTRAIN_COUNTRY": profile.site.country_iso,
        "VLTRAIN_PUE": f"{profile.site.pue:g}",
    }
    if profile.gpu.kind == "cpu":
        threads = max(1, profile.nodes.cpus_per_node // profile.nodes.gpus_per_node)
        env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads)}
    for k, v in env.items():  # defence in depth: nothing that reaches the script can break a line
        if not re.fullmatch(ENV_NAME, k) or not re.fullmatch(SAFE_VALUE, v):
            raise UserError(f"environment: {k}={v!r} is not allowed; allowed: names matching {ENV_NAME}, values without quotes, $, ` or newlines")
    return env


def launch_spec(profile: ClusterProfile, run_dir: Path, job_name: str, hold: bool = False) -> LaunchSpec:
    """The submitit parameters for one attempt of a run on `profile` (pure); `hold`: sbatch --hold."""
    check_job_name(job_name)
    env = trainer_env(profile, run_dir)
    setup = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    folder = str(run_dir / "submitit")
    n = profile.nodes
    if profile.executor == "local":
        if hold:
            raise UserError(f"--hold: the {profile.name!r} profile runs a local process; allowed: --hold with a Slurm profile")
        params: dict[str, Any] = {
            "tasks_per_node": n.gpus_per_node,
            "gpus_per_node": n.gpus_per_node if profile.gpu.kind == "cuda" else 0,
            "timeout_min": 24 * 60,
            "signal_delay_s": 30,
            "setup": setup,
        }
        return LaunchSpec("local", folder, job_name, params, env)
    s = profile.slurm
    assert s is not None  # parse_profile guarantees a [slurm] table for executor = "slurm"
    params = {
        "job_name": job_name,
        "nodes": n.count,
        "ntasks_per_node": n.gpus_per_node,
        "gpus_per_node": n.gpus_per_node,
        "cpus_per_task": max(1, n.cpus_per_node // n.gpus_per_node),
        "mem": f"{n.memory_gib}GB",
        "time": max(1, int(profile.time_limit_min or 1)),
        "signal_delay_s": s.signal_delay_s,
        "setup": setup,
        "additional_parameters": {"requeue": True} | ({"hold": True} if hold else {}) | dict(s.extra),
    }
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    if s.exclusive:
        params["exclusive"] = True
    return LaunchSpec("slurm", folder, job_name, params, env)


def submitit_command(folder: str, python: str | None = None) -> str:
    """The command line submitit runs on each task (as SlurmExecutor._submitit_command_str)."""
    py = python or shlex.quote(sys.executable)
    return " ".join([py, "-u -m submitit.core._submit", shlex.quote(folder)])


def render_sbatch(spec: LaunchSpec, python: str | None = None) -> str:
    """The exact sbatch script submitit submits for `spec`, rendered by submitit itself (pure).

    Uses submitit's module-level renderer, the same function SlurmExecutor calls; constructing a
    SlurmExecutor would need `srun` on this machine, and a dry run must work anywhere.
    """
    if spec.executor != "slurm":
        raise UserError(f"--dry-run: the {spec.executor!r} executor runs a local process, not an sbatch script")
    from submitit.slurm.slurm import _make_sbatch_string

    folder = str(Path(spec.folder) / "%j")
    return _make_sbatch_string(command=submitit_command(folder, python), folder=folder, **spec.params)


def make_executor(spec: LaunchSpec):
    """A configured submitit executor for `spec` (edge: it checks for srun on Slurm)."""
    import submitit

    if spec.executor == "local":
        ex = submitit.LocalExecutor(folder=str(Path(spec.folder) / "%j"), max_num_timeout=spec.max_num_timeout)
    else:
        try:
            ex = submitit.SlurmExecutor(folder=str(Path(spec.folder) / "%j"), max_num_timeout=spec.max_num_timeout)
        except RuntimeError as e:
            raise UserError(f"--profile: executor 'slurm' needs Slurm's client tools on this machine ({e}); allowed: a machine with srun/sbatch, or --profile local") from None
    ex.update_parameters(**spec.params)
    return ex


@contextlib.contextmanager
def _quiet_fds(fds=(2,)):
    """Point file descriptors (stderr; for a local job also stdout) at /dev/null for the duration.
    Child processes inherit them: sbatch must not print over our one-line error, and a local job
    (a long-lived child of this CLI) must not hold the caller's stdout open, or `$(clusterctl submit)`
    and captured subprocesses would wait for the whole training run. Its logs go to files anyway."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(null, fd)
        yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(null)


@contextlib.contextmanager
def _own_session():
    """Start submitit's local controller in a session of its own. submitit means it to outlive the
    submitting process, but starts it in the caller's process group: Ctrl-C in the terminal that ran
    `submit --watch` (SIGINT to the foreground group) or closing that SSH session (SIGHUP) would kill
    the training run. submitit has no option for it, so its module's view of `subprocess` gets a
    Popen with start_new_session=True for the duration of the call (and only that module's)."""
    import functools
    import subprocess

    from submitit.local import local as submitit_local

    class InOwnSession:  # `subprocess` as submitit's local module sees it, but for Popen
        Popen = functools.partial(subprocess.Popen, start_new_session=True)

        def __getattr__(self, name: str):
            return getattr(subprocess, name)

    saved = submitit_local.subprocess
    submitit_local.subprocess = InOwnSession()  # type: ignore[assignment]
    try:
        yield
    finally:
        submitit_local.subprocess = saved


def submit(spec: LaunchSpec, fn: Any) -> Any:
    """Submit `fn` (a submitit Checkpointable) and return the submitit job; Slurm errors become one line."""
    ex = make_executor(spec)
    import submitit

    try:
        if spec.executor == "local":
            with _quiet_fds((1, 2)), _own_session():
                return ex.submit(fn)
        with _quiet_fds((2,)):
            return ex.submit(fn)
    except submitit.core.utils.FailedJobError as e:
        from clusterctl.slurm import sbatch_error_line

        raise UserError(f"sbatch: {sbatch_error_line(str(e))}") from None
    finally:
        try:  # submitit leaves an empty directory literally named '%j' behind
            (Path(spec.folder) / "%j").rmdir()
        except OSError:
            pass
