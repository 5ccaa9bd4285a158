"""This machine through submitit's LocalExecutor: the `local` profile, `make demo` and the laptop case.

A local job's id is the pid of submitit's controller process. Its state comes from the run
directory (submitit's result pickle) and /proc (is the controller still there), never from a
scheduler; there is no accounting, so elapsed time and GPU-hours come from the registry's clock.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.backends import results
from clusterctl.backends.api import Backend, Poll
from clusterctl.specs import FINAL_STATES, JobRecord, LaunchSpec, RunRecord, RunState
from vltrain.common.errors import UserError

if TYPE_CHECKING:  # launching needs the profile; polling (status) does not import planning
    from clusterctl.planning.profiles import ClusterProfile


@contextlib.contextmanager
def own_session():
    """Start submitit's local controller in a session of its own. submitit means it to outlive the
    submitting process, but starts it in the caller's process group: Ctrl-C in the terminal that ran
    `submit --watch` (SIGINT to the foreground group) or closing that SSH session (SIGHUP) would kill
    the training run. submitit has no option for it, so its module's view of `subprocess` gets a
    Popen with start_new_session=True for the duration of the call (and only that module's)."""
    from submitit.local import local as submitit_local

    class InOwnSession:  # `subprocess` as submitit's local module sees it, but for Popen
        Popen = functools.partial(subprocess.Popen, start_new_session=True)

        def __getattr__(self, name: str):
            return getattr(subprocess, name)

    saved = submitit_local.subprocess
    vars(submitit_local)["subprocess"] = InOwnSession()  # the module's name bound to a stand-in, on purpose
    try:
        yield
    finally:
        submitit_local.subprocess = saved


def pid_alive(pid: str) -> bool:
    """Is submitit's local controller process still there? /proc guards against pid reuse."""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
        return b"submitit" in cmdline
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        try:
            os.kill(int(pid), 0)
            return True
        except (OSError, ValueError):
            return False


def local_changes(run: RunRecord, job: JobRecord, now: float) -> dict[str, Any]:
    """State of a local-executor job (job id = pid of submitit's controller) from its files."""
    outcome, mtime = results.submitit_outcome(run.run_dir, job.job_id)
    if outcome is not None:
        new = {"state": outcome, "ended_at": mtime, "elapsed_s": max(0.0, (mtime or now) - job.submitted_at)}
    elif pid_alive(job.job_id):
        new = {"state": RunState.RUNNING, "started_at": job.started_at or job.submitted_at}
    elif job.state in FINAL_STATES:
        return {}
    else:  # gone without a result: killed (OOM, reboot, kill -9)
        new = {"state": RunState.FAILED, "ended_at": now, "elapsed_s": max(0.0, now - job.submitted_at)}
    new["alloc_gpus"] = run.gpus
    return {k: v for k, v in new.items() if getattr(job, k) != v}


def terminate(pid: int) -> None:
    """SIGTERM the trainer processes of a local job (they checkpoint and exit), then submitit's
    controller: the controller alone does not pass the signal on to its children."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for p in [*map(int, children), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)


class LocalBackend(Backend):
    name = "local"
    initial_state = RunState.RUNNING
    has_accounting = False

    def launch_spec(
        self,
        profile: ClusterProfile,
        run_dir: Path,
        job_name: str,
        hold: bool = False,
        exclude: tuple[str, ...] = (),
        dependency: str | None = None,
    ) -> LaunchSpec:
        """One process per rank on this machine; `exclude` has no nodes to name here (ignored)."""
        from clusterctl.backends import common

        common.check_job_name(job_name)
        if dependency:
            raise UserError(
                f"--after: the {profile.name!r} profile runs a local process, with no scheduler to hold it "
                "until another job ends; allowed: --after with a Slurm profile"
            )
        if hold:
            raise UserError(
                f"--hold: the {profile.name!r} profile runs a local process; allowed: --hold with a Slurm profile"
            )
        if profile.container is not None:
            raise UserError(
                f"container: the {profile.name!r} profile runs its ranks as processes of this machine, with no "
                "srun for pyxis or apptainer to wrap; allowed: [container] with a Slurm profile"
            )
        env = common.trainer_env(profile, run_dir)
        n = profile.nodes
        params: dict[str, Any] = {
            "tasks_per_node": n.gpus_per_node,
            "gpus_per_node": n.gpus_per_node if profile.gpu.kind == "cuda" else 0,
            "timeout_min": 24 * 60,
            "signal_delay_s": 30,
            # the profile's set-up lines too, as one group (common.grouped: submitit joins items with &&)
            "setup": common.setup_lines(env, run_dir, common.grouped(profile.setup)),
        }
        return LaunchSpec(self.name, common.submitit_folder(run_dir), job_name, params, env)

    def dryrun(self, spec: LaunchSpec) -> str:
        run_dir = Path(spec.folder).parent
        return f"local executor: {spec.params['tasks_per_node']} process(es) on this machine, run dir {run_dir}"

    def schedule(self, spec: LaunchSpec, fn: Any) -> str:
        import submitit

        from clusterctl.backends import common

        ex = submitit.LocalExecutor(
            folder=str(Path(spec.folder) / "%j"), max_num_timeout=spec.max_num_timeout, python=common.job_python()
        )
        ex.update_parameters(**spec.params)
        with own_session():
            return common.submit_with(ex, spec, fn, quiet=(1, 2))

    def poll(self, pairs: list[tuple[RunRecord, JobRecord]], now: float, timeout: float | None) -> Poll:
        return Poll([local_changes(run, job, now) for run, job in pairs])

    def cancel(self, job_id: str) -> None:
        terminate(int(job_id))

    def recover_job(self, run_dir: Path, job: JobRecord, gpus: int) -> dict[str, Any] | None:
        """No scheduler remembers a local job: the files are all there is. Its end is submitit's result,
        else FAILED once its controller is gone (ended when the job's folder last changed); None while
        the controller runs (the next refresh polls it)."""
        from vltrain.rundir import RunDir

        outcome, ended = results.submitit_outcome(str(run_dir), job.job_id)
        submitted = job.submitted_at
        if outcome is None:
            if pid_alive(job.job_id):
                return None
            outcome = RunState.FAILED
            try:
                ended = max(p.stat().st_mtime for p in (RunDir(run_dir).submitit / job.job_id).iterdir())
            except (OSError, ValueError):
                ended = submitted
        return {
            "state": outcome,
            "started_at": submitted,
            "ended_at": ended,
            "elapsed_s": max(0.0, (ended or submitted) - submitted),
            "alloc_gpus": gpus,
        }


BACKEND = LocalBackend()
