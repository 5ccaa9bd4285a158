"""Runs that wait for other runs: `submit --after RUN[:ok|any]`, and what each new attempt re-arms.

`--after A` (or `A:ok`) starts the new run once A COMPLETED, `A:any` once A ended however. The
scheduler holds it: its first job gets `--dependency=afterok:<A's current job>` (afterany for :any),
recorded in its plan ("after": [{"run_id", "name", "condition", "job_id"}]). A's retry is a new job
with a new id, so a dependent must not be cancelled when A's failed job ends: its dependency is
submitted with --kill-on-invalid-dep=no (backends.slurm.placement) and re-pointed at A's new job by
`on_new_attempt` (`scontrol update Dependency=`, registry event "dependency"), which
runs.submit.submit_attempt calls for every attempt (it also re-arms the evaluation job, runs.evaljob).
When A has failed for good (not retried: no retries left, or the user's error) or was cancelled,
`settle`, run by every command that refreshes runs, cancels its :ok dependents and says why (the
dependent's "cancel" event has the reason). A run already COMPLETED is no dependency; one that ended
otherwise is refused with :ok.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from clusterctl.specs import FINAL_STATES, RunRecord, RunState
from vltrain.common.errors import UserError

if TYPE_CHECKING:
    from clusterctl.planning.profiles import ClusterProfile
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.status import Refresh

CONDITIONS = {"ok": "afterok", "any": "afterany"}  # --after's word -> Slurm's dependency type
WAITING = ("Dependency", "DependencyNeverSatisfied")  # squeue's reasons for a job held by its dependency


# --- pure ---------------------------------------------------------------------------------------


def parse_after(text: str) -> tuple[str, str]:
    """`RUN`, `RUN:ok` or `RUN:any` -> (RUN, condition), or a one-line error naming --after."""
    ref, sep, cond = text.rpartition(":")
    if not sep:
        ref, cond = text, "ok"
    if not ref or cond not in CONDITIONS:
        raise UserError(
            f"--after: {text!r} is not RUN[:ok|any]; allowed: a run id or name, then :ok (start once it "
            "completed, the default) or :any (once it ended however)"
        )
    return ref, cond


def dependency(after: Iterable[dict[str, Any]]) -> str | None:
    """Slurm's --dependency for a run's `after` records (all must hold: comma), None without any."""
    parts = [f"{CONDITIONS[a['condition']]}:{a['job_id']}" for a in after if a.get("job_id")]
    return ",".join(parts) or None


def waiting_words(after: list[dict[str, Any]]) -> str:
    """What a run held by its dependency waits for, in words: 'waiting for run A to complete'."""
    said = [f"run {a['run_id']} to {'complete' if a['condition'] == 'ok' else 'end'}" for a in after]
    return "waiting for " + " and ".join(said)


# --- registry + backend (edge) ------------------------------------------------------------------


def resolve_after(
    reg: Registry, texts: list[str], executor: str, state_of: Callable[[Registry, RunRecord], str]
) -> list[dict[str, Any]]:
    """The `after` records of `--after` values (refused in one line naming --after: an unknown run, one
    on another executor, one that ended other than COMPLETED with :ok). `state_of`: the run's state now
    (lifecycle.current_state: refreshed, and retried if its last job failed for a cluster reason).
    A run that already ended (COMPLETED, or anything with :any) gets no job id: nothing to wait for."""
    out = []
    for text in texts:
        ref, cond = parse_after(text)
        try:
            run = reg.get_run(ref)
        except UserError:
            raise UserError(
                f"--after: no run {ref!r} in the registry; allowed: a run id, a unique id prefix or a run name "
                "(clusterctl status --all lists them)"
            ) from None
        if run.executor != executor:
            raise UserError(
                f"--after: run {run.run_id} runs on executor {run.executor!r}, this run on {executor!r}; "
                "allowed: a run of the same scheduler"
            )
        state = state_of(reg, run)
        if state in FINAL_STATES and state != RunState.COMPLETED and cond == "ok":
            raise UserError(
                f"--after: run {run.run_id} ended {state}, so it will never complete; allowed: "
                f"--after {run.run_id}:any (start once it ended however) or a run that may still complete"
            )
        jobs = reg.jobs(run.run_id)
        job_id = jobs[-1].job_id if jobs and state not in FINAL_STATES else None
        out.append({"run_id": run.run_id, "name": run.name, "condition": cond, "job_id": job_id})
    return out


def on_new_attempt(reg: Registry, run: RunRecord, profile: ClusterProfile, job_id: str) -> None:
    """A new job of `run` was submitted (runs.submit.submit_attempt): queue its evaluation after it
    (runs.evaljob.arm) and point the runs still waiting for `run` at it. Never raises: the attempt
    is submitted; what could not be re-armed is a registry event with the error."""
    from clusterctl.runs import evaljob

    try:
        evaljob.arm(reg, run, profile, job_id)
    except (UserError, OSError, RuntimeError) as e:  # submitit's sbatch failure is a RuntimeError
        reg.add_event(run.run_id, evaljob.EVENT, {"after": job_id, "error": str(e)})
    for d in dependents(reg, run.run_id):
        repoint(reg, d)


def dependents(reg: Registry, run_id: str, conditions: tuple[str, ...] = ("ok", "any")) -> list[RunRecord]:
    """Active runs submitted --after `run_id` (with one of `conditions`)."""
    return [
        d
        for d in reg.list_runs(include_finished=False)
        if d.run_id != run_id
        and any(a.get("run_id") == run_id and a.get("condition") in conditions for a in d.plan.get("after") or [])
    ]


def repoint(reg: Registry, dep: RunRecord) -> None:
    """Set a pending dependent's dependency to the current jobs of the runs it waits for (edge)."""
    from clusterctl.backends import get_backend

    jobs = reg.jobs(dep.run_id)
    if not jobs or jobs[-1].state not in (RunState.PENDING, RunState.SUBMITTED):
        return  # started already (its dependency held), or not submitted
    after = [a | {"job_id": current_job(reg, a["run_id"])} for a in dep.plan.get("after") or []]
    want = dependency(after)
    if want is None:
        return
    data: dict[str, Any] = {"job_id": jobs[-1].job_id, "dependency": want}
    try:
        get_backend(dep.executor).set_dependency(jobs[-1].job_id, want)
    except UserError as e:
        data["error"] = str(e)
    reg.add_event(dep.run_id, "dependency", data)


