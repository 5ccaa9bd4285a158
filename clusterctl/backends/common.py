"""What the submitit-based backends share when they launch: job names, the trainer's environment,
the submission itself.

Both shipped backends start the trainer through submitit (its Slurm and local executors), so they
share how a job is named, what environment every rank gets (the NCCL/gloo settings of the fabric
plus vltrain's JobEnv contract), and how a submission is made quiet and one-line on error. Polling
needs none of this (backends.results): `status` does not import it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from clusterctl.planning.profiles import ENV_NAME, SAFE_VALUE, ClusterProfile, comm_env
from clusterctl.planning.profiles import check_job_name as check_job_name  # the backends call common.check_job_name
from clusterctl.specs import LaunchSpec
from vltrain.common.errors import UserError
from vltrain.rundir import DIST_TIMEOUT_S, STALL_TIMEOUT_S, STEP_DIST_TIMEOUT_S, JobEnv, RunDir


def trainer_env(profile: ClusterProfile, run_dir: Path) -> dict[str, str]:
    """Environment for every rank: the fabric's NCCL/gloo settings plus the trainer's own."""
    env = comm_env(profile)
    env |= {
        "PYTHONUNBUFFERED": "1",
        # no Python of the job (submitit's controller, the ranks, their workers) puts its working
        # directory or script's directory first on sys.path: see job_python
        "PYTHONSAFEPATH": "1",
        "CODECARBON_LOG_LEVEL": "error",  # codecarbon overrides logger levels at import; only this works
    }
    env |= JobEnv(
        run_dir=str(run_dir),
        profile=profile.name,
        peak_tflops=profile.gpu.peak_bf16_tflops,
        country=profile.site.country_iso,
        pue=profile.site.pue,
        device=profile.gpu.kind,
    ).to_env()
    cpus = cpus_per_task(profile)
    # DeepSpeed's accelerator from the profile, never from the submitting shell (sbatch exports it);
    # OpenMP threads = the CPUs of the task, not the node's (torch would start one per core of the node).
    env |= {"DS_ACCELERATOR": profile.gpu.kind, "OMP_NUM_THREADS": str(cpus)}
    if (code := RunDir(run_dir).code).is_dir():  # submit --snapshot: every attempt imports the submitted
        env["PYTHONPATH"] = str(Path(code).absolute())  # source, not the work tree's (runs.snapshot)
    if profile.executor == "slurm" and profile.slurm is not None:
        # Slurm 22.05-23.02 do not pass sbatch's --cpus-per-task on to srun: without this, each task
        # of the step gets one CPU (and its data-loader workers share it).
        env["SRUN_CPUS_PER_TASK"] = str(cpus)
        s = profile.slurm  # when a peer counts as lost: NCCL's time-out before and after step 1, the stall watchdog
        env |= {
            DIST_TIMEOUT_S: str(s.startup_timeout_s),
            STEP_DIST_TIMEOUT_S: str(s.collective_timeout_s),
            STALL_TIMEOUT_S: str(s.stall_timeout_s),
        }
    for k, v in env.items():  # defence in depth: nothing that reaches the script can break a line
        if not re.fullmatch(ENV_NAME, k) or not re.fullmatch(SAFE_VALUE, v):
            raise UserError(
                f"environment: {k}={v!r} is not allowed; allowed: names matching {ENV_NAME}, values without quotes, $, ` or newlines"
            )
    return env


def cpus_per_task(profile: ClusterProfile) -> int:
    """CPUs of one rank: the node's, shared by its tasks (one per GPU)."""
    return max(1, profile.nodes.cpus_per_node // profile.nodes.gpus_per_node)


# torch.distributed's launcher variables. sbatch and the local executor hand the submitting shell's
# environment to the job, and a shell may hold these (a notebook, or a job itself started by torchrun);
# the trainer reads them before Slurm's (torchrun inside an allocation is a valid launch:
# vltrain.distenv.detect), so a leaked WORLD_SIZE=1 would make every rank of a 64-GPU job train alone.
LAUNCHER_VARS = ("GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


def setup_lines(env: dict[str, str], run_dir: Path, user: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The job script's set-up: unset the launcher variables a submitting shell may leak (LAUNCHER_VARS),
    move into the run directory (a directory clusterctl made, not the one `submit` ran from: a cloned
    repository's files must not be the job's working directory), the profile's own `setup` lines
    (`user`: `module load ...`, `source env.sh`; the user's code in the user's job, as written), then
    the `export` lines for `env`, sorted (golden files compare them). The exports come last so that
    clusterctl's NCCL, thread and trainer settings win over what a module or a sourced file sets."""
    return [
        f"unset {' '.join(LAUNCHER_VARS)}",
        f"cd {shlex.quote(str(Path(run_dir).absolute()))} || exit 1",
        *user,
        *(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())),
    ]


def grouped(lines: tuple[str, ...] | list[str]) -> list[str]:
    """Set-up lines as one item for submitit's local executor, which joins its set-up items with ' && '
    into one `sh -c` line: a comment would swallow the rest and a failing line would stop the job. One
    brace group, a line each and ':' last, runs them as a batch script does (each on its own line, a
    failure not stopping the next unless the line says `|| exit 1`)."""
    return ["{\n" + "\n".join([*lines, ":"]) + "\n}"] if lines else []


def submitit_folder(run_dir: Path) -> str:
    """submitit's folder in the run directory. A '%' in it would be expanded by Slurm's file-name
    patterns (%j, %t, %N...) in --output/--error, and the job would die before it could log."""
    if "%" in str(run_dir):
        raise UserError(
            f"run directory: {str(run_dir)!r} contains '%', which Slurm expands in log file names; "
            "allowed: a path without % (CLUSTERCTL_RUNS_DIR or the working directory)"
        )
    return str(RunDir(run_dir).submitit)


def job_python(python: str | None = None) -> str:
    """The interpreter command of every task: `python -P`. `python -m submitit.core._submit` would
    otherwise put the working directory first on sys.path, and a `sentencepiece.py` (or any module the
    trainer imports) in the directory `submit` ran from would run in every rank. -P (PYTHONSAFEPATH,
    also exported by trainer_env for the processes the ranks start) leaves it out; the job's working
    directory is the run directory besides (setup_lines)."""
    return f"{python or shlex.quote(sys.executable)} -P"


def submitit_command(folder: str, python: str | None = None) -> str:
    """The command line submitit runs on each task (as SlurmExecutor._submitit_command_str)."""
    return " ".join([job_python(python), "-u -m submitit.core._submit", shlex.quote(folder)])


@contextlib.contextmanager
def quiet_fds(fds=(2,)):
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


def submit_with(executor: Any, spec: LaunchSpec, fn: Any, quiet: tuple[int, ...] = (2,)) -> str:
    """Submit `fn` with a configured submitit executor; returns the job id. sbatch's refusal becomes
    one line (its own reason); submitit's empty '%j' folder is removed."""
    import submitit

    try:
        with quiet_fds(quiet):
            return str(executor.submit(fn).job_id)
    except submitit.core.utils.FailedJobError as e:
        from clusterctl.backends.slurm.parse import sbatch_error_line

        raise UserError(f"sbatch: {sbatch_error_line(str(e))}") from None
    finally:
        with contextlib.suppress(OSError):  # submitit leaves an empty directory literally named '%j' behind
            (Path(spec.folder) / "%j").rmdir()
