"""The run registry: lookups, attempts, migrations from an older schema, many processes at once."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from clusterctl.runs.dbfile import connect
from clusterctl.runs.registry import SCHEMA_VERSION, Registry, RunRecord, migrate
from tests.conftest import run_cli
from vltrain.common.errors import UserError


def make_run(
    run_id: str,
    name: str = "tiny",
    state: str = "PENDING",
    created: float | None = None,
    executor: str = "slurm",
    run_dir: str = "/nonexistent",
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        name=name,
        profile="slurm-local",
        executor=executor,
        run_dir=run_dir,
        created_at=time.time() if created is None else created,
        user="u",
        gpus=2,
        total_steps=100,
        state=state,
        config={"model": name, "optim": {"lr": 3e-4}},
        plan={"global_batch": 8},
    )


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "sub" / "registry.db")
    yield r
    r.close()


def test_default_path_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERCTL_REGISTRY", str(tmp_path / "x.db"))
    r = Registry()
    assert r.path == tmp_path / "x.db" and r.path.exists()


def test_file_is_wal_and_private(reg):
    assert reg._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert stat.S_IMODE(reg.path.parent.stat().st_mode) == 0o700
    assert reg._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_run_round_trip_and_lookup(reg):
    reg.add_run(make_run("tiny-20240101-000000-aaaa", created=1.0))
    reg.add_run(make_run("tiny-20240102-000000-bbbb", created=2.0))
    reg.add_run(make_run("base-20240103-000000-cccc", name="base", created=3.0))
    got = reg.get_run("base-20240103-000000-cccc")
    assert got == make_run("base-20240103-000000-cccc", name="base", created=3.0)  # config/plan survive JSON
    assert reg.get_run("tiny").run_id == "tiny-20240102-000000-bbbb"  # a name means its newest run
    assert reg.get_run("tiny-20240101").run_id == "tiny-20240101-000000-aaaa"  # unique prefix
    with pytest.raises(UserError, match="matches several runs"):
        reg.get_run("tiny-2024")
    with pytest.raises(UserError, match="no run matches"):
        reg.get_run("nope")
    with pytest.raises(UserError, match="no run matches"):
        reg.get_run("")
    with pytest.raises(UserError, match="exists already"):
        reg.add_run(make_run("tiny-20240101-000000-aaaa"))


def test_new_run_id_shape(reg):
    rid = reg.new_run_id("tiny")
    name, day, clock, tag = rid.rsplit("-", 3)
    assert name == "tiny" and len(day) == 8 and len(clock) == 6 and len(tag) == 4 and int(tag, 16) >= 0
    reg.add_run(make_run(rid))
    assert all(reg.new_run_id("tiny") != rid for _ in range(50))


def test_jobs_attempts_updates_and_batched_read(reg):
    reg.add_run(make_run("a"))
    reg.add_run(make_run("b"))
    j1 = reg.add_job("a", "11", "submit", submitted_at=5.0)
    j2 = reg.add_job("a", "12", "retry")
    j3 = reg.add_job("a", "13", "resume")
    reg.add_job("b", "11", "submit")  # a job id can repeat across runs (a wiped test cluster)
    assert (j1.attempt, j2.attempt, j3.attempt) == (1, 2, 3) and j1.submitted_at == 5.0 and j1.state == "SUBMITTED"
    reg.update_job("12", run_id="a", state="NODE_FAIL", requeues=2, alloc_gpus=16, elapsed_s=30.5, node_list="a[1-2]")
    reg.update_job("11", state="RUNNING")  # without run_id: the newest job with that id (run b's)
    jobs = reg.jobs_for(["a", "b", "missing"])
    assert [j.kind for j in jobs["a"]] == ["submit", "retry", "resume"] and jobs["missing"] == []
    assert (jobs["a"][1].state, jobs["a"][1].requeues, jobs["a"][1].alloc_gpus, jobs["a"][1].elapsed_s) == (
        "NODE_FAIL",
        2,
        16,
        30.5,
    )
    assert jobs["a"][0].state == "SUBMITTED" and jobs["b"][0].state == "RUNNING"
    assert reg.jobs("a") == jobs["a"]
    # programming errors, not the user's: ordinary exceptions (a traceback), not one-line UserErrors
    with pytest.raises(ValueError, match="cannot be set"):
        reg.update_job("11", run_id="a", attempt=9)
    with pytest.raises(ValueError, match="kind"):
        reg.add_job("a", "14", "whatever")
    with pytest.raises(ValueError, match="no run"):
        reg.add_job("zzz", "14", "submit")


def test_jobs_for_many_runs_in_one_query(reg):
    ids = [f"r{i:05d}" for i in range(1500)]  # more than SQLite's old 999-variable limit
    for i in ids:
        reg.add_run(make_run(i))
    reg._conn.executemany(
        "INSERT INTO jobs (job_id, run_id, attempt, kind, submitted_at, state) VALUES (?,?,1,'submit',0,'PENDING')",
        [(str(n), i) for n, i in enumerate(ids)],
    )
    statements = []
    reg._conn.set_trace_callback(statements.append)
    jobs = reg.jobs_for(ids)
    reg._conn.set_trace_callback(None)
    assert len(statements) == 1
    assert all(jobs[i][0].job_id == str(n) for n, i in enumerate(ids))


def test_active_and_recent(reg):
    for n in range(10):
        reg.add_run(make_run(f"done{n}", state="COMPLETED", created=float(n)))
    reg.add_run(make_run("old-running", state="RUNNING", created=-5.0))
    reg.add_run(make_run("pending", state="PENDING", created=4.5))
    got = [r.run_id for r in reg.active_and_recent(3)]
    assert got == ["done9", "done8", "done7", "pending", "old-running"]
    assert [r.run_id for r in reg.list_runs(include_finished=False)] == ["pending", "old-running"]
    assert len(reg.list_runs()) == 12 and [r.run_id for r in reg.list_runs(limit=2)] == ["done9", "done8"]
    reg.set_run_states({"pending": "CANCELLED", "old-running": "COMPLETED"})
    assert [r.run_id for r in reg.active_and_recent(2)] == ["done9", "done8"]


def test_events_and_delete(reg):
    reg.add_run(make_run("a"))
    reg.add_job("a", "1", "submit")
    reg.add_event("a", "submit", {"job_id": "1"})
    reg.add_event("a", "cancel")
    assert [(e["kind"], e["data"]) for e in reg.events("a")] == [("submit", {"job_id": "1"}), ("cancel", {})]
    reg.delete_run("a")
    assert reg.jobs("a") == [] and reg.events("a") == [] and reg.count_runs() == 0


def test_failed_write_leaves_nothing(reg):
    reg.add_run(make_run("a"))
    reg.add_job("a", "1", "submit")
    with pytest.raises(sqlite3.IntegrityError):  # the second update breaks NOT NULL: both roll back
        reg.update_jobs([("1", "a", {"state": "RUNNING"}), ("1", "a", {"submitted_at": None})])
    assert reg.jobs("a")[0].state == "SUBMITTED"


def test_guarded_updates_never_undo_a_newer_write(reg):
    reg.add_run(make_run("a", state="RUNNING"))
    reg.add_job("a", "1", "submit")
    reg.update_job("1", run_id="a", state="CANCELLED")  # e.g. `clusterctl cancel` wrote meanwhile
    reg.set_run_state("a", "CANCELLED")
    reg.update_jobs([("1", "a", {"state": "RUNNING", "elapsed_s": 5.0}, "SUBMITTED")])  # a stale refresh
    reg.set_run_states({"a": "RUNNING"}, if_states={"a": "PENDING"})
    assert reg.jobs("a")[0].state == "CANCELLED" and reg.jobs("a")[0].elapsed_s is None
    assert reg.get_run("a").state == "CANCELLED"
    reg.update_jobs([("1", "a", {"elapsed_s": 5.0}, "CANCELLED")])
    assert reg.jobs("a")[0].elapsed_s == 5.0


# --- migrations --------------------------------------------------------------------------------


def test_migration_from_version_1_keeps_rows(tmp_path):
    path = tmp_path / "old.db"
    conn = connect(path)
    migrate(conn, target=1)  # what an older clusterctl created
    conn.execute(
        "INSERT INTO runs VALUES ('old-1','old','a100x64','slurm','/r',1.0,'u',64,1000,'RUNNING','{\"a\": 1}','{}')"
    )
    conn.execute(
        "INSERT INTO jobs (job_id, run_id, attempt, kind, submitted_at, state, elapsed_s) "
        "VALUES ('77','old-1',1,'submit',1.0,'RUNNING',12.0)"
    )
    conn.execute("INSERT INTO events (run_id, ts, kind, data) VALUES ('old-1', 1.0, 'submit', '{}')")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    with pytest.raises(sqlite3.OperationalError):  # the v2 columns do not exist yet
        conn.execute("SELECT requeues FROM jobs")
    conn.close()

    reg = Registry(path)
    assert reg._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    run = reg.get_run("old")
    assert run.config == {"a": 1} and run.gpus == 64
    (job,) = reg.jobs("old-1")
    assert (job.job_id, job.elapsed_s, job.requeues, job.alloc_gpus) == ("77", 12.0, 0, None)
    reg.update_job("77", run_id="old-1", requeues=3, exit_code="0:15")
    assert reg.jobs("old-1")[0].requeues == 3
    assert reg.add_job("old-1", "78", "resume").attempt == 2
    assert len(reg.events("old-1")) == 1
    reg.close()
    assert migrate(connect(path)) == SCHEMA_VERSION  # idempotent: nothing left to do


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    conn = connect(path)
    migrate(conn)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(UserError, match="newer than this clusterctl"):
        Registry(path)


# --- many processes at once --------------------------------------------------------------------

RUNS_PER_WRITER = 12


def _writer(path: str, w: int, run_root: str) -> None:
    reg = Registry(Path(path))
    for n in range(RUNS_PER_WRITER):
        rid = f"w{w:02d}-{n:03d}"
        local = n % 3 == 0
        run_dir = Path(run_root) / rid
        reg.add_run(make_run(rid, name=f"w{w}", executor="local" if local else "slurm", run_dir=str(run_dir)))
        first = reg.add_job(rid, f"{w}{n:03d}1", "submit")
        if local:  # a finished local job: `status` readers will mark it COMPLETED concurrently
            (run_dir / "submitit").mkdir(parents=True)
            (run_dir / "submitit" / f"{first.job_id}_0_result.pkl").write_bytes(pickle.dumps(("success", None)))
        reg.update_job(first.job_id, run_id=rid, state="FAILED", exit_code="0:9")
        reg.add_job(rid, f"{w}{n:03d}2", "retry")
        reg.add_event(rid, "retry", {"n": n})
        reg.list_runs(limit=20)


def test_sixteen_processes_write_and_read_at_once(tmp_path):
    """12 writer processes and 4 `clusterctl status` CLIs on one registry: no lost or broken rows."""
    path = tmp_path / "registry.db"
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(str(path), w, str(tmp_path / "runs"))) for w in range(12)]
    import subprocess

    from tests.conftest import BIN, REPO, deadline

    env = os.environ | {"CLUSTERCTL_REGISTRY": str(path), "PATH": str(tmp_path / "nobin"), "COLUMNS": "200"}
    loop = "for i in 1 2 3 4 5; do {cl} status --all --json > {out}.$i || exit 1; done"
    readers = [
        subprocess.Popen(
            ["/bin/sh", "-c", loop.format(cl=BIN / "clusterctl", out=tmp_path / f"status{k}")], cwd=REPO, env=env
        )
        for k in range(4)
    ]
    for p in writers:
        p.start()
    for p in writers:
        p.join(timeout=deadline(240))
        assert p.exitcode == 0
    assert all(r.wait(timeout=deadline(240)) == 0 for r in readers)

    reg = Registry(path)
    assert reg._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    runs = reg.list_runs()
    assert len(runs) == 12 * RUNS_PER_WRITER
    jobs = reg.jobs_for(r.run_id for r in runs)
    for r in runs:
        assert r.config == {"model": r.name, "optim": {"lr": 3e-4}}
        js = jobs[r.run_id]
        assert [(j.attempt, j.kind) for j in js] == [(1, "submit"), (2, "retry")]
        assert js[0].state == "FAILED" and js[0].exit_code == "0:9"  # a status reader never undid a write
        assert len(reg.events(r.run_id)) == 1
    outputs = [json.loads(p.read_text()) for p in tmp_path.glob("status*.*")]
    assert len(outputs) == 20 and all(isinstance(o["runs"], list) for o in outputs)
    # A final rerun refreshes every local run from its files (the retry job has no result: FAILED).
    assert run_cli("status", "--all", "--json", env={"CLUSTERCTL_REGISTRY": str(path)}).returncode == 0
