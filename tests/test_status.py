"""`clusterctl status`: at most one batched squeue and one sacct call, fallbacks when accounting or the controller
fail, progress from the end of metrics.jsonl, local-executor states from submitit's files.

Slurm is replaced by PATH shims (small shell scripts that log each call and print recorded output),
so these tests run anywhere; tests/test_slurm_e2e.py checks the same code against a real cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterctl.backends import get_backend, results
from clusterctl.backends.slurm import backend as slurm_backend
from clusterctl.backends.slurm import commands, parse
from clusterctl.render import status_table
from clusterctl.runs import artifacts, status
from clusterctl.runs.registry import Registry
from clusterctl.specs import JobRecord, RunRecord
from tests.conftest import REPO, deadline, run_cli, sbatch_job, slurm_up

FIX = Path(__file__).parent / "fixtures" / "slurm"
OLD = time.time() - 3600  # submitted an hour ago: past any accounting lag


def shim(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    p = bin_dir / name
    p.write_text(f'#!/bin/sh\necho "{name} $*" >> "$SHIM_LOG"\n{body}\n')
    p.chmod(0o755)


def add(
    reg: Registry,
    run_id: str,
    job_ids: list[str],
    state: str = "PENDING",
    executor: str = "slurm",
    run_dir: Path | None = None,
    total_steps: int = 100,
) -> None:
    reg.add_run(
        RunRecord(
            run_id=run_id,
            name=run_id.split("-")[0],
            profile="slurm-local",
            executor=executor,
            run_dir=str(run_dir or Path("/nonexistent") / run_id),
            created_at=time.time(),
            user="u",
            gpus=2,
            total_steps=total_steps,
            state=state,
            config={},
            plan={"global_batch": 8},
        )
    )
    for n, j in enumerate(job_ids):
        reg.add_job(run_id, j, "submit" if n == 0 else "retry", submitted_at=OLD)


@pytest.fixture
def world(tmp_path):
    """A registry with runs whose jobs appear in the recorded squeue/sacct fixtures."""
    reg = Registry(tmp_path / "registry.db")
    runs = tmp_path / "runs"
    add(reg, "pend-1", ["101"])
    add(reg, "run-2", ["102"], state="RUNNING", run_dir=runs / "run-2")
    add(reg, "requeued-3", ["103"], state="RUNNING")
    add(reg, "done-4", ["201"], run_dir=runs / "done-4")
    add(reg, "cancelled-5", ["202"], state="RUNNING")
    add(reg, "retried-6", ["204", "205"], state="PENDING")
    add(reg, "old-7", ["999"], state="COMPLETED")  # final in the registry: never asked about again
    reg.update_job("204", state="FAILED")
    m = runs / "run-2" / "metrics.jsonl"
    m.parent.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 10.0 / s, "samples_per_s": 4.0}) for s in range(1, 51)]
    m.write_text("\n".join(lines) + '\n{"step": 51, "loss": 0.1')  # the trainer is mid-write
    (runs / "run-2" / "events.jsonl").write_text('{"event": "start"}\n{"event": "resume", "step": 20}\n')
    env = {"CLUSTERCTL_REGISTRY": str(reg.path), "PATH": str(tmp_path / "bin"), "SHIM_LOG": str(tmp_path / "calls.log")}
    reg.close()
    return tmp_path, env


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def status_json(env, *args):
    r = run_cli("status", "--json", *args, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_one_batched_call_each_and_registry_updated(world):
    tmp, env = world
    shim(tmp / "bin", "squeue", f"/bin/cat {FIX / 'squeue_odd.txt'}")
    shim(tmp / "bin", "sacct", f"/bin/cat {FIX / 'sacct_odd.txt'}")
    data = status_json(env, "--all")
    log = calls(tmp)
    assert [c.split()[0] for c in log] == ["squeue", "sacct"]  # one call each, squeue first
    asked = {c.split()[0]: sorted(c.split("-j ")[1].split()[0].split(",")) for c in log}
    # squeue: every non-final job in ONE -j list; finished ones (204, 999) not asked about. sacct: only
    # the jobs squeue cannot answer for: requeued (103) or gone from the queue (201, 202, 205).
    assert asked == {"squeue": ["101", "102", "103", "201", "202", "205"], "sacct": ["103", "201", "202", "205"]}
    (acct_call,) = [c for c in log if c.startswith("sacct")]
    assert " -D " in acct_call and " -S " in acct_call  # every attempt; no older job that reused an id
    assert data["source"] == "squeue+sacct" and data["notes"] == []
    by = {r["run_id"]: r for r in data["runs"]}
    assert by["pend-1"]["state"] == "PENDING"
    assert by["requeued-3"]["state"] == "REQUEUED" and by["requeued-3"]["requeues"] == 2
    assert by["cancelled-5"]["state"] == "CANCELLED"
    assert by["retried-6"]["state"] == "TIMEOUT" and by["retried-6"]["job_id"] == "205"
    assert by["retried-6"]["gpu_hours"] == pytest.approx(64 * 86410 / 3600)
    done = by["done-4"]
    assert (done["state"], done["requeues"], done["elapsed_s"]) == ("COMPLETED", 2, 220.0)
    assert done["gpu_hours"] == pytest.approx(2 * 220 / 3600)
    run = by["run-2"]  # last COMPLETE metrics line; ETA = remaining steps x global batch / samples/s
    assert (run["state"], run["step"], run["loss"], run["samples_per_s"]) == ("RUNNING", 50, pytest.approx(0.2), 4.0)
    assert run["eta_s"] == pytest.approx((100 - 50) * 8 / 4.0) and run["resumes"] == 1
    assert run["alloc_gpus"] == 2 and run["node_list"] == "a[1-2]"
    assert by["old-7"]["state"] == "COMPLETED"

    reg = Registry(Path(env["CLUSTERCTL_REGISTRY"]))
    assert reg.get_run("done-4").state == "COMPLETED" and reg.get_run("requeued-3").state == "REQUEUED"
    (job,) = reg.jobs("done-4")
    assert (job.state, job.requeues, job.elapsed_s, job.alloc_gpus, job.exit_code) == ("COMPLETED", 2, 220.0, 2, "0:0")
    # Next time only the jobs that are still active are asked about.
    (tmp / "calls.log").unlink()
    status_json(env, "--all")
    asked = {c.split()[0]: sorted(c.split("-j ")[1].split()[0].split(",")) for c in calls(tmp)}
    assert asked == {"squeue": ["101", "102", "103"], "sacct": ["103"]}


def test_jobs_pending_or_running_a_first_attempt_need_no_accounting(world):
    """The steady state of a watched cluster: squeue answers everything, slurmdbd is not asked."""
    tmp, env = world
    shim(tmp / "bin", "squeue", f"/bin/cat {FIX / 'squeue_odd.txt'}")
    shim(tmp / "bin", "sacct", "exit 1")  # would be a note if it were called
    data = status_json(env, "run-2")
    assert [c.split()[0] for c in calls(tmp)] == ["squeue"]
    assert data["source"] == "squeue" and data["notes"] == []
    (run,) = data["runs"]
    assert (run["state"], run["elapsed_s"], run["alloc_gpus"]) == ("RUNNING", 93784, 2)  # squeue's TimeUsed, TRES
    assert run["gpu_hours"] == pytest.approx(2 * 93784 / 3600)


def test_nothing_active_means_no_slurm_call(world):
    tmp, env = world
    shim(tmp / "bin", "squeue", "exit 1")
    shim(tmp / "bin", "sacct", "exit 1")
    data = status_json(env, "old-7")
    assert calls(tmp) == [] and data["source"] == "registry" and data["notes"] == []
    assert [r["run_id"] for r in data["runs"]] == ["old-7"]


def test_sacct_missing_falls_back_and_says_so(world):
    tmp, env = world
    shim(tmp / "bin", "squeue", f"/bin/cat {FIX / 'squeue_odd.txt'}")  # no sacct on PATH
    res = tmp / "runs" / "done-4" / "submitit" / "201"
    res.mkdir(parents=True)
    (res / "201_0_result.pkl").write_bytes(pickle.dumps(("success", {"final_loss": 1.0})))
    data = status_json(env)
    assert data["source"] == "squeue+registry"
    assert any("accounting unavailable" in n and "sacct" in n for n in data["notes"])
    by = {r["run_id"]: r for r in data["runs"]}
    assert by["run-2"]["state"] == "RUNNING" and by["run-2"]["elapsed_s"] == 93784  # squeue's TimeUsed
    assert by["done-4"]["state"] == "COMPLETED"  # left the queue; submitit's result file tells
    assert by["cancelled-5"]["state"] == "UNKNOWN"  # left the queue, no accounting, no result file
    r = run_cli("status", env=env | {"COLUMNS": "200"})
    assert r.returncode == 0 and "note: accounting unavailable" in r.stdout and "source: squeue+registry" in r.stdout
    assert "done-4" in r.stdout and "COMPLETED" in r.stdout


def test_hung_controller_is_reported_within_the_timeout(world):
    tmp, env = world
    # The child `sleep` keeps squeue's pipes open: only killing the process group returns in time.
    shim(tmp / "bin", "squeue", "/bin/sleep 60\necho never")
    started = time.monotonic()
    r = run_cli("status", "--json", env=env | {"CLUSTERCTL_SLURM_TIMEOUT": "1"}, timeout=30)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < deadline(30)  # guard against a hang, not a benchmark
    data = json.loads(r.stdout)
    assert data["source"] == "registry"
    assert any("did not answer within 1 s" in n and "last known states" in n for n in data["notes"])
    by = {x["run_id"]: x["state"] for x in data["runs"]}
    assert by == {
        "pend-1": "PENDING",
        "run-2": "RUNNING",
        "requeued-3": "RUNNING",
        "done-4": "PENDING",
        "cancelled-5": "RUNNING",
        "retried-6": "PENDING",
        "old-7": "COMPLETED",
    }
    assert [c.split()[0] for c in calls(tmp)] == ["squeue"]


def test_local_executor_state_from_submitit_files(tmp_path):
    reg = Registry(tmp_path / "r.db")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit-local-controller"])
    try:
        while b"submitit" not in Path(f"/proc/{sleeper.pid}/cmdline").read_bytes():  # until exec is done
            time.sleep(0.01)
        for rid, payload in (
            ("ok", ("success", 3)),
            ("bad", ("error", "Traceback ...")),
            ("alive", None),
            ("gone", None),
        ):
            run_dir = tmp_path / rid
            pid = str(sleeper.pid) if rid == "alive" else "999999999"
            add(reg, rid, [pid], state="RUNNING", executor="local", run_dir=run_dir)
            if payload:
                (run_dir / "submitit").mkdir(parents=True)
                (run_dir / "submitit" / f"{pid}_0_result.pkl").write_bytes(pickle.dumps(payload, protocol=4))
        got = status.refresh(reg, reg.list_runs(), timeout=1).states
        assert got == {"ok": "COMPLETED", "bad": "FAILED", "alive": "RUNNING", "gone": "FAILED"}
        assert reg.jobs("alive")[0].state == "RUNNING"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert status.refresh(reg, [reg.get_run("alive")]).states == {"alive": "FAILED"}


# --- pure pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", [2, 3, 4, 5])
def test_pickle_outcome_reads_without_unpickling(proto):
    class Boom:
        def __reduce__(self):
            return (os.system, ("exit 3",))  # would run if unpickled

    assert results.pickle_outcome(pickle.dumps(("success", Boom()), protocol=proto)[:256]) == "COMPLETED"
    assert results.pickle_outcome(pickle.dumps(("error", "tb"), protocol=proto)) == "FAILED"
    assert results.pickle_outcome(b"not a pickle") is None


def test_tail_json_reads_only_the_end(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n' + "x" * 3_000_000 + "\n")  # the only valid line is 3 MB back
    assert artifacts.tail_json(p, max_bytes=1 << 20) is None  # gave up after 1 MiB: never read it all
    assert artifacts.tail_json(p, max_bytes=1 << 23) == {"step": 1}
    p.write_text("".join(json.dumps({"step": s, "pad": "y" * 500}) + "\n" for s in range(1000)))
    assert artifacts.tail_json(p, chunk=100)["step"] == 999  # a line longer than a chunk
    assert artifacts.tail_json(tmp_path / "missing.jsonl") is None
    p.write_text("")
    assert artifacts.tail_json(p) is None


def test_job_changes_and_run_state():
    job = JobRecord(job_id="7", run_id="r", attempt=1, kind="submit", submitted_at=OLD, state="RUNNING", elapsed_s=50.0)
    q = parse.QueueRow("7", "PENDING", "PENDING", 0.0, None, None, None, 1, "BeginTime")
    a = parse.AcctRow("7", "RUNNING", "RUNNING", 80.0, 1.0, None, 8, "a1", "0:0", 2, 1)  # lags behind squeue
    ch = slurm_backend.job_changes(job, q, a, time.time())
    assert ch == {
        "state": "PENDING",
        "requeues": 1,
        "started_at": 1.0,
        "elapsed_s": 80.0,
        "alloc_gpus": 8,
        "node_list": "a1",
    }  # no exit code from a row that is not final
    ended = dataclasses.replace(a, state="FAILED", exit_code="3:0")
    assert (
        slurm_backend.job_changes(job, dataclasses.replace(q, state="FAILED"), ended, time.time())["exit_code"] == "3:0"
    )
    assert slurm_backend.job_changes(job, None, None, time.time()) == {"state": "UNKNOWN"}
    young = JobRecord(job_id="8", run_id="r", attempt=1, kind="submit", submitted_at=time.time(), state="SUBMITTED")
    assert slurm_backend.job_changes(young, None, None, time.time()) == {}  # maybe not in accounting yet
    # without accounting, elapsed only grows (squeue knows the current attempt only)
    running = dataclasses.replace(q, state="RUNNING", elapsed_s=10.0)
    assert "elapsed_s" not in slurm_backend.job_changes(job, running, None, time.time())
    assert (
        slurm_backend.job_changes(job, dataclasses.replace(running, elapsed_s=70.0), None, time.time())["elapsed_s"]
        == 70.0
    )
    run = RunRecord("r", "r", "p", "slurm", "/x", 0.0, "u", 2, 10, "RUNNING")
    job.__dict__.update(ch)
    assert status.run_state(run, [job]) == "REQUEUED"
    assert status.run_state(run, []) == "RUNNING"


def test_a_job_whose_accounting_row_still_runs_is_asked_about_again_for_its_exit_code():
    """The race the real-Slurm test met under load: squeue says FAILED (no end time: it ran 0 s) while
    slurmdbd's row still says RUNNING. The first poll must mark when the end was seen, so that the job
    is asked about again for SACCT_LAG_S; with the lag counted from its submission (an hour ago) it
    was never asked again and its exit code, which retries need, stayed unknown."""
    now = time.time()
    run = RunRecord("r", "r", "p", "slurm", "/x", 0.0, "u", 2, 10, "RUNNING")
    job = JobRecord("7", "r", 1, "submit", OLD, "RUNNING", started_at=now - 1)
    q = parse.QueueRow("7", "FAILED", "FAILED", 0.0, now - 1, "a1", None, 0, "NonZeroExitCode")
    a = parse.AcctRow("7", "RUNNING", "RUNNING", 0.0, now - 1, None, None, "a1", "0:0", 1, 0)
    ch = slurm_backend.job_changes(job, q, a, now)
    assert ch["state"] == "FAILED" and ch["ended_at"] == now and "exit_code" not in ch
    job.__dict__.update(ch)
    assert get_backend("slurm").needs_poll(dataclasses.replace(run, state="FAILED"), job, now + 10)
    ended = dataclasses.replace(a, state="FAILED", end=now - 0.5, exit_code="3:0")
    later = slurm_backend.job_changes(job, q, ended, now + 10)
    assert later["exit_code"] == "3:0" and later["ended_at"] == now - 0.5  # accounting's end replaces it


def test_an_ended_job_is_asked_about_until_accounting_has_its_exit_code():
    """squeue reports the end before slurmdbd has the record: keep asking (briefly) for the exit code."""
    now = time.time()
    run = RunRecord("r", "r", "p", "slurm", "/x", 0.0, "u", 2, 10, "FAILED")
    job = JobRecord("7", "r", 1, "submit", now - 30, "FAILED", ended_at=now - 5)
    assert get_backend(run.executor).needs_poll(run, job, now)
    assert not get_backend(run.executor).needs_poll(run, dataclasses.replace(job, exit_code="3:0"), now)
    assert not get_backend(run.executor).needs_poll(run, dataclasses.replace(job, ended_at=now - 600), now)  # gave up
    local = dataclasses.replace(run, executor="local")
    assert not get_backend(local.executor).needs_poll(local, job, now)  # no accounting to wait for
    running = dataclasses.replace(job, state="RUNNING", ended_at=None)
    assert get_backend("slurm").needs_poll(dataclasses.replace(run, state="RUNNING"), running, now)
    # a job submitted hours ago that squeue alone reports ended: the lag counts from when it was seen
    # ended, so the next status still asks sacct for its exit code (was lost: CI, slurmdbd lagging)
    long = JobRecord("9", "r", 1, "submit", now - 7200, "RUNNING", started_at=now - 7000)
    q = parse.QueueRow("9", "FAILED", "FAILED", 7000.0, now - 7000, "a1", 2, 0, "NonZeroExitCode")
    seen = slurm_backend.job_changes(long, q, None, now)
    assert seen["state"] == "FAILED" and seen["ended_at"] == now and "exit_code" not in seen
    long.__dict__.update(seen)
    assert get_backend("slurm").needs_poll(dataclasses.replace(run, state="FAILED"), long, now + 10)
    assert not get_backend("slurm").needs_poll(run, long, now + 10 + slurm_backend.SACCT_LAG_S)
    a = parse.AcctRow("9", "FAILED", "FAILED", 7000.0, now - 7000, now - 3, 2, "a1", "3:0", 1, 0)
    final = slurm_backend.job_changes(long, None, a, now + 10)
    assert final["exit_code"] == "3:0" and final["ended_at"] == now - 3  # accounting's end replaces it


def test_summarize_sums_attempts():
    run = RunRecord("r", "r", "p", "slurm", "/x", 0.0, "u", 16, 1000, "RUNNING", plan={"global_batch": 64})
    jobs = [
        JobRecord("1", "r", 1, "submit", 0.0, "NODE_FAIL", elapsed_s=3600.0, alloc_gpus=16),
        JobRecord("2", "r", 2, "retry", 0.0, "RUNNING", started_at=time.time() - 1800, alloc_gpus=None),
    ]
    row = status.summarize(run, jobs, {"step": 400, "loss": 2.5, "samples_per_s": 32.0}, 0, time.time())
    assert row["state"] == "RUNNING" and row["job_id"] == "2" and row["job_ids"] == ["1", "2"]
    assert row["elapsed_s"] == pytest.approx(5400, abs=5)
    assert row["gpu_hours"] == pytest.approx(16 * 1.5, abs=0.05)  # unknown alloc: the run's world size
    assert row["eta_s"] == pytest.approx(600 * 64 / 32.0)
    assert status.summarize(run, jobs, None, 0, time.time())["eta_s"] is None


def test_status_imports_no_heavy_module(tmp_path):
    probe = (
        "import sys, json; from typer.testing import CliRunner; from clusterctl.cli import app; "
        "r = CliRunner().invoke(app, ['status', '--all']); "
        "print(json.dumps([r.exit_code, [m for m in ('torch', 'deepspeed', 'webdataset', 'pandas', 'matplotlib') if m in sys.modules]]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=deadline(60),
        env=os.environ | {"CLUSTERCTL_REGISTRY": str(tmp_path / "r.db"), "PATH": str(tmp_path)},
    )
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [0, []], r.stderr


def test_unknown_run_is_one_line_error(tmp_path):
    r = run_cli("status", "nope", env={"CLUSTERCTL_REGISTRY": str(tmp_path / "r.db")})
    assert r.returncode == 2 and r.stderr.strip().startswith("error: RUN: no run matches 'nope'")
    assert len(r.stderr.strip().splitlines()) == 1


# --- against the real local cluster (scripts/slurm-local.sh) ------------------------------------


@pytest.mark.slurm
def test_status_against_real_slurm(tmp_path):
    """Real jobs (completed, failed, cancelled, running) on the local cluster; wrappers around the
    real squeue/sacct log each call: at most one of each per status invocation (sacct only while
    some job needs accounting), states as Slurm says."""
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    ok = sbatch_job("--wrap", "sleep 1")
    bad = sbatch_job("--wrap", "exit 3")
    gone = sbatch_job("--begin=now+1hour", "--wrap", "true")
    live = sbatch_job(
        "--wrap", f"sleep {int(deadline(90)) + 120}"
    )  # running through the whole wait below (scancelled after)
    subprocess.run(["scancel", gone], check=True, timeout=deadline(30))
    reg = Registry(tmp_path / "r.db")
    for name, jid in (("ok", ok), ("bad", bad), ("gone", gone), ("live", live)):
        add(reg, name, [jid])
    reg.close()
    bin_dir = tmp_path / "bin"
    for tool in ("squeue", "sacct"):
        shim(
            bin_dir, tool, f'exec {subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()} "$@"'
        )
    env = {
        "CLUSTERCTL_REGISTRY": str(tmp_path / "r.db"),
        "SHIM_LOG": str(tmp_path / "calls.log"),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    want = {"ok": "COMPLETED", "bad": "FAILED", "gone": "CANCELLED", "live": "RUNNING"}
    end = time.monotonic() + deadline(90)
    try:
        while True:
            before = len(calls(tmp_path))
            data = status_json(env, "--all")
            new = [c.split()[0] for c in calls(tmp_path)[before:]]
            assert new in (["squeue"], ["squeue", "sacct"])  # at most one call each, every time
            assert data["source"] == "+".join(new) and data["notes"] == []
            got = {r["run_id"]: r["state"] for r in data["runs"]}
            codes = {r["run_id"]: r["exit_code"] for r in data["runs"]}
            # squeue may report the end before slurmdbd has the record: a later call fills the code in
            # (every ended job is asked about until accounting has it, the cancelled one included)
            ended = (codes["ok"], codes["bad"], codes["gone"])
            if (got == want and None not in ended) or time.monotonic() > end:
                break
            time.sleep(2)
        assert got == want, data
        assert any(c.startswith("sacct") for c in calls(tmp_path))  # the ended jobs needed accounting
        by = {r["run_id"]: r for r in data["runs"]}
        assert by["bad"]["exit_code"] == "3:0" and by["ok"]["exit_code"] == "0:0" and by["ok"]["elapsed_s"] >= 1
        assert by["gone"]["exit_code"] is not None
        before = len(calls(tmp_path))  # now only `live` is left, running its first attempt: squeue alone
        data = status_json(env, "--all")
        assert [c.split()[0] for c in calls(tmp_path)[before:]] == ["squeue"] and data["source"] == "squeue"
        assert {r["run_id"]: r["state"] for r in data["runs"]}["live"] == "RUNNING"
    finally:
        subprocess.run(["scancel", live], timeout=deadline(30))


def test_listing_fits_a_narrow_terminal_by_hiding_the_least_needed_columns():
    now = time.time()
    run = RunRecord(
        "crossmodal-xl-20261123-013850-72f6",
        "crossmodal-xl",
        "a100x256",
        "slurm",
        "/x",
        now,
        "u",
        256,
        200_000,
        "RUNNING",
        plan={"global_batch": 8192},
    )
    jobs = [
        JobRecord(
            "12345678",
            run.run_id,
            1,
            "submit",
            now - 90_000,
            "RUNNING",
            started_at=now - 86_400,
            alloc_gpus=256,
            requeues=2,
        )
    ]
    row = status.summarize(run, jobs, {"step": 123_456, "loss": 2.3456, "samples_per_s": 10_234.5}, 0, now)
    full, hidden = status_table.table_lines([row])
    assert hidden == [] and full[0].split() == [h for h, _ in status_table.COLUMNS] and len(full[1]) > 100
    narrow, hidden = status_table.table_lines([row], 80)
    assert all(len(line) <= 80 for line in narrow), narrow
    # the id is never cut (issue 25): it takes a line of its own, the figures under it, fitted without RUN
    assert hidden == ["SAMPLES/S", "PROFILE"]  # least needed first; only as many as it takes
    assert narrow[0].split() == ["JOB", "STATE", "RQ", "STEP", "LOSS", "ETA", "ELAPSED", "GPU-H"]
    assert narrow[1] == run.run_id
    assert narrow[2].split() == ["12345678", "RUNNING", "2", "123,456/200,000", "2.3456", "17h01m", "1d00h", "6,144"]


def test_a_hung_controller_does_not_double_the_wait(monkeypatch):
    """squeue used up most of the time-out: sacct gets what is left (at least 2 s), not a fresh one."""
    asked = {}

    def squeue(ids, timeout):
        time.sleep(0.5)
        raise commands.SlurmUnavailable(f"squeue: slurmctld did not answer within {timeout:g} s")

    def sacct(ids, timeout, since=None):
        asked["timeout"] = timeout
        return {}

    monkeypatch.setattr(commands, "squeue", squeue)
    monkeypatch.setattr(commands, "sacct", sacct)
    job = JobRecord("7", "r", 1, "submit", OLD, "RUNNING")
    view = slurm_backend.query_slurm([job], 10.0)
    assert 2.0 <= asked["timeout"] <= 9.5 and view.source == "sacct+registry"
    slurm_backend.query_slurm([job], 1.0)
    assert asked["timeout"] == 2.0  # the floor: accounting still gets a fair chance
