"""Retry runs whose last job failed because of the cluster, not the code (up to --max-retries).

Slurm requeues a job itself on time-out and preemption (submitit's checkpoint + requeue) and on node
failure (`--requeue`). What is left is a job that ended FAILED or NODE_FAIL for a cluster reason:
a node that died under it (NODE_FAIL, or killed by SIGKILL/SIGTERM outside a time-out: exit
137/143 or signal 9/15) or the trainer's own "lost the rendezvous / communicator" exit code 75.
Those are resubmitted as a new job that resumes from the newest complete checkpoint; any other
failure is the user's code and is left alone. clusterctl has no daemon: every command that refreshes
states (status, watch, logs --follow, submit --wait) reconciles, like a Kubernetes controller loop.
"""

from __future__ import annotations

from clusterctl.launcher import CLUSTER_EXIT_CODES
from clusterctl.registry import JobRecord, RunRecord

CLUSTER_SIGNALS = (9, 15)


def cluster_failure(job: JobRecord) -> bool:
    """Did this job end because of the cluster? (sacct ExitCode is 'code:signal')."""
    if job.state == "NODE_FAIL":
        return True
    if job.state != "FAILED" or not job.exit_code:
        return False
    code, _, sig = job.exit_code.partition(":")
    try:
        return int(code) in CLUSTER_EXIT_CODES or (sig != "" and int(sig) in CLUSTER_SIGNALS)
    except ValueError:
        return False


def retries_used(jobs: list[JobRecord]) -> int:
    return sum(j.kind == "retry" for j in jobs)


def should_retry(run: RunRecord, jobs: list[JobRecord]) -> bool:
    """Pure decision: the latest job failed for a cluster reason and retries are left."""
    if not jobs or run.state in ("CANCELLED", "COMPLETED"):
        return False
    max_retries = int((run.plan or {}).get("max_retries", 0))
    return cluster_failure(jobs[-1]) and retries_used(jobs) < max_retries


def reconcile(reg, runs: list[RunRecord]) -> list[tuple[str, str]]:
    """Resubmit every run that `should_retry`; returns [(run_id, new job id)] (edge: submits)."""
    jobs = reg.jobs_for(r.run_id for r in runs)
    todo = [r for r in runs if should_retry(r, jobs[r.run_id])]
    out = []
    for run in todo:
        from clusterctl.cmd_runs import submit_attempt, run_profile

        last = jobs[run.run_id][-1]
        if not reg.claim_run(run.run_id, run.state, "SUBMITTING"):
            continue  # another clusterctl process is retrying it
        reg.add_event(run.run_id, "retry", {"failed_job": last.job_id, "state": last.state, "exit_code": last.exit_code})
        out.append((run.run_id, submit_attempt(reg, run, run_profile(run), "retry")))
    return out
