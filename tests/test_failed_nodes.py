"""The pure parts of unattended recovery (issue 27 point 1): which node failed (srun's lines recorded on
this cluster's Slurm 22.05), what the retry excludes over attempts (cap, partition room), the words of
a failure, and exactly one retry when two observers race through reconcile."""

from __future__ import annotations

import time

import pytest

from clusterctl.backends.slurm.failed_nodes import culprit, last_attempt, sick_nodes
from clusterctl.runs.followup import job_name, pending_followups
from clusterctl.runs.registry import Registry
from clusterctl.runs.retry import exclusion, failure_words
from clusterctl.specs import JobRecord, RunRecord, RunState

# recorded on the local cluster: 2 nodes, srun --kill-on-bad-exit=1, task 1 SIGKILLed on a2
KILLED = """srun: error: a2: task 1: Killed
srun: launch/slurm: _step_signal: Terminating StepId=545.0
slurmstepd-a1: error: *** STEP 545.0 ON a1 CANCELLED AT 2026-12-07T04:57:09 ***
srun: error: a1: task 0: Terminated
srun: Force Terminated StepId=545.0
"""
# the same, task 0 on a1 exits 75 (the trainer's "lost a peer") and task 1 is killed after it
EXITED = """srun: error: a1: task 0: Exited with exit code 75
srun: launch/slurm: _step_signal: Terminating StepId=546.0
srun: error: a2: task 1: Terminated
srun: Force Terminated StepId=546.0
"""


def test_the_first_task_srun_names_is_the_culprit_not_its_victims():
    assert culprit(KILLED) == ("a2", "Killed")
    assert culprit(EXITED) == ("a1", "Exited with exit code 75")
    assert culprit("srun: error: Node failure on a3\nsrun: error: a1: task 0: Killed\n") == ("a3", "node failure")
    assert culprit("srun: error: gpu-017: tasks 0-3: Segmentation fault\n") == ("gpu-017", "Segmentation fault")
    assert culprit("step 12 loss 3.1\nTraceback (most recent call last):\n") == (None, "")


def test_only_the_last_attempt_of_a_requeued_job_counts():
    """A requeued job appends every attempt to one log: the first attempt's ranks, terminated by the
    requeue, are not the failure of the last one."""
    earlier = "submitit INFO Starting with JobEnvironment(job_id=9)\nsrun: error: a1: task 0: Terminated\n"
    later = "submitit INFO Starting with JobEnvironment(job_id=9)\n" + KILLED
    assert culprit(earlier + later) == ("a2", "Killed")
    assert last_attempt(earlier + later).count("Starting with") == 1
    assert culprit(earlier + "submitit INFO Starting with JobEnvironment(job_id=9)\n") == (None, "")


def test_sick_nodes_are_those_sinfo_marks_down_drained_or_failing():
    text = "a1|idle\na2|down*\na3|drained\na4|mixed\na5|draining\na6|allocated*\na7|fail\n"
    assert sick_nodes(text) == ["a2", "a3", "a5", "a6", "a7"]
    assert sick_nodes("a1|idle\na2|allocated\n") == []


def test_the_excluded_set_is_kept_over_attempts_capped_and_fits_the_partition():
    assert exclusion([], ["a2"], cap=8, room=1) == (["a2"], "")
    # kept over attempts, the newest failure last
    assert exclusion(["a2"], ["a5"], cap=8, room=10) == (["a2", "a5"], "")
    # a node that fails again moves to the end; the oldest is dropped first under the cap
    kept, why = exclusion(["a1", "a2", "a3"], ["a1", "a4"], cap=3, room=10)
    assert kept == ["a3", "a1", "a4"] and why.startswith("not excluded: a2") and "max_excluded_nodes is 3" in why
    # the partition: 3 nodes for a 2-node job leaves room for 1 excluded node
    kept, why = exclusion(["a2"], ["a1"], cap=8, room=1)
    assert kept == ["a1"] and "room for 1" in why and "a2" in why
    # cap 0 (never exclude), no room, or the partition's size unknown: nothing is excluded, and said why
    assert exclusion([], ["a2"], cap=0, room=5)[0] == []
    assert exclusion([], ["a2"], cap=8, room=0)[0] == []
    kept, why = exclusion([], ["a2"], cap=8, room=None)
    assert kept == [] and "not known" in why
    assert exclusion([], [], cap=8, room=None) == ([], "")


def _job(state: str, code: str | None) -> JobRecord:
    return JobRecord("5", "r", 1, "submit", 0.0, state, exit_code=code)


def test_failure_words_say_what_ended_the_job():
    assert failure_words(_job(RunState.FAILED, "9:0")) == "killed by signal 9 (SIGKILL)"
    assert failure_words(_job(RunState.FAILED, "0:15")) == "killed by signal 15 (SIGTERM)"
    assert failure_words(_job(RunState.FAILED, "137:0")).startswith("exit 137: killed by signal 9")
    assert failure_words(_job(RunState.FAILED, "75:0")) == "exit 75: the trainer lost a peer or stalled"
    assert failure_words(_job(RunState.NODE_FAIL, None)).startswith("NODE_FAIL")
    assert failure_words(_job(RunState.FAILED, "1:0")) == "FAILED 1:0"


