"""The life of a submitted run: retry after cluster failures, follow, cancel, resume.

clusterctl has no daemon: every command that refreshes states (status, watch, logs --follow,
submit --wait, resume) also reconciles, like a Kubernetes controller loop: a run whose last job
failed for a cluster reason (clusterctl.runs.retry) is resubmitted there, by exactly one of the
processes that noticed (the registry's claim).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.backends import get_backend
from clusterctl.runs.dependencies import settle
from clusterctl.runs.registry import Registry
from clusterctl.runs.retry import exclusion, failure_words, should_retry
from clusterctl.runs.status import Refresh, refresh
from clusterctl.specs import ACTIVE_STATES, FAILURE_STATES, JobRecord, RunRecord, RunState
from vltrain.common.errors import UserError
from vltrain.rundir import RunDir

if TYPE_CHECKING:
    from clusterctl.planning.profiles import ClusterProfile


def refresh_and_retry(
    reg: Registry, runs: list[RunRecord], timeout: float | None = None, now: float | None = None
) -> Refresh:
    """What every command that shows or follows runs does (status, watch, logs --follow, submit --wait,
    resume): ask the backends (status.refresh), set each run's `state` to what they said, then resubmit
    those whose last job failed for a cluster reason (reconcile). The states are those before the
    retry; `retried` lists (run id, new job id), and a note says each (a caller that follows the runs
    refreshes again to see the new jobs)."""
    fresh = refresh(reg, runs, timeout, now)
    for r in runs:
        r.state = fresh.states[r.run_id]
    fresh.retried = reconcile(reg, runs, fresh.notes)
    fresh.notes += [retried_note(run_id, job_id) for run_id, job_id in fresh.retried]
    fresh.notes += settle(reg, runs, fresh)  # runs waiting for one that failed for good (submit --after)
    return fresh


def retried_note(run_id: str, job_id: str) -> str:
    return f"{run_id}: retried as job {job_id} after a cluster failure"


def reconcile(reg: Registry, runs: list[RunRecord], notes: list[str] | None = None) -> list[tuple[str, str]]:
    """Resubmit every run (in its state as refreshed) that `should_retry`; returns [(run_id, new job
    id)] (edge: submits). Never from a read-only registry: what the scheduler says is shown, not saved
    (status.readonly_note), and a retry could not be recorded. A run whose directory fails submit's
    checks (read_back) is not retried: the reason goes to `notes`, and the run stays FAILED."""
    failed = [r for r in runs if r.state in FAILURE_STATES]
    if not failed or reg.readonly:
        return []
    jobs = reg.jobs_for(r.run_id for r in failed)
    from clusterctl.runs.artifacts import user_failure

    todo = [
        r for r in failed if should_retry(r, jobs[r.run_id]) and not user_failure(r.run_dir, jobs[r.run_id][-1].job_id)
    ]
    if not todo:
        return []
    # submitting imports planning and the train config: only when there is something to resubmit,
    # so that `status` over a history of failed runs stays as light as over none
    from clusterctl.runs.submit import submit_attempt

    out = []
    for run in todo:
        last = jobs[run.run_id][-1]
        try:
            profile = read_back(run, allow_env=False)
        except UserError as e:
            if notes is not None:
                how = (
                    f" (`clusterctl resume --allow-env {run.run_id}` once you have read it)"
                    if "--allow-env" in str(e)
                    else ""
                )
                notes.append(f"{run.run_id}: not retried after a cluster failure: {e}{how}")
            continue
        # where the failure came from and what to exclude: read before the claim, which is then
        # followed at once by its event (another observer that got past a stale refresh sees it)
        event = retry_event(reg, run, profile, last)
        if not reg.claim_run(run.run_id, run.state, RunState.SUBMITTING):
            continue  # another clusterctl process (or the follow-up job) is retrying it
        claims = [e["data"] for e in reg.events(run.run_id) if e["kind"] == "claim"]
        if any(c.get("failed_job") == last.job_id for c in claims[-1:]) and not claims[-1].get("released"):
            continue  # claimed already: this claim came from a refresh that read the run mid-retry
        reg.add_event(run.run_id, "claim", {"failed_job": last.job_id})
        try:
            job_id = submit_attempt(reg, run, profile, "retry", exclude=tuple(event["excluded"]), event=event)
        except UserError as e:  # sbatch refused: the run is FAILED again, for the next observer to retry
            reg.add_event(run.run_id, "claim", {"failed_job": last.job_id, "released": str(e)})
            reg.claim_run(run.run_id, RunState.SUBMITTING, run.state)
            if notes is not None:
                notes.append(f"{run.run_id}: retry after a cluster failure not submitted: {e}")
            continue
        out.append((run.run_id, job_id))
        from clusterctl.runs.notify import notify

        said = {k: event[k] for k in ("reason", "failed_job", "excluded")} | {"job_id": job_id}
        notify(reg, run, "retried", said, key=f"retried:{job_id}")
    return out


def retry_event(reg: Registry, run: RunRecord, profile: ClusterProfile, last: JobRecord) -> dict[str, Any]:
    """The registry's "retry" event of a retry after `last` failed (edge: its logs, the scheduler):
    why, the node(s) that failed, and the nodes the retry excludes: those the run's earlier retries
    excluded plus the failed ones, under the profile's cap and the partition's room (retry.exclusion)."""
    backend = get_backend(run.executor)
    failed, how = backend.failed_nodes(Path(run.run_dir), last)
    retries = [e["data"] for e in reg.events(run.run_id) if e["kind"] == "retry" and "excluded" in e["data"]]
    previous: list[str] = list(retries[-1]["excluded"]) if retries else []
    slurm = getattr(profile, "slurm", None)
    cap = slurm.max_excluded_nodes if slurm else 0
    room = backend.exclusion_room(profile) if failed or previous else 0
    excluded, left_out = exclusion(previous, failed, cap, room)
    return {
        "failed_job": last.job_id,
        "state": last.state,
        "exit_code": last.exit_code,
        "reason": failure_words(last),
        "failed_nodes": failed,
        "excluded": excluded,
        "nodes_how": "; ".join(w for w in (how, left_out) if w),
    }


def read_back(run: RunRecord, allow_env: bool) -> ClusterProfile:
    """The profile to resubmit `run` with, after submit's checks on what its run directory holds
    (runs.readback.check_run_dir: profile.json parsed and matching the registry, its job environment,
    config.toml and the checks before sbatch): a forged or edited run directory is one line."""
    from clusterctl.runs.readback import check_run_dir

    return check_run_dir(Path(run.run_dir), run.profile, run.executor, allow_env)[0]


def current_state(reg: Registry, run: RunRecord) -> str:
    """The run's state now, after retrying it if its last job failed for a cluster reason."""
    if refresh_and_retry(reg, [run]).retried:
        run.state = reg.get_run(run.run_id).state
    return run.state


