"""What every scheduler backend provides (torchx's Scheduler interface, cut to what clusterctl needs).

A backend turns a profile into a launch spec (pure), shows what it would submit (`dryrun`, pure),
starts a job (`schedule`, the edge), says what happened to jobs (`poll`), and stops one (`cancel`).
`submit` is `dryrun`'s spec plus `schedule`: a dry run is the same path minus the last call.
The runs layer (clusterctl.runs) drives backends and never branches on which one it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from clusterctl.specs import FINAL_STATES, JobRecord, LaunchSpec, RunRecord, RunState
from vltrain.common.errors import UserError

if TYPE_CHECKING:  # launching needs the profile; polling (status) does not import planning
    from clusterctl.planning.profiles import ClusterProfile


@dataclass
class Poll:
    """A backend's answer about some jobs: registry fields that changed, and how it knew.

    `changes[i]` belongs to the i-th (run, job) pair polled; an empty dict is "nothing new". `source`
    names what was asked ("squeue+sacct"), None when nothing outside the run directory was; `notes`
    are lines for the user when a source did not answer. `waiting` says why a job still waits to start,
    by job id, for the jobs the scheduler holds back (shown, never stored: it is true only now):
    {"reason": the scheduler's code, "detail": it in words or None, "expected_start": epoch or None}.
    """

    changes: list[dict[str, Any]]
    source: str | None = None
    notes: list[str] = field(default_factory=list)
    waiting: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ProfileCheck:
    """What the scheduler says about a profile's request before anything is submitted: `problems`
    (submit refuses them), `warnings`, and `skipped`: why the scheduler was not asked (its tools are
    missing or it did not answer): not an error, the check is only left out."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: str | None = None


class Backend:
    """Base of the backends; subclasses set the traits and implement the methods."""

    name: ClassVar[str]
    initial_state: ClassVar[RunState]  # a run's state right after the backend accepted its job
    has_accounting: ClassVar[bool]  # elapsed times come from the scheduler (else from the clock)
    renders_script: ClassVar[bool] = False  # dryrun() is the job script the scheduler gets (sbatch)
    has_scheduler: ClassVar[bool] = False  # jobs can wait for others (side_spec): a follow-up retries

    def launch_spec(
        self,
        profile: ClusterProfile,
        run_dir: Path,
        job_name: str,
        hold: bool = False,
        exclude: tuple[str, ...] = (),
        dependency: str | None = None,
    ) -> LaunchSpec:
        """Everything needed to start one attempt of the run (pure). `exclude`: nodes the attempt must not
        run on (a retry avoids the nodes that failed); `dependency`: the scheduler's condition on other
        jobs (Slurm's --dependency syntax, e.g. "afterok:123"), None to start when resources allow."""
        raise NotImplementedError

    def side_spec(
        self, profile: ClusterProfile, run_dir: Path, job_name: str, kind: str, dependency: str, gpus: int = 0
    ) -> LaunchSpec:
        """A small job beside the run's attempts (one task; `gpus` of them on one node), started by the
        scheduler once `dependency` holds: the follow-up that retries a failed run with no clusterctl
        process running, an evaluation queued after training. Its submitit folder is
        `<run_dir>/side/<kind>/`, apart from the attempts' (runs.repair counts those as the run's jobs).
        The default: no scheduler to hold a job back (a local process), one line."""
        raise UserError(
            f"--profile: executor {self.name!r} has no scheduler to queue a {kind} job after another; "
            "allowed: a Slurm profile"
        )

    def set_dependency(self, job_id: str, dependency: str) -> None:
        """Change what a pending job waits for (Slurm's --dependency syntax): a run queued after another
        follows that run's retry to its new job. The default: no scheduler holds jobs back, one line."""
        raise UserError(f"--after: executor {self.name!r} has no scheduler to hold a job; allowed: a Slurm profile")

    def submit_array(
        self, specs: list[LaunchSpec], fns: list[Any], sweep_dir: Path, max_parallel: int, release: bool = True
    ) -> list[str]:
        """Start one attempt per spec as ONE job array (a sweep's points, each its own run), at most
        `max_parallel` at once; returns each task's job id. The default: no scheduler, one line."""
        raise UserError(f"--sweep: executor {self.name!r} has no job arrays; allowed: a Slurm profile")

    def dryrun(self, spec: LaunchSpec) -> str:
        """What `schedule` would submit, as text a user can read and diff (pure)."""
        raise NotImplementedError

    def schedule(self, spec: LaunchSpec, fn: Any) -> str:
        """Start `fn` (a submitit Checkpointable) as a job; returns its id (edge)."""
        raise NotImplementedError

    def submit(self, spec: LaunchSpec, fn: Any) -> str:
        return self.schedule(spec, fn)

    def needs_poll(self, run: RunRecord, job: JobRecord, now: float) -> bool:
        """Ask about this job again? While it is not final and its run is active."""
        return job.state not in FINAL_STATES and run.state not in FINAL_STATES

    def poll(self, pairs: list[tuple[RunRecord, JobRecord]], now: float, timeout: float | None) -> Poll:
        """What changed for each job, in as few scheduler calls as possible (one batch for all)."""
        raise NotImplementedError

    def check_profile(self, profile: ClusterProfile) -> ProfileCheck:
        """Ask the scheduler, when one answers, whether it would take the profile's request (edge);
        the default: nothing to ask (a local process needs no scheduler)."""
        return ProfileCheck()

    def failed_nodes(self, run_dir: Path, job: JobRecord) -> tuple[list[str], str]:
        """The node(s) a failed job's failure came from, and how that is known (edge: its logs, the
        scheduler); ([], why none) when nothing tells. The default: a local process has no nodes to avoid."""
        return [], "no scheduler's nodes to tell apart"

    def exclusion_room(self, profile: ClusterProfile) -> int | None:
        """How many nodes an attempt of `profile` may exclude and still fit where it runs (edge); None
        when the scheduler does not say. The default: none (a local process runs here)."""
        return 0

    def cancel(self, job_id: str) -> None:
        """Stop a job; the trainer checkpoints on the way out where the scheduler lets it."""
        raise NotImplementedError

    def recover_job(self, run_dir: Path, job: JobRecord, gpus: int) -> dict[str, Any] | None:
        """What the run directory alone tells about one of its jobs when the registry is rebuilt from
        the run directories (runs.repair): the registry fields to set, or None to leave the job to the
        next refresh. The default: None, the scheduler is asked (Slurm's accounting remembers ended
        jobs); a backend whose jobs no scheduler remembers (local processes) reads them from the files."""
        return None
