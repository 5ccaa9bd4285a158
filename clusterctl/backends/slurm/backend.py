"""Slurm through submitit: sbatch scripts rendered by submitit, states from squeue and sacct.

`poll` asks at most one squeue and one sacct for every job it is given: squeue for all of them, then
sacct only for the jobs squeue cannot answer for (left the queue, ended, or requeued). When
accounting is unavailable, states come from squeue and the registry; when slurmctld does not answer
in time, the last known states stand; the Poll says which (`source` and `notes`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.backends import results
from clusterctl.backends.api import Backend, Poll, ProfileCheck
from clusterctl.backends.slurm import commands as slurm
from clusterctl.backends.slurm.parse import AcctRow, Partition, QueueRow, pending_words
from clusterctl.specs import FINAL_STATES, JobRecord, LaunchSpec, RunRecord, RunState
from vltrain.common.errors import ServiceUnavailable, UserError

if TYPE_CHECKING:  # launching needs the profile; polling (status) does not import planning
    from clusterctl.planning.profiles import ClusterProfile

SACCT_LAG_S = 120  # a job this young may not be in accounting yet: keep its state
SIDE_TIME_MIN = 15  # a side job without GPUs (the follow-up that retries a run) does little: minutes
LIVE = (RunState.PENDING, RunState.RUNNING, RunState.COMPLETING, RunState.SUSPENDED)  # squeue says all


@dataclass
class SlurmView:
    """What Slurm said in this invocation (None: that source did not answer)."""

    queue: dict[str, QueueRow] | None = None
    acct: dict[str, AcctRow] | None = None
    source: str = "registry"
    notes: list[str] = field(default_factory=list)


# --- pure ---------------------------------------------------------------------------------------


def job_changes(
    job: JobRecord, q: QueueRow | None, a: AcctRow | None, now: float, outcome: str | None = None
) -> dict[str, Any]:
    """The registry fields of `job` that Slurm's rows change (the controller wins for live state,
    accounting for times and totals). `outcome`: submitit's result file, for jobs Slurm forgot."""
    new: dict[str, Any] = {}
    if q is not None and q.state != RunState.UNKNOWN:
        new["state"] = q.state
    elif a is not None:
        new["state"] = a.state
    elif outcome is not None:
        new["state"] = outcome
    elif q is None and now - job.submitted_at > SACCT_LAG_S and job.state not in FINAL_STATES:
        new["state"] = RunState.UNKNOWN  # neither knows it and it is too old to be accounting lag
    restarts = max([job.requeues] + ([q.restarts] if q else []) + ([a.requeues] if a else []))
    new["requeues"] = restarts
    if a is not None:
        new |= {"started_at": a.start, "ended_at": a.end, "elapsed_s": a.elapsed_s}
        if a.state in FINAL_STATES:  # a running job's row says 0:0; the exit code is known only at the end
            new["exit_code"] = a.exit_code
    if q is not None:
        lagging = a is None or a.state not in FINAL_STATES or a.end is None
        if lagging and q.state in FINAL_STATES and job.ended_at is None and new.get("ended_at") is None:
            # ended as far as the controller says, not yet in accounting (no row, or a row still
            # running: slurmdbd has the start, not the end): when it was first seen ended (accounting's
            # own end replaces it). needs_poll counts the accounting lag from here, so a job that ran
            # for hours still gets its exit code (was: from its submission, hours ago).
            new["ended_at"] = now
        if q.start is not None and q.state != RunState.PENDING:
            new["started_at"] = q.start
        if a is None and q.elapsed_s is not None:  # no accounting: the current attempt only
            new["elapsed_s"] = max(q.elapsed_s, job.elapsed_s or 0.0)
    gpus = (a.alloc_gpus if a else None) or (q.alloc_gpus if q else None)
    nodes = (q.node_list if q else None) or (a.node_list if a else None)
    new |= {"alloc_gpus": gpus, "node_list": nodes}
    return {k: v for k, v in new.items() if v is not None and getattr(job, k) != v}