def test_followup_names_and_the_ones_cancel_stops():
    assert job_name("x" * 64) == "x" * 55 + "-followup" and len(job_name("x" * 64)) <= 64
    events = [
        {"kind": "submit", "data": {"job_id": "1"}},
        {"kind": "followup", "data": {"job_id": "2", "after": "1"}},
        {"kind": "retry", "data": {"job_id": "3"}},
        {"kind": "followup", "data": {"job_id": None, "after": "3", "error": "sbatch: down"}},
        {"kind": "followup", "data": {"job_id": "4", "after": "3"}},
    ]
    assert pending_followups(events) == ["4", "2"]


def test_two_observers_racing_retry_exactly_once(tmp_path, monkeypatch):
    """The follow-up job and a `status` reconcile the same failed run at once. The one whose claim wins
    submits; the other's refresh, which read the run mid-submission (SUBMITTING, its latest job still the
    failed one), writes FAILED back and claims it again: the claim event makes it step aside."""
    import clusterctl.runs.lifecycle as lifecycle_mod
    import clusterctl.runs.submit as submit_mod
    from clusterctl.runs.lifecycle import reconcile

    reg = Registry(tmp_path / "reg.db")
    run = RunRecord("r1", "r1", "p", "slurm", str(tmp_path / "r1"), time.time(), "u", 2, 10, RunState.FAILED)
    run.plan = {"max_retries": 3}
    reg.add_run(run)
    reg.add_job("r1", "100", "submit")
    reg.update_job("100", run_id="r1", state=RunState.FAILED, exit_code="9:0")
    submitted: list[str] = []
    inner: list[list] = []

    def fake_submit_attempt(reg_, run_, profile, kind, hold=False, exclude=(), dependency=None, event=None):
        submitted.append(kind)
        if len(submitted) == 1:  # while the first observer's sbatch runs, the second one looks
            other = Registry(tmp_path / "reg.db")
            stale = other.get_run("r1")
            assert stale.state == RunState.SUBMITTING
            other.set_run_states({"r1": RunState.FAILED}, if_states={"r1": RunState.SUBMITTING})  # its refresh
            stale.state = RunState.FAILED
            inner.append(reconcile(other, [stale]))
        reg_.add_job(run_.run_id, str(200 + len(submitted)), kind)
        reg_.set_run_state(run_.run_id, RunState.PENDING)
        reg_.add_event(run_.run_id, kind, (event or {}) | {"job_id": str(200 + len(submitted))})
        return str(200 + len(submitted))

    monkeypatch.setattr(submit_mod, "submit_attempt", fake_submit_attempt)
    monkeypatch.setattr(lifecycle_mod, "read_back", lambda run, allow_env: None)
    assert reconcile(reg, [reg.get_run("r1")]) == [("r1", "201")]
    assert inner == [[]] and submitted == ["retry"]
    assert reg.get_run("r1").state == RunState.PENDING
    kinds = [e["kind"] for e in reg.events("r1")]
    assert kinds == ["claim", "retry"]
    (retry,) = [e["data"] for e in reg.events("r1") if e["kind"] == "retry"]
    assert retry["failed_job"] == "100" and retry["excluded"] == [] and "no failed node" in retry["nodes_how"]


def test_a_refused_retry_leaves_the_run_failed_for_the_next_observer(tmp_path, monkeypatch):
    import clusterctl.runs.lifecycle as lifecycle_mod
    import clusterctl.runs.submit as submit_mod
    from clusterctl.runs.lifecycle import reconcile
    from vltrain.common.errors import UserError

    reg = Registry(tmp_path / "reg.db")
    run = RunRecord("r1", "r1", "p", "slurm", str(tmp_path / "r1"), time.time(), "u", 2, 10, RunState.FAILED)
    run.plan = {"max_retries": 3}
    reg.add_run(run)
    reg.add_job("r1", "100", "submit")
    reg.update_job("100", run_id="r1", state=RunState.FAILED, exit_code="9:0")
    calls: list[int] = []

    def refused(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise UserError("sbatch: Socket timed out")
        return "300"

    monkeypatch.setattr(submit_mod, "submit_attempt", refused)
    monkeypatch.setattr(lifecycle_mod, "read_back", lambda run, allow_env: None)
    notes: list[str] = []
    assert reconcile(reg, [reg.get_run("r1")], notes) == []
    assert reg.get_run("r1").state == RunState.FAILED and "Socket timed out" in notes[0]
    assert reconcile(reg, [reg.get_run("r1")]) == [("r1", "300")]  # the next observer retries it


@pytest.mark.parametrize("executor", ["local"])
def test_no_followup_without_a_scheduler(tmp_path, executor):
    from clusterctl.runs.followup import arm

    reg = Registry(tmp_path / "reg.db")
    run = RunRecord("r1", "r1", "p", executor, str(tmp_path), time.time(), "u", 1, 10, RunState.RUNNING)
    reg.add_run(run)

    class P:
        pass

    prof = P()
    prof.executor = executor  # type: ignore[attr-defined]
    assert arm(reg, run, prof, "1") is None and reg.events("r1") == []  # type: ignore[arg-type]