def latest_job(reg: Registry, run: RunRecord) -> JobRecord:
    jobs = reg.jobs(run.run_id)
    if not jobs:
        raise UserError(f"RUN: {run.run_id} has no Slurm job yet; allowed: a run that was submitted")
    return jobs[-1]


def follow_log(
    reg: Registry,
    run: RunRecord,
    rank: int,
    stderr: bool,
    poll_s: float = 1.0,
    write: Callable[[bytes], object] | None = None,
) -> str:
    """Write new bytes of the rank's log of the run's latest job (it changes on retry or resume)
    until the run is no longer active; returns the final state. Ctrl-C stops following, not the run."""
    out = write or _stdout
    offsets: dict[str, int] = {}
    rd = RunDir(run.run_dir)
    state = run.state
    try:
        while True:
            state = current_state(reg, run)
            jobs = reg.jobs(run.run_id)
            if jobs:
                job_id = jobs[-1].job_id
                path = rd.task_log(job_id, rank, stderr)
                if path.exists():
                    with path.open("rb") as f:
                        f.seek(offsets.get(job_id, 0))
                        chunk = f.read()
                        offsets[job_id] = f.tell()
                    if chunk:
                        out(chunk)
            if state not in ACTIVE_STATES:
                return state
            time.sleep(poll_s)
    except KeyboardInterrupt:  # the run is in its own session: it goes on (backends.local.own_session)
        print(
            f"\nstopped following; {run.run_id} is {state} and goes on (clusterctl cancel {run.name} stops it)",
            file=sys.stderr,
            flush=True,
        )
        return state