def waiting(q: QueueRow | None) -> dict[str, Any] | None:
    """Why a job the controller holds back has not started, and when squeue expects it to (its StartTime
    for a pending job: the backfill scheduler's estimate, also what `squeue --start` prints); None for a
    job that is not waiting."""
    if q is None or q.state not in (RunState.PENDING, RunState.REQUEUED) or q.reason in ("", "None"):
        return None
    return {"reason": q.reason, "detail": pending_words(q.reason, q.job_id), "expected_start": q.start}


def accounting_needed(job: JobRecord, q: QueueRow | None) -> bool:
    """Does this job need sacct, or does squeue's row say all status shows? squeue is enough for a
    job pending or running its first attempt (state, start, elapsed, GPUs, nodes); accounting is
    needed once it left the queue or ended (exit code, final elapsed) and after a requeue (sacct -D
    sums the elapsed time of every attempt; squeue knows only the current one)."""
    return q is None or q.state not in LIVE or q.restarts > 0 or job.requeues > 0


def query_slurm(jobs: list[JobRecord], timeout: float, since: float | None = None) -> SlurmView:
    """One squeue call for all `jobs`, then one sacct call for those that need accounting (all of
    them when the controller did not answer), with what failed noted. In the steady state (jobs
    pending or running) that is squeue alone: a few ms, and no load on slurmdbd, which answers in
    ~90 ms at best and is what a busy site's admins ask users not to poll.
    `since`: the earliest submission among them (sacct ignores older jobs that reused an id)."""
    view = SlurmView()
    if not jobs:
        return view
    ids = sorted({j.job_id for j in jobs})
    errors: dict[str, str] = {}
    started = time.monotonic()
    try:
        view.queue = slurm.squeue(ids, timeout)
    except ServiceUnavailable as e:
        errors["queue"] = e.reason
    except (UserError, OSError, ValueError) as e:  # odd bytes, no permission
        errors["queue"] = str(e)
    acct_ids = (
        ids
        if view.queue is None
        else sorted({j.job_id for j in jobs if accounting_needed(j, view.queue.get(j.job_id))})
    )
    if acct_ids:
        try:
            # what is left of the time-out (at least 2 s): a hung controller must not double the wait
            view.acct = slurm.sacct(acct_ids, max(2.0, timeout - (time.monotonic() - started)), since=since)
        except ServiceUnavailable as e:
            errors["acct"] = e.reason
        except (UserError, OSError, ValueError) as e:
            errors["acct"] = str(e)
    if "queue" in errors:
        rest = "accounting (sacct) and the registry" if view.acct is not None else "the registry"
        view.notes.append(
            f"Slurm controller unavailable ({errors['queue']}): showing the last known states from {rest}"
        )
    if "acct" in errors:
        view.notes.append(
            f"accounting unavailable ({errors['acct']}): "
            + (
                "states from squeue and the registry; elapsed time and GPU-hours count only what squeue saw"
                if view.queue is not None
                else "no accounting data either"
            )
        )
    view.source = "+".join(
        [s for s, v in (("squeue", view.queue), ("sacct", view.acct)) if v is not None]
        + (["registry"] if errors else [])
    )
    return view


def partition_check(profile: ClusterProfile, parts: dict[str, Partition]) -> ProfileCheck:
    """The profile's slurm.partition (none: the cluster's default) against the cluster's partitions
    (pure): a name that does not exist is refused (sbatch would refuse it later); so are more nodes than
    the partition holds or allows per job (Slurm would accept the job and leave it pending for ever:
    PartitionNodeLimit); a partition that is not UP is a warning (the job waits)."""
    check = ProfileCheck()
    name = profile.slurm.partition if profile.slurm else None
    default = next((p.name for p in parts.values() if p.default), None)
    exist = ", ".join(sorted(parts)) or "none: the cluster has no partition"
    if name and name not in parts:
        check.problems.append(
            f"slurm.partition: {name!r} is not a partition of this cluster (scontrol show partition); "
            f"allowed: {exist}" + (f" (or no slurm.partition: the cluster's default, {default})" if default else "")
        )
        return check
    name = name or default
    if name is None:
        check.problems.append(f"slurm.partition: not set and the cluster has no default partition; allowed: {exist}")
        return check
    part = parts[name]
    if part.node_limit is not None and profile.nodes.count > part.node_limit:
        check.problems.append(
            f"nodes.count: {profile.nodes.count} nodes, but partition {name} takes at most {part.node_limit} per "
            "job (its nodes, or MaxNodes: Slurm would leave the job pending for ever, PartitionNodeLimit); "
            f"allowed: at most {part.node_limit} nodes, or another partition"
        )
    if part.state != "UP":
        check.warnings.append(
            f"slurm.partition: {name!r} is {part.state}: the job waits until the partition is UP again"
        )
    return check


