"""The follow-up job: a run's failure retried with no clusterctl process running anywhere.

After every attempt of a run on a backend with a scheduler, `arm` queues a small side job
(Backend.side_spec, one task, no GPU) with `--dependency=afternotok:<attempt>`: Slurm starts it only
if the attempt ends in a failed state (FAILED, NODE_FAIL, TIMEOUT, CANCELLED...). It runs
runs.followup_job, which does what a `clusterctl status` would (lifecycle.refresh_and_retry on that
run, in the registry the run was submitted to): waits until accounting has the attempt's exit code,
and resubmits the run if the retry policy calls the failure the cluster's (the registry's claim
makes that exactly one retry when a command looks at the same moment). The new attempt arms its own
follow-up. A failure that is not retried is notified as failed. When the attempt completes, the
dependency can never hold and Slurm cancels the follow-up itself (--kill-on-invalid-dep);
`clusterctl cancel` scancels it first (a cancelled attempt is "not ok" too).

A requeue (submitit's checkpoint on time-out or preemption, `scontrol requeue`, Slurm's --requeue
after a node failure) does not end the job: the follow-up stays pending (checked on Slurm 22.05.8).
Should one still start while the attempt is alive again, it arms another follow-up on the same
attempt and leaves (runs.followup_job).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from vltrain.common.errors import UserError

if TYPE_CHECKING:
    from clusterctl.planning.profiles import ClusterProfile
    from clusterctl.runs.registry import Registry
    from clusterctl.specs import RunRecord

KIND = "followup"  # its side folder (<run_dir>/side/followup/) and its registry event


def job_name(run_name: str) -> str:
    """The follow-up's Slurm job name: the run's, marked (64 characters at most, as Slurm takes)."""
    return f"{run_name[:55]}-followup"


def command(registry: str, run_id: str, after: str) -> submitit.helpers.CommandFunction:
    """What the follow-up job runs: `python -P -m clusterctl.runs.followup_job REGISTRY RUN AFTER`, as
    submitit's CommandFunction. A program of its own rather than a pickled callable of this module:
    it runs the reconcile path (lifecycle), which submits attempts (submit), which arm follow-ups
    (here); imported from here, that would be an import cycle (tests/test_architecture.py)."""
    return submitit.helpers.CommandFunction(
        [sys.executable, "-P", "-m", "clusterctl.runs.followup_job", registry, run_id, after]
    )


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
            fid: str | None = backend.submit(spec, command(str(Path(reg.path).absolute()), run.run_id, job_id))
        reg.add_event(run.run_id, KIND, {"job_id": fid, "after": job_id})
    except UserError as e:
        fid = None
        reg.add_event(run.run_id, KIND, {"job_id": None, "after": job_id, "error": str(e)})
    return fid


def pending_followups(events: list[dict[str, Any]]) -> list[str]:
    """The follow-up job ids a run's events record, newest first (pure): what cancel scancels."""
    return [e["data"]["job_id"] for e in reversed(events) if e["kind"] == KIND and e["data"].get("job_id")]
