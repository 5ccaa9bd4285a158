"""The follow-up job's program (runs.followup): `python -m clusterctl.runs.followup_job REGISTRY RUN
AFTER`, run by Slurm once attempt AFTER of run RUN ended in a failed state. It refreshes and retries
the run through the same code a command runs (lifecycle.refresh_and_retry) until accounting has the
attempt's exit code, then exits: retried, left to another observer, or failed for good (notified).
Its last line (JSON) says which; its log is in <run_dir>/side/followup/<job>/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.specs import FAILURE_STATES, FINAL_STATES

if TYPE_CHECKING:
    from clusterctl.runs.registry import Registry

WAIT_S = 240.0  # at most this long for accounting to have the attempt's exit code (slurmdbd lags)
POLL_S = 3.0


def follow_up(reg: Registry, run_id: str, after: str, wait_s: float = WAIT_S, poll_s: float = POLL_S) -> dict[str, Any]:
    """Refresh and retry the run until attempt `after` is final with its exit code (at most `wait_s`),
    then say what happened: retried, superseded (another observer acted), failed (notified), left
    (it ended otherwise: cancelled, completed), or rearmed (the attempt is alive again)."""
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
            from clusterctl.runs.followup import arm
            from clusterctl.runs.submit import run_profile

            return {"outcome": "rearmed", "job_id": arm(reg, run, run_profile(run), after)}
        time.sleep(poll_s)
    run = reg.get_run(run_id)
    if run.state not in FAILURE_STATES:
        return {"outcome": "left", "state": run.state, "job_id": last.job_id}
    from clusterctl.runs.artifacts import failure_reason
    from clusterctl.runs.notify import notify
    from clusterctl.runs.retry import failure_words

    reason = failure_reason(run.run_dir, last.job_id) or failure_words(last)
    notify(reg, run, "failed", {"reason": reason, "job_id": last.job_id}, key=f"failed:{last.job_id}")
    return {"outcome": "failed", "job_id": last.job_id, "reason": reason, "notes": fresh.notes}


def main(argv: list[str]) -> int:
    import submitit

    from clusterctl.runs.registry import Registry

    registry, run_id, after = argv
    with submitit.helpers.clean_env():  # the retry's sbatch must not inherit this job's SLURM_*
        reg = Registry(Path(registry))
        try:
            print(json.dumps(follow_up(reg, run_id, after)), flush=True)
        finally:
            reg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