def placement(exclude: tuple[str, ...], dependency: str | None, kill_invalid: bool = True) -> dict[str, Any]:
    """sbatch's --exclude and --dependency for an attempt (pure). A dependency that can never hold (the
    job it waits for ended the other way) cancels the job (--kill-on-invalid-dep) instead of leaving it
    pending for ever with reason DependencyNeverSatisfied; not for a run queued after another
    (`kill_invalid=False`, submit --after), which follows that run's retries to their new job ids and is
    cancelled by clusterctl once that run has failed for good (runs.dependencies)."""
    out: dict[str, Any] = {}
    if exclude:
        out["exclude"] = ",".join(exclude)
    if dependency:
        out |= {"dependency": dependency, "kill_on_invalid_dep": "yes" if kill_invalid else "no"}
    return out


def mem_request(profile: ClusterProfile) -> str:
    """sbatch --mem: slurm.mem_gib when the profile states it; else, with whole nodes, 0 (all of each
    node's memory: a node whose RealMemory is a little under nodes.memory_gib still schedules, where
    --mem=<nodes.memory_gib>GB would leave the job pending on it for ever); else nodes.memory_gib."""
    s = profile.slurm
    if s is not None and s.mem_gib is not None:
        return f"{s.mem_gib}GB"
    if s is not None and s.exclusive:
        return "0"
    return f"{profile.nodes.memory_gib}GB"


# --- the backend --------------------------------------------------------------------------------