def current_job(reg: Registry, run_id: str) -> str | None:
    jobs = reg.jobs(run_id)
    return jobs[-1].job_id if jobs else None


def failed_for_good(reg: Registry, run: RunRecord) -> bool:
    """Has `run` ended other than COMPLETED, with no retry to come (retry policy, the user's failure)?
    Not while its last job FAILED with no exit code yet (accounting lags): the code decides the retry."""
    from clusterctl.runs.artifacts import user_failure
    from clusterctl.runs.retry import should_retry

    if run.state not in FINAL_STATES or run.state == RunState.COMPLETED:
        return False
    jobs = reg.jobs(run.run_id)
    if jobs and jobs[-1].state == RunState.FAILED and not jobs[-1].exit_code:
        return False
    return not should_retry(run, jobs) or user_failure(run.run_dir, jobs[-1].job_id)


def settle(reg: Registry, runs: list[RunRecord], fresh: Refresh) -> list[str]:
    """After a refresh and its retries (lifecycle.refresh_and_retry): cancel the :ok dependents of runs
    that failed for good, seen from either side, and say in a pending run's reason which run it waits
    for. Returns notes for the user. Nothing is written from a read-only registry."""
    notes: list[str] = []
    retried = {rid for rid, _ in fresh.retried}
    for r in runs:
        after = r.plan.get("after") or []
        w = fresh.waiting.get(r.run_id)
        if after and w and w.get("reason") in WAITING:
            w["detail"] = waiting_words(after)
    if reg.readonly:
        return notes
    seen = {r.run_id: r for r in runs}
    doomed: dict[str, RunRecord] = {}  # dependent run id -> the run it waited for in vain
    for d in reg.list_runs(include_finished=False):  # the active runs: few, and most wait for none
        for a in d.plan.get("after") or []:
            if a.get("condition") != "ok" or a["run_id"] in retried or not {d.run_id, a["run_id"]} & seen.keys():
                continue
            try:
                other = seen.get(a["run_id"]) or reg.get_run(a["run_id"])
            except UserError:  # no longer in the registry: nothing says it failed
                continue
            if failed_for_good(reg, other):
                doomed[d.run_id] = other
    for dep_id, other in doomed.items():
        notes.append(cancel_dependent(reg, reg.get_run(dep_id), other))
    return notes


def cancel_dependent(reg: Registry, dep: RunRecord, other: RunRecord) -> str:
    """Cancel a run that waits for `other` to complete, which never will (edge); the note saying why.
    (lifecycle.cancel's steps, with the reason: lifecycle calls this module, so it is not imported.)"""
    import time

    from clusterctl.backends import get_backend

    reason = f"run {other.run_id} ended {other.state} and will not be retried: --after {other.run_id}:ok can never hold"
    jobs = reg.jobs(dep.run_id)
    if jobs:
        try:
            get_backend(dep.executor).cancel(jobs[-1].job_id)
        except UserError as e:
            return f"{dep.run_id}: not cancelled ({e}); {reason}"
        reg.update_job(jobs[-1].job_id, state=RunState.CANCELLED, ended_at=time.time())
    reg.set_run_state(dep.run_id, RunState.CANCELLED)
    job_id = jobs[-1].job_id if jobs else None
    reg.add_event(dep.run_id, "cancel", {"job_id": job_id, "reason": reason})
    from clusterctl.runs.notify import notify

    notify(reg, dep, "failed", {"reason": reason, "job_id": job_id}, key=f"failed:{job_id}")
    return f"{dep.run_id}: cancelled: {reason}"