def _stdout(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


def cancel(reg: Registry, run: RunRecord) -> JobRecord:
    """Cancel a run's latest job through its backend; the registry says CANCELLED at once."""
    job = latest_job(reg, run)
    backend = get_backend(run.executor)
    # its pending follow-up first: a cancelled attempt is "not ok", and would start it (runs.followup)
    from clusterctl.runs.followup import pending_followups

    for fid in pending_followups(reg.events(run.run_id))[:1]:
        with contextlib.suppress(UserError):  # ended already (Slurm cancelled it, or it ran)
            backend.cancel(fid)
    backend.cancel(job.job_id)
    reg.update_job(job.job_id, state=RunState.CANCELLED, ended_at=time.time())
    reg.set_run_state(run.run_id, RunState.CANCELLED)
    reg.add_event(run.run_id, "cancel", {"job_id": job.job_id})
    return job


def resume(
    reg: Registry, run: RunRecord, allow_env: bool = False, steps: int | None = None
) -> tuple[str, str | None, list[str]]:
    """Resubmit a stopped run after submit's checks on its run directory (read_back); returns (job id,
    the checkpoint it resumes from or None, the damaged ones the trainer will skip and why). `steps`:
    extend the run to that many optimizer steps first (`extend`)."""
    state = current_state(reg, run)
    if state in ACTIVE_STATES:
        raise UserError(
            f"RUN: {run.run_id} is {state}; allowed: a run that is not pending or running (cancel it first)"
        )
    from clusterctl.runs.submit import submit_attempt

    profile = read_back(run, allow_env)
    ckpt, skipped = resume_point(Path(run.run_dir))
    if steps is not None:
        extend(reg, run, steps)
    job_id = submit_attempt(reg, run, profile, "resume")
    return job_id, ckpt, skipped


def extend(reg: Registry, run: RunRecord, steps: int) -> int:
    """Raise the run's `steps` (config.toml and the registry) and record an "extend" event; returns the
    old count. The LR schedule is a function of the step and the total (vltrain.schedule.lr_at, not
    saved in the checkpoint), so the remaining cosine decay is re-planned over the new total: the LR at
    the resumed step rises to lr_at(step, new total) and decays to min_lr at the new last step. steps
    is not in the config hash: the run's own checkpoints still resume."""
    from vltrain.config import load_train_config, write_resolved_config
    from vltrain.rundir import RunDir

    path = RunDir(run.run_dir).config
    cfg = load_train_config(path)
    if steps <= cfg.steps:
        raise UserError(
            f"--steps: {steps} does not extend {run.run_id} ({cfg.steps} steps); allowed: more than {cfg.steps}"
        )
    new = load_train_config(path, {"steps": steps})  # validated: a curriculum's stages must still fit
    write_resolved_config(path, new)
    reg.set_run_steps(run.run_id, new.to_dict(), steps)
    reg.add_event(run.run_id, "extend", {"from_steps": cfg.steps, "to_steps": steps})
    return cfg.steps


def resume_point(run_dir: Path) -> tuple[str | None, list[str]]:
    """The checkpoint the trainer will resume from: the newest complete one whose meta.json matches its
    COMPLETE marker (vltrain.checkpoint.verify) and whose files have the sizes meta.json records; and
    the newer ones skipped ("step_0000120: why"). The trainer also checks every file's CRC-32 (reading
    the whole checkpoint, too slow here) and falls back further if one differs."""
    from vltrain import checkpoint

    skipped: list[str] = []
    for _, path in reversed(checkpoint.complete_checkpoints(run_dir)):
        problem = checkpoint.verify(path, only=lambda rel: False) or _size_problem(path)
        if problem is None:
            return path.name, skipped
        skipped.append(f"{path.name}: {problem}")
    return None, skipped


def _size_problem(path: Path) -> str | None:
    """The first file of a checkpoint's manifest (meta.json's `files`, verified by then) that is
    missing or not the size written."""
    files = json.loads((path / "meta.json").read_bytes()).get("files")
    for rel, entry in sorted((files if isinstance(files, dict) else {}).items()):
        try:
            size = (path / rel).stat().st_size
        except OSError as e:
            return f"{rel}: cannot be read ({e.strerror or e})"
        if isinstance(entry, dict) and size != entry.get("size"):
            return f"{rel}: {size:,} bytes, {entry.get('size')} written (truncated or overwritten)"
    return None


def log_path(run: RunRecord, job_id: str, rank: int, stderr: bool) -> Path:
    return RunDir(run.run_dir).task_log(job_id, rank, stderr)