class SlurmBackend(Backend):
    name = "slurm"
    initial_state = RunState.PENDING
    has_accounting = True
    renders_script = True
    has_scheduler = True

    def launch_spec(
        self,
        profile: ClusterProfile,
        run_dir: Path,
        job_name: str,
        hold: bool = False,
        exclude: tuple[str, ...] = (),
        dependency: str | None = None,
    ) -> LaunchSpec:
        """The sbatch parameters (as submitit's SlurmExecutor takes them) for one attempt (pure)."""
        from clusterctl.backends import common, container
        from clusterctl.planning.nccl_env import flight_recorder_env

        common.check_job_name(job_name)
        env = common.trainer_env(profile, run_dir) | flight_recorder_env(profile, run_dir)
        in_container, python = container.launch(profile, run_dir, env)
        n, s = profile.nodes, profile.slurm
        if s is None:  # parse_profile refuses a Slurm profile without its [slurm] table
            raise UserError(f"--profile: {profile.name!r} has no [slurm] table; allowed: a profile with one")
        params: dict[str, Any] = {
            "job_name": job_name,
            "nodes": n.count,
            "ntasks_per_node": n.gpus_per_node,
            "gpus_per_node": n.gpus_per_node,
            "cpus_per_task": common.cpus_per_task(profile),
            "mem": mem_request(profile),
            "time": max(1, int(profile.time_limit_min or 1)),
            "signal_delay_s": s.signal_delay_s,
            "setup": common.setup_lines(env, run_dir, profile.setup),
            # one rank that dies takes the step down with it: the others would wait for NCCL's timeout
            "srun_args": ["--kill-on-bad-exit=1", *in_container],
            "additional_parameters": {"requeue": True}
            | ({"hold": True} if hold else {})
            | placement(exclude, dependency, kill_invalid=False)
            | dict(s.extra),
        }
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(s, key):
                params[key] = getattr(s, key)
        if s.exclusive:
            params["exclusive"] = True
        return LaunchSpec(self.name, common.submitit_folder(run_dir), job_name, params, env, python=python)

    def side_spec(
        self, profile: ClusterProfile, run_dir: Path, job_name: str, kind: str, dependency: str, gpus: int = 0
    ) -> LaunchSpec:
        """One task on one node, in the run's partition/account/qos, started once `dependency` holds
        (Slurm cancels it when the dependency can never hold: --kill-on-invalid-dep), after the profile's
        set-up lines; in the profile's container unless it runs clusterctl (container.HOST_SIDE_KINDS). (pure)"""
        from clusterctl.backends import common, container
        from vltrain.rundir import RunDir

        common.check_job_name(job_name)
        s = profile.slurm
        if s is None:
            raise UserError(f"--profile: {profile.name!r} has no [slurm] table; allowed: a profile with one")
        env = common.trainer_env(profile, run_dir)
        on_host = kind in container.HOST_SIDE_KINDS  # it calls sbatch, squeue and sacct: not from an image
        in_container, python = ([], None) if on_host else container.launch(profile, run_dir, env)
        params: dict[str, Any] = {
            "job_name": job_name,
            "nodes": 1,
            "ntasks_per_node": 1,
            "cpus_per_task": common.cpus_per_task(profile),
            "mem": f"{max(1, min(profile.nodes.memory_gib, 4 if gpus == 0 else profile.nodes.memory_gib))}GB",
            "time": SIDE_TIME_MIN if gpus == 0 else max(1, int(profile.time_limit_min or 1)),
            "setup": common.setup_lines(env, run_dir, profile.setup),
            "additional_parameters": placement((), dependency),
        }
        if in_container:
            params["srun_args"] = in_container
        if gpus:
            params["gpus_per_node"] = gpus
        for key in ("partition", "account", "qos"):
            if getattr(s, key):
                params[key] = getattr(s, key)
        folder = str(RunDir(run_dir).side / kind)
        if "%" in folder:
            common.submitit_folder(run_dir)  # the same one-line refusal as the attempts'
        return LaunchSpec(self.name, folder, job_name, params, env, python=python)

    def submit_array(
        self, specs: list[LaunchSpec], fns: list[Any], sweep_dir: Path, max_parallel: int, release: bool = True
    ) -> list[str]:
        """submitit's array submission, each task in its own run directory (backends.slurm.array)."""
        from clusterctl.backends.slurm import array
        from vltrain.rundir import JobEnv

        array.link_tasks(sweep_dir, [Path(s.env[JobEnv.RUN_DIR]) for s in specs])
        return array.submit_array(array.array_spec(specs, sweep_dir, max_parallel), fns, release)

    def dryrun(self, spec: LaunchSpec, python: str | None = None) -> str:
        """The exact sbatch script submitit submits for `spec`, rendered by submitit itself (pure).

        Uses submitit's module-level renderer, the same function SlurmExecutor calls; constructing a
        SlurmExecutor would need `srun` on this machine, and a dry run must work anywhere.
        """
        from submitit.slurm.slurm import _make_sbatch_string

        from clusterctl.backends import common

        folder = str(Path(spec.folder) / "%j")
        python = spec.python or python  # a container's interpreter is the image's, whatever runs here
        return _make_sbatch_string(command=common.submitit_command(folder, python), folder=folder, **spec.params)

    def schedule(self, spec: LaunchSpec, fn: Any) -> str:
        from clusterctl.backends import common
        from clusterctl.backends.slurm.sbatch import BoundedSlurmExecutor, sbatch_timeout

        timeout = sbatch_timeout()  # sbatch runs under it: a hung controller is one line, not a hang
        try:
            ex = BoundedSlurmExecutor(
                folder=str(Path(spec.folder) / "%j"),
                max_num_timeout=spec.max_num_timeout,
                python=common.job_python(spec.python),
                sbatch_timeout_s=timeout,
            )
        except RuntimeError as e:
            raise UserError(
                f"--profile: executor 'slurm' needs Slurm's client tools on this machine ({e}); "
                "allowed: a machine with srun/sbatch, or --profile local"
            ) from None
        ex.update_parameters(**spec.params)
        return common.submit_with(ex, spec, fn, quiet=(2,))

    def needs_poll(self, run: RunRecord, job: JobRecord, now: float) -> bool:
        """Yes while the job is not final; and for a job that ended without its final accounting
        record yet (no exit code: slurmdbd lags the controller by up to a few seconds), for
        SACCT_LAG_S more, so its exit code and totals are not lost (retries need the exit code to
        tell a cluster failure from a user error)."""
        if job.state not in FINAL_STATES:
            return run.state not in FINAL_STATES
        return job.exit_code is None and now - (job.ended_at or job.submitted_at) < SACCT_LAG_S

    def poll(self, pairs: list[tuple[RunRecord, JobRecord]], now: float, timeout: float | None) -> Poll:
        jobs = [j for _, j in pairs]
        since = min((j.submitted_at for j in jobs), default=now) - 300  # slack for clock skew
        view = query_slurm(jobs, slurm.slurm_timeout() if timeout is None else timeout, since)
        answered = view.queue is not None or view.acct is not None  # (sacct may not have been asked)
        changes = []
        held: dict[str, dict[str, Any]] = {}
        for run, job in pairs:
            q = view.queue.get(job.job_id) if view.queue is not None else None
            a = view.acct.get(job.job_id) if view.acct is not None else None
            outcome = (
                results.submitit_outcome(run.run_dir, job.job_id)[0] if answered and q is None and a is None else None
            )
            changes.append(job_changes(job, q, a, now, outcome) if answered else {})
            if (w := waiting(q)) is not None:
                held[job.job_id] = w
        return Poll(changes, view.source if jobs else None, view.notes, held)

    def check_profile(self, profile: ClusterProfile) -> ProfileCheck:
        """The partition check (partition_check) against the cluster's own list, one scontrol call
        within $CLUSTERCTL_SLURM_TIMEOUT; a controller that does not answer, or no Slurm tools here,
        skips it (a dry run works anywhere; sbatch itself is the last word)."""
        try:
            parts = slurm.partitions(slurm.configured_timeout())
        except ServiceUnavailable as e:
            return ProfileCheck(skipped=f"slurm.partition not checked with the scheduler ({e.reason})")
        except OSError as e:  # no permission to run it, odd bytes
            return ProfileCheck(skipped=f"slurm.partition not checked with the scheduler ({e})")
        return partition_check(profile, parts)

    def cancel(self, job_id: str) -> None:
        slurm.scancel(job_id)

    def failed_nodes(self, run_dir: Path, job: JobRecord) -> tuple[list[str], str]:
        """srun's first culprit in the job's log (failed_nodes.culprit), else for NODE_FAIL its nodes
        that sinfo says are sick."""
        from clusterctl.backends.slurm import failed_nodes
        from vltrain.rundir import RunDir

        node, words = failed_nodes.culprit(failed_nodes.read_tail(RunDir(run_dir).task_log(job.job_id, 0, True)))
        if node:
            return [node], f"srun: {node}: {words}"
        if job.state == RunState.NODE_FAIL and job.node_list:
            try:
                sick = failed_nodes.sick_nodes(slurm.node_states(job.node_list, slurm.configured_timeout()))
            except (ServiceUnavailable, OSError) as e:
                return [], f"srun named no node and sinfo did not answer ({e})"
            if sick:
                return sick, f"NODE_FAIL; sinfo: {','.join(sick)} down, drained or failing"
        return [], "srun's log names no failed node"

    def exclusion_room(self, profile: ClusterProfile) -> int | None:
        """The partition's nodes less the nodes the job needs (scontrol show partition); None when unknown."""
        try:
            parts = slurm.partitions(slurm.configured_timeout())
        except (ServiceUnavailable, OSError):
            return None
        name = profile.slurm.partition if profile.slurm else None
        part = parts.get(name) if name else next((p for p in parts.values() if p.default), None)
        if part is None or part.total_nodes is None:
            return None
        return part.total_nodes - profile.nodes.count

    def set_dependency(self, job_id: str, dependency: str) -> None:
        slurm.set_dependency(job_id, dependency)


BACKEND = SlurmBackend()
