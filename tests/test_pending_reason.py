"""`status` and `watch` say why a job is pending and when Slurm expects it to start (issue 25, point 7):
squeue's Reason and StartTime (the backfill scheduler's estimate, what `squeue --start` prints) were
parsed and never shown. Here: from recorded squeue output, then against the real local cluster with a
held job (JobHeldUser), one not to start before a time (BeginTime) and one asking for more nodes than
the partition has (PartitionNodeLimit). Also the 80-column fixes of issue 25: the status listing never
cuts a run id, and the follow hint after `submit` keeps each command on one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from clusterctl.backends.slurm import backend as slurm_backend
from clusterctl.backends.slurm.parse import parse_squeue
from clusterctl.render import status_table
from clusterctl.render.watch_view import RunView, Tail, plain_line, run_panel
from clusterctl.runs import status
from clusterctl.runs.registry import Registry
from clusterctl.specs import JobRecord, RunRecord
from tests.conftest import BIN, deadline, run_cli, sbatch_job, slurm_up, trainer_shards, wait_until

FIX = Path(__file__).parent / "fixtures" / "slurm"
NOW = time.time()


def _run(run_id: str = "vl-seed000-20261206-230930-776a", state: str = "PENDING") -> RunRecord:
    return RunRecord(run_id, "vl-seed000", "a100x32", "slurm", "/x", NOW, "u", 32, 12_000, state, plan={})


# --- pure: squeue's row -> the status row -> what is printed ----------------------------------------------
def test_squeues_reason_and_start_become_the_status_rows_fields():
    rows = parse_squeue((FIX / "squeue_odd.txt").read_text())
    held = slurm_backend.waiting(rows["105"])  # REQUEUE_HOLD: requeued, waits too
    assert held == {"reason": "JobHeldAdmin", "detail": "held by an administrator", "expected_start": None}
    begin = slurm_backend.waiting(rows["103"])
    assert begin is not None and begin["reason"] == "BeginTime" and begin["detail"] == "not before its begin time"
    assert begin["expected_start"] == rows["103"].start is not None  # StartTime of a pending job: the estimate
    assert slurm_backend.waiting(rows["101"])["reason"] == "Priority"  # type: ignore[index]
    assert slurm_backend.waiting(rows["102"]) is None  # running: not waiting, whatever its Reason says
    job = JobRecord("105", "r", 1, "submit", NOW, "PENDING")
    row = status.summarize(_run(), [job], None, 0, NOW, None, held)
    assert (row["pending_reason"], row["pending_detail"], row["expected_start"]) == (
        "JobHeldAdmin",
        "held by an administrator",
        None,
    )
    assert status.summarize(_run(), [job], None, 0, NOW)["pending_reason"] is None


def test_the_pending_line_says_the_reason_its_meaning_and_the_expected_start():
    row = {"pending_reason": "JobHeldUser", "pending_detail": "held by its user: scontrol release 7"}
    assert status_table.pending_text(row | {"expected_start": None}, NOW) == (
        "JobHeldUser (held by its user: scontrol release 7); no expected start yet"
    )
    later = status_table.pending_text({"pending_reason": "Resources", "expected_start": NOW + 3600 + 30}, NOW)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW + 3630))
    assert later == f"Resources; expected start {when} (in 1h00m)"
    assert status_table.pending_text({"pending_reason": "Priority", "expected_start": NOW - 5}, NOW).endswith("(due)")
    assert status_table.pending_text({"pending_reason": None}, NOW) is None


def test_status_and_watch_show_it(capsys):
    # print_status counts the wait from the clock, so "now" is taken here, not when the suite collected
    # this module (the full suite reaches this test ~10 minutes after collection: "(due)")
    now = time.time()
    waits = {"reason": "BeginTime", "detail": "not before its begin time", "expected_start": now + 600}
    row = status.summarize(_run(), [JobRecord("7", "r", 1, "submit", now, "PENDING")], None, 0, now, None, waits)
    status_table.print_status({"source": "squeue", "notes": [], "runs": [row]})
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if "BeginTime" in ln]
    assert line.startswith(f"PENDING {row['run_id']}: BeginTime (not before its begin time); expected start ")
    assert re.search(r"\(in (10m00s|9m[0-5]\ds)\)$", line), line  # a busy machine may take seconds to print
    view = RunView(Tail(Path("/nonexistent")), Tail(Path("/nonexistent")))
    assert "| pending: BeginTime (not before its begin time); expected start " in plain_line(row, view, now)
    from rich.console import Console

    console = Console(width=80, record=True, color_system=None)
    console.print(run_panel(row, view, 80, now))
    assert "pending: BeginTime (not before its begin time); expected start" in console.export_text()


# --- 80 columns: a run id is never cut ------------------------------------------------------------------
def test_at_80_columns_each_run_id_stays_whole_on_a_line_of_its_own_when_the_columns_do_not_fit():
    """Was: ids cut to fit ("vl-seed000-2026…") once RES appeared; the rest of the row is kept under it."""
    job = JobRecord("12345678", "x", 1, "submit", NOW - 90_000, "RUNNING", started_at=NOW - 86_400, requeues=2)
    rows = []
    for i, rid in enumerate(("vl-seed000-20261206-230930-776a", "crossmodal-xl-20261123-013850-72f6")):
        run = _run(rid, "RUNNING")
        rows.append(status.summarize(run, [job], {"step": 1234 + i, "loss": 2.3456, "samples_per_s": 99.5}, 1, NOW))
    wide, hidden = status_table.table_lines(rows)
    assert hidden == [] and wide[0].split()[:2] == ["RUN", "JOB"] and len(wide) == 3
    lines, hidden = status_table.table_lines(rows, 80)
    assert all(len(line) <= 80 for line in lines), lines
    head = ["JOB", "PROFILE", "STATE", "RQ", "RES", "STEP", "LOSS", "ETA", "ELAPSED", "GPU-H"]
    assert lines[0].split() == head and hidden == ["SAMPLES/S"]  # without RUN, the columns fit again
    assert [lines[1], lines[3]] == [r["run_id"] for r in rows]  # whole, each on its own line
    assert lines[2].startswith("  ") and "RUNNING" in lines[2] and "1,234/12,000" in lines[2]
    # a listing that fits keeps one line per run, ids whole
    short = [dict(r, run_id=f"r{i}") for i, r in enumerate(rows)]
    lines, _ = status_table.table_lines(short, 80)
    assert [ln.split()[0] for ln in lines] == ["RUN", "r0", "r1"]


# --- against the real local cluster (scripts/slurm-local.sh) ------------------------------------------


@pytest.mark.slurm
def test_status_shows_the_real_pending_reasons_and_expected_start(tmp_path):
    """Three real jobs that cannot start: held, not before a begin time, more nodes than `debug` has."""
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    jobs: list[str] = []
    try:
        jobs.append(sbatch_job("-t", "1", "--hold", "--wrap", "true"))
        jobs.append(sbatch_job("-t", "1", "--begin=now+1hour", "--wrap", "true"))
        jobs.append(sbatch_job("-t", "1", "-N", "4", "--wrap", "true"))  # the cluster has 3 nodes
        reg = Registry(tmp_path / "r.db")
        for name, jid in zip(("held", "later", "toobig"), jobs, strict=True):
            reg.add_run(
                RunRecord(name, name, "slurm-local", "slurm", str(tmp_path / name), time.time(), "u", 2, 10, "PENDING")
            )
            reg.add_job(name, jid, "submit")
        reg.close()
        env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "r.db")}

        def reasons() -> dict | None:
            r = run_cli("status", "--json", env=env, timeout=60)
            assert r.returncode == 0, r.stderr
            by = {row["run_id"]: row for row in json.loads(r.stdout)["runs"]}
            return by if by["toobig"]["pending_reason"] == "PartitionNodeLimit" else None  # once scheduled

        by = wait_until(reasons, 30, "squeue's Reason for the 4-node job")
        assert by["held"]["pending_reason"] == "JobHeldUser" and by["held"]["expected_start"] is None
        assert by["held"]["pending_detail"] == f"held by its user: scontrol release {jobs[0]}"
        assert by["later"]["pending_reason"] == "BeginTime"
        assert 3000 < by["later"]["expected_start"] - time.time() <= 3600  # squeue's StartTime: the begin time
        all_rows = json.loads(run_cli("status", "--all", "--json", env=env, timeout=60).stdout)["runs"]
        assert {r["run_id"]: r["pending_reason"] for r in all_rows}["held"] == "JobHeldUser"  # --all too
        r = run_cli("status", env=env | {"COLUMNS": "80"}, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert (
            f"PENDING held: JobHeldUser (held by its user: scontrol release {jobs[0]}); no expected start yet" in lines
        )
        assert any(re.match(r"PENDING later: BeginTime \(not before its begin time\); expected start .* \(in \d", ln)
                   for ln in lines), lines  # fmt: skip
        assert any(ln.startswith("PENDING toobig: PartitionNodeLimit (asks for more nodes") for ln in lines), lines
        subprocess.run(["scontrol", "release", jobs[0]], check=True, timeout=deadline(30))
    finally:
        subprocess.run(["scancel", *jobs], timeout=deadline(30))


@pytest.mark.slurm
def test_submit_hold_then_status_and_watch_say_it_is_held_and_the_follow_hint_is_whole(env, tmp_path):
    """A real run submitted held on slurm-local: the follow hint's commands are each one line at 80 columns
    (was: rich folded `clusterctl logs RUN --follow` across two), status and watch say JobHeldUser."""
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    d = trainer_shards(tmp_path / "d")
    data = ("--set", f"data.shards={d / 'shards'}", "--set", f"data.tokenizer={d / 'tok.model'}")
    started: list[tuple[str, str]] = []  # (run id, job id), cancelled whatever happens
    watch = None
    try:
        r = run_cli("submit", "--profile", "slurm-local", *data, "--steps", "2", "--hold", env=env | {"COLUMNS": "80"})
        assert r.returncode == 0, r.stderr
        m = re.search(r"submitted (\S+) as job (\d+)", r.stdout)
        assert m, r.stdout
        run_id = m[1]
        started.append((run_id, m[2]))
        lines = r.stdout.splitlines()
        assert f"  follow   clusterctl status {run_id}" in lines, lines
        assert f"           clusterctl logs {run_id} --follow" in lines, lines
        (row,) = json.loads(run_cli("status", run_id, "--json", env=env, timeout=60).stdout)["runs"]
        assert row["state"] == "PENDING" and row["pending_reason"] == "JobHeldUser", row
        assert row["pending_detail"] == f"held by its user: scontrol release {m[2]}"
        watch = subprocess.Popen(
            [str(BIN / "clusterctl"), "watch", run_id, "--interval", "1"],
            env=os.environ | env,
            stdout=subprocess.PIPE,
            text=True,
        )
        first = watch.stdout.readline() if watch.stdout else ""  # not a terminal: plain lines
        assert first.startswith(f"{run_id} PENDING") and "| pending: JobHeldUser (held by its user" in first, first
    finally:
        if watch is not None:
            watch.kill()
            watch.wait(timeout=deadline(10))
        for run_id, job_id in started:
            run_cli("cancel", run_id, env=env, timeout=60)
            subprocess.run(["scancel", job_id], timeout=deadline(30))
