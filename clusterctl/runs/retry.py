"""Which failures are the cluster's, not the code's, and may be retried (pure policy).

Slurm requeues a job itself on time-out and preemption (submitit's checkpoint + requeue) and on node
failure (`--requeue`). What is left is a job that ended FAILED or NODE_FAIL for a cluster reason:
a node that died under it (NODE_FAIL, or killed by SIGKILL/SIGTERM outside a time-out: exit
137/143 or signal 9/15), NCCL's watchdog aborting a broken communicator (SIGABRT: exit 134 or
signal 6), or the trainer's own "lost a peer / no step for too long" exit code 75.
Those are resubmitted, up to the run's --max-retries, as a new job that resumes from the newest
complete checkpoint (clusterctl.runs.lifecycle.reconcile does it); any other failure is the user's
code and is left alone.
"""

from __future__ import annotations

from clusterctl.specs import JobRecord, RunRecord, RunState
from vltrain.rundir import EXIT_COMM_ERROR

# Exit codes that mean "the cluster failed, not the code". 137/143: killed by SIGKILL/SIGTERM outside
# a time-out (node reboot, OOM-killer on a sick node); 134 / signal 6: SIGABRT, which NCCL's watchdog
# raises when a collective times out or the communicator breaks (a dead peer, a flapping link);
# 75 (EX_TEMPFAIL): the trainer lost a peer or stalled (its own watchdog).
CLUSTER_EXIT_CODES = (EXIT_COMM_ERROR, 134, 137, 143)
CLUSTER_SIGNALS = (6, 9, 15)


def cluster_failure(job: JobRecord) -> bool:
    """Did this job end because of the cluster? sacct's ExitCode is 'code:signal', but a task killed
    by a signal is reported in the code field as the signal's number: one rank SIGKILLed on Slurm
    22.05 reads `FAILED 9:0` (srun's exit status is the signal of the task that died), so a code that
    is one of the cluster's signals counts too."""
    if job.state == RunState.NODE_FAIL:
        return True
    if job.state != RunState.FAILED or not job.exit_code:
        return False
    code, _, sig = job.exit_code.partition(":")
    try:
        c = int(code)
        return c in CLUSTER_EXIT_CODES or c in CLUSTER_SIGNALS or (sig != "" and int(sig) in CLUSTER_SIGNALS)
    except ValueError:
        return False


def retries_used(jobs: list[JobRecord]) -> int:
    return sum(j.kind == "retry" for j in jobs)


def should_retry(run: RunRecord, jobs: list[JobRecord]) -> bool:
    """The latest job failed for a cluster reason and retries are left."""
    if not jobs or run.state in (RunState.CANCELLED, RunState.COMPLETED):
        return False
    max_retries = int((run.plan or {}).get("max_retries", 0))
    return cluster_failure(jobs[-1]) and retries_used(jobs) < max_retries


def failure_words(job: JobRecord) -> str:
    """Why the job failed, in words for the retry event and the notification (one line)."""
    if job.state == RunState.NODE_FAIL:
        return "NODE_FAIL: a node of the job failed"
    code, _, sig = (job.exit_code or "").partition(":")
    names = {6: "SIGABRT (NCCL's watchdog?)", 9: "SIGKILL", 15: "SIGTERM"}
    if code == str(EXIT_COMM_ERROR):
        return f"exit {code}: the trainer lost a peer or stalled"
    for n in (code, sig):
        if n.isdigit() and int(n) in names:
            return f"killed by signal {n} ({names[int(n)]})"
        if n.isdigit() and int(n) - 128 in names:
            return f"exit {n}: killed by signal {int(n) - 128} ({names[int(n) - 128]})"
    return f"{job.state} {job.exit_code or ''}".strip()


def exclusion(previous: list[str], failed: list[str], cap: int, room: int | None) -> tuple[list[str], str]:
    """The nodes the next attempt excludes: those excluded before plus the newly failed ones, oldest
    first (a node that fails again moves to the end), at most `cap` (profile slurm.max_excluded_nodes)
    and at most `room` (the partition's nodes less the nodes the job needs: more and it could never
    start; None: not known, so nothing is excluded). The oldest are dropped first. Returns the list
    and a note saying what was left out and why ("" when nothing was)."""
    want = [n for n in previous if n not in failed] + list(dict.fromkeys(failed))
    limit = min(cap, room if room is not None else 0)
    kept = want[len(want) - limit :] if limit > 0 else []
    if len(kept) == len(want):
        return kept, ""
    dropped = ",".join(n for n in want if n not in kept)
    why = (
        "the partition's size is not known (scontrol did not answer)"
        if room is None
        else f"the profile's slurm.max_excluded_nodes is {cap}"
        if cap <= (room or 0)
        else f"the partition has room for {max(room, 0)} excluded node(s) beside the job's"
    )
    return kept, f"not excluded: {dropped} ({why})"
