"""Why a run failed is one line in `status`, `status --json` (`reason`) and `watch`: from the trainer's
per-rank failure records, else submitit's traceback, for local and Slurm runs alike."""

from __future__ import annotations

import json
import pickle
import time

import pytest

from clusterctl.runs import artifacts
from clusterctl.runs.registry import Registry
from clusterctl.specs import RunRecord, RunState
from tests.conftest import REPO, run_cli, tar_that_ends_after_one_member, tiny_data
from vltrain.common.errors import UserError
from vltrain.failures import record_failure
from vltrain.rundir import RunDir


def _record(run_dir, rank, kind, reason, job="7", restart=0, t=0.0):
    RunDir(run_dir).failures.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).failure_file(rank).write_text(
        json.dumps({"kind": kind, "reason": reason, "rank": rank, "time": t, "job_id": job, "restart": restart})
    )


def test_the_most_telling_record_of_the_latest_attempt_is_the_reason(tmp_path):
    _record(tmp_path, 0, "communication", "RuntimeError: Connection closed by peer", t=2.0)
    _record(tmp_path, 1, "ValueError", "ValueError: bad shape", t=3.0)
    assert artifacts.failure_reason(tmp_path, "7") == "ValueError: bad shape"  # the echo of a peer comes last
    _record(tmp_path, 2, "user", "data.shards: x is not a readable tar", t=9.0)
    assert artifacts.failure_reason(tmp_path, "7") == "data.shards: x is not a readable tar"  # the user's first
    _record(tmp_path, 2, "user", "an older job's reason", job="6")
    assert artifacts.failure_reason(tmp_path, "7") == "ValueError: bad shape"  # other jobs' records are not this one's
    _record(tmp_path, 3, "ValueError", "ValueError: after the requeue", restart=1)
    assert artifacts.failure_reason(tmp_path, "7") == "ValueError: after the requeue"  # the latest restart


def test_submitits_traceback_is_the_fallback(tmp_path):
    job = tmp_path / "submitit" / "8"
    job.mkdir(parents=True)
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\nImportError: cannot import name torch\n'
    (job / "8_0_result.pkl").write_bytes(pickle.dumps(("error", tb)))
    assert artifacts.failure_reason(tmp_path, "8") == "ImportError: cannot import name torch"
    (job / "8_0_result.pkl").write_bytes(pickle.dumps(("success", 3)))
    assert artifacts.failure_reason(tmp_path, "8") is None


def test_the_trainer_records_a_failure_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    record_failure(tmp_path, UserError("data.tokenizer: x cannot be read; allowed: a .model file"), "user", rank=3)
    record_failure(tmp_path, RuntimeError("line one\nCUDA out of memory"), "RuntimeError", rank=1)
    r3 = json.loads(RunDir(tmp_path).failure_file(3).read_text())
    assert r3["reason"] == "data.tokenizer: x cannot be read; allowed: a .model file" and r3["job_id"] == "42"
    assert json.loads(RunDir(tmp_path).failure_file(1).read_text())["reason"] == "RuntimeError: CUDA out of memory"
    record_failure(tmp_path / "gone" / "deeper\0", ValueError("x"), "ValueError")  # never raises


def test_status_shows_the_reason_of_a_failed_run(tmp_path):
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db")}
    reg = Registry(tmp_path / "reg.db")
    run_dir = tmp_path / "run"
    reg.add_run(RunRecord("r1", "r1", "local", "local", str(run_dir), time.time(), "u", 1, 10, RunState.FAILED))
    job = reg.add_job("r1", "999999999", "submit")
    reg.update_job(job.job_id, run_id="r1", state=RunState.FAILED, exit_code="1:0")
    _record(run_dir, 0, "user", "data.shards: /x/00000.tar is not a readable tar", job=job.job_id)
    r = run_cli("status", env=env)
    assert r.returncode == 0 and "FAILED r1: data.shards: /x/00000.tar is not a readable tar" in r.stdout, r.stdout
    (row,) = json.loads(run_cli("status", "r1", "--json", env=env).stdout)["runs"]
    assert row["reason"] == "data.shards: /x/00000.tar is not a readable tar"


def test_watch_says_why_a_run_ended():
    from clusterctl.render.watch_view import RunView, Tail, plain_line, run_panel, summary_lines

    row = {"run_id": "r1", "name": "r1", "state": "FAILED", "total_steps": 10, "reason": "ValueError: boom"}
    v = RunView(Tail("/nonexistent"), Tail("/nonexistent"))
    assert plain_line(row, v).endswith("| ValueError: boom")
    assert "  why: ValueError: boom" in summary_lines([row], {"r1": v}, {})
    from rich.console import Console

    console = Console(width=80, record=True)
    console.print(run_panel(row, v, 80))
    assert "ValueError: boom" in console.export_text()


@pytest.mark.slow
def test_a_local_run_that_fails_says_why(tmp_path):
    """The same on the local executor: a real trainer fails on shards that hold no sample."""
    _, tok = tiny_data(tmp_path, n=200)
    bad = tmp_path / "bad"
    bad.mkdir()
    tar_that_ends_after_one_member(bad / "00000.tar")
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
    r = run_cli(
        "submit",
        "--profile",
        "local",
        "--config",
        str(REPO / "configs" / "tiny.toml"),
        "--set",
        f"data.shards={bad}",
        "--set",
        f"data.tokenizer={tok}",
        "--name",
        "bad",
        "--wait",
        env=env,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    (row,) = json.loads(run_cli("status", "bad", "--json", env=env).stdout)["runs"]
    assert row["state"] == "FAILED" and row["reason"].startswith(f"data.shards: {bad} holds 0 samples")


def test_a_user_failure_is_not_retried_whatever_slurm_reports(tmp_path):
    """A diverged or misconfigured run fails on every rank with exit 2, but srun --kill-on-bad-exit may
    SIGKILL the slower ranks first: Slurm says FAILED 9:0, a cluster failure by its code. The ranks'
    records say `user`, and reconcile leaves it alone; without them it is retried."""
    from clusterctl.runs.lifecycle import reconcile

    reg = Registry(tmp_path / "reg.db")
    for name in ("user", "node"):
        run_dir = tmp_path / name
        reg.add_run(
            RunRecord(
                name,
                name,
                "p",
                "slurm",
                str(run_dir),
                time.time(),
                "u",
                2,
                10,
                RunState.FAILED,
                plan={"max_retries": 2},
            )
        )
        job = reg.add_job(name, f"77{len(name)}", "submit")
        reg.update_job(job.job_id, run_id=name, state=RunState.FAILED, exit_code="9:0")
    _record(tmp_path / "user", 1, "user", "training diverged: loss is nan at step 3", job="774")
    submitted = []
    import clusterctl.runs.lifecycle as lifecycle_mod
    import clusterctl.runs.submit as submit_mod

    def fake_submit_attempt(reg, run, profile, kind, hold=False, **placement):
        submitted.append(run.run_id)
        return "999"

    import pytest as _pytest

    mp = _pytest.MonkeyPatch()
    mp.setattr(submit_mod, "submit_attempt", fake_submit_attempt)
    mp.setattr(lifecycle_mod, "read_back", lambda run, allow_env: None)
    try:
        out = reconcile(reg, reg.list_runs())
    finally:
        mp.undo()
    assert submitted == ["node"] and out == [("node", "999")]
