"""The follow-up job: a run's failure retried with no clusterctl process running anywhere.

After every attempt of a run on a backend with a scheduler, `arm` queues a small side job
(Backend.side_spec, one task, no GPU) with `--dependency=afternotok:<attempt>`: Slurm starts it only
if the attempt ends in a failed state (FAILED, NODE_FAIL, TIMEOUT, CANCELLED...). It then does what a
`clusterctl status` would (lifecycle.refresh_and_retry on that run, in the registry the run was
submitted to): waits until accounting has the attempt's exit code, and resubmits the run if the
retry policy calls the failure the cluster's (the registry's claim makes that exactly one retry when
a command looks at the same moment). The new attempt arms its own follow-up. A failure that is not
retried is notified as failed. When the attempt completes, the dependency can never hold and Slurm
cancels the follow-up itself (--kill-on-invalid-dep); `clusterctl cancel` scancels it first (a
cancelled attempt is "not ok" too).

A requeue (submitit's checkpoint on time-out or preemption, `scontrol requeue`, Slurm's --requeue
after a node failure) does not end the job: the follow-up stays pending (checked on Slurm 22.05.8;
tests/test_unattended_retry.py). Should one still start while the attempt is alive again, it arms
another follow-up on the same attempt and leaves.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from clusterctl.specs import FAILURE_STATES, FINAL_STATES
from vltrain.common.errors import UserError

if TYPE_CHECKING:
    from clusterctl.planning.profiles import ClusterProfile
    from clusterctl.runs.registry import Registry
    from clusterctl.specs import RunRecord

KIND = "followup"  # its side folder (<run_dir>/side/followup/) and its registry event
WAIT_S = 240.0  # at most this long for accounting to have the attempt's exit code (slurmdbd lags)
POLL_S = 3.0


def job_name(run_name: str) -> str:
    """The follow-up's Slurm job name: the run's, marked (64 characters at most, as Slurm takes)."""
    return f"{run_name[:55]}-followup"


def arm(reg: Registry, run: RunRecord, profile: ClusterProfile, job_id: str) -> str | None:
    """Queue the follow-up of attempt `job_id` (edge); records a "followup" event {"job_id", "after"}
    and returns its id. None on a backend without a scheduler. A follow-up that cannot be queued does
    not undo the attempt: the event says why ("error") and commands still retry the run."""
    from clusterctl.backends import get_backend

    backend = get_backend(profile.executor)
    if not backend.has_scheduler:
        return None
    try:
        spec = backend.side_spec(profile, Path(run.run_dir), job_name(run.name), KIND, f"afternotok:{job_id}")
        with submitit.helpers.clean_env():  # from inside a job: its SLURM_* must not shape the new one
            fid: str | None = backend.submit(
                spec, Followup(run.run_dir, run.run_id, str(Path(reg.path).absolute()), job_id)
            )
        reg.add_event(run.run_id, KIND, {"job_id": fid, "after": job_id})
    except UserError as e:
        fid = None
        reg.add_event(run.run_id, KIND, {"job_id": None, "after": job_id, "error": str(e)})
    return fid


def pending_followups(events: list[dict[str, Any]]) -> list[str]:
    """The follow-up job ids a run's events record, newest first (pure): what cancel scancels."""
    return [e["data"]["job_id"] for e in reversed(events) if e["kind"] == KIND and e["data"].get("job_id")]


class Followup(submitit.helpers.Checkpointable):
    """What the follow-up job runs: reconcile run `run_id` after attempt `after` failed."""

    def __init__(self, run_dir: str, run_id: str, registry: str, after: str) -> None:
        self.run_dir = str(run_dir)
        self.run_id = run_id
        self.registry = str(registry)
        self.after = str(after)

    def __call__(self) -> dict[str, Any]:
        from clusterctl.runs.registry import Registry

        with submitit.helpers.clean_env():  # the retry's sbatch must not inherit this job's SLURM_*
            reg = Registry(Path(self.registry))
            try:
                return follow_up(reg, self.run_id, self.after)
            finally:
                reg.close()


def follow_up(reg: Registry, run_id: str, after: str, wait_s: float = WAIT_S, poll_s: float = POLL_S) -> dict[str, Any]:
    """Refresh and retry the run (lifecycle.refresh_and_retry) until attempt `after` is final with its
    exit code (at most `wait_s`), then: retried, left to another observer, or failed for good (notified).
    Returns what it did, also submitit's result of the follow-up job (its log says it)."""
    from clusterctl.runs.lifecycle import refresh_and_retry

    end = time.monotonic() + wait_s
    while True:
        run = reg.get_run(run_id)
        fresh = refresh_and_retry(reg, [run])
        if fresh.retried:
            return {"outcome": "retried", "job_id": fresh.retried[0][1], "notes": fresh.notes}
        jobs = fresh.jobs[run_id]
        last = jobs[-1] if jobs else None
        if last is None or last.job_id != after:  # another observer retried or resumed it already
            return {"outcome": "superseded", "job_id": last.job_id if last else None}
        final = last.state in FINAL_STATES
        if final and (last.exit_code is not None or time.monotonic() > end):
            break
        if time.monotonic() > end:  # alive again (requeued): follow it further
            from clusterctl.runs.submit import run_profile

            return {"outcome": "rearmed", "job_id": arm(reg, run, run_profile(run), after)}
        time.sleep(poll_s)
    run = reg.get_run(run_id)
    if run.state in FAILURE_STATES:
        from clusterctl.runs.artifacts import failure_reason
        from clusterctl.runs.notify import notify
        from clusterctl.runs.retry import failure_words

        reason = failure_reason(run.run_dir, last.job_id) or failure_words(last)
        notify(reg, run, "failed", {"reason": reason, "job_id": last.job_id}, key=f"failed:{last.job_id}")
        return {"outcome": "failed", "job_id": last.job_id, "reason": reason, "notes": fresh.notes}
    return {"outcome": "left", "state": run.state, "job_id": last.job_id}
