"""Unattended recovery on the real local Slurm cluster (issue 27 points 1 and 6): one rank of a 2-node
run is SIGKILLed and then no clusterctl process runs until the end. The attempt's follow-up job
(afternotok) retries it away from the killed rank's node, the retry resumes to the uninterrupted
run's final loss, no follow-up is left queued, and the registry's events follow the recovery
timeline docs/reliability.md states. Marked slurm + slow; skipped when the cluster is not up."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    cancel_slurm_jobs_under,
    deadline,
    run_cli,
    sbatch_job,
    slurm_rank_processes,
    slurm_up,
    tiny_data,
    wait_until,
)

DOC = REPO / "docs" / "reliability.md"
TIMELINE = "## When a node dies at 3 am: the recovery timeline"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def timeline_events() -> list[str]:
    """The registry events the doc's timeline names, in its order: each "event `NAME`" of the section."""
    text = DOC.read_text()
    section = text[text.index(TIMELINE) + len(TIMELINE) :]
    end = section.find("\n## ")
    return re.findall(r"\bevent `([a-z_]+)`", section if end < 0 else section[:end])


def test_the_doc_states_a_timeline_of_registry_events():
    named = timeline_events()
    assert named[:2] == ["submit", "followup"] and "retry" in named and named[-1] == "followup", named


def _registry_rows(db: Path, sql: str, *args: object) -> list[tuple]:
    """Read the registry as a bystander would (read-only, no clusterctl): nothing acts on the run."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _rank(job_id: str, rank: int) -> tuple[list[int], str | None]:
    """The processes of one rank of a Slurm job on this machine, and the node Slurm ran it on."""
    found = slurm_rank_processes(rank, SLURM_JOB_ID=job_id)
    return [pid for pid, _ in found], next(
        (env["SLURMD_NODENAME"] for _, env in found if "SLURMD_NODENAME" in env), None
    )


def _acct(job_id: str) -> tuple[str, str]:
    """(state, node list) of a job as accounting has it; ("", "") until it does."""
    r = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,NodeList"],
        capture_output=True,
        text=True,
        timeout=deadline(30),
    )
    rows = [line.split("|") for line in r.stdout.splitlines() if "|" in line]
    return (rows[-1][0].split()[0].rstrip("+"), rows[-1][1]) if rows else ("", "")


def _queued(job_ids: list[str]) -> list[str]:
    r = subprocess.run(["squeue", "-h", "-o", "%i|%T"], capture_output=True, text=True, timeout=deadline(30))
    return [line for line in r.stdout.splitlines() if line.split("|")[0] in job_ids]


def _final_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = {r["step"]: r for r in rows}  # the retry logs the steps after its checkpoint again
    return last[max(last)]["loss"]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_killed_rank_is_retried_with_no_one_watching_away_from_its_node(tmp_path):
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    data, tok = tiny_data(tmp_path)
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 16\nprecision = "fp32"\nlog_every = 1\n'
        f'checkpoint_every = 4\nkeep_checkpoints = 2\n[data]\nshards = "{data}"\ntokenizer = "{tok}"\n'
        f"[optim]\nlr = 1e-3\nwarmup_steps = 4\n"
    )
    db = tmp_path / "reg.db"
    env = {"CLUSTERCTL_REGISTRY": str(db), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
    args = ["--profile", "slurm-local", "--config", str(cfg), "--max-retries", "2", "--json"]
    try:
        r = run_cli("submit", *args, "--name", "unattended", env=env)
        assert r.returncode == 0, r.stderr
        sub = json.loads(r.stdout)
        run_id, first, run_dir = sub["run_id"], sub["job_id"], Path(sub["run_dir"])
        # from here on no clusterctl process runs until the run has ended
        wait_until(lambda: list((run_dir / "checkpoints").glob("step_*")), 300, "a complete checkpoint")
        pids, node = wait_until(lambda: (got := _rank(first, 1))[0] and got, 60, "rank 1 running here")
        assert node in ("a1", "a2", "a3"), node
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

        def retry_job() -> str | None:
            rows = _registry_rows(db, "SELECT job_id FROM jobs WHERE run_id = ? AND kind = 'retry'", run_id)
            return rows[-1][0] if rows else None

        retry = wait_until(retry_job, 300, "the follow-up job's retry in the registry")
        state, nodes = wait_until(lambda: (a := _acct(retry))[0] in ENDED and a, 300, f"the retry {retry} to end")
        assert state == "COMPLETED", (state, nodes)
        assert _acct(first)[0] == "FAILED"
        script = (run_dir / "submitit" / retry / f"{retry}_submission.sh").read_text()
        assert f"#SBATCH --exclude={node}\n" in script, script
        assert node not in nodes, (node, nodes)  # Slurm honoured it (a node list such as "a[1,3]")
        rows = _registry_rows(db, "SELECT kind, data FROM events WHERE run_id = ? ORDER BY id", run_id)
        events = [(kind, json.loads(data)) for kind, data in rows]
        (ev,) = [d for k, d in events if k == "retry"]
        assert ev["failed_job"] == first and ev["job_id"] == retry, ev
        assert ev["failed_nodes"] == [node] and ev["excluded"] == [node], ev
        assert ev["reason"].startswith("killed by signal 9") and f"srun: {node}: Killed" in ev["nodes_how"], ev
        followups = [d for k, d in events if k == "followup"]
        assert [f["after"] for f in followups] == [first, retry], followups
        # the first follow-up ran (and retried); Slurm cancelled the last one when the retry completed
        fids = [f["job_id"] for f in followups]
        wait_until(lambda: not _queued(fids), 60, lambda: f"follow-ups still queued: {_queued(fids)}")
        assert [_acct(f)[0] for f in fids] == ["COMPLETED", "CANCELLED"]
        # the timeline docs/reliability.md states is what the registry recorded, in that order
        named = timeline_events()
        assert [k for k, _ in events if k in named] == named, events
        # only now a command: status says COMPLETED, with the node the retry excluded
        r = run_cli("status", run_id, "--json", env=env)
        assert r.returncode == 0, r.stderr
        (row,) = json.loads(r.stdout)["runs"]
        assert row["state"] == "COMPLETED" and row["job_ids"] == [first, retry], row
        assert row.get("excluded_nodes") == [node], row
        # the same final loss as an uninterrupted run of the same config on the same profile
        r = run_cli("submit", *args, "--name", "reference", env=env)
        assert r.returncode == 0, r.stderr
        ref = json.loads(r.stdout)
        wait_until(lambda: _acct(ref["job_id"])[0] in ENDED, 300, "the uninterrupted reference run")
        assert _acct(ref["job_id"])[0] == "COMPLETED"
        assert _final_loss(run_dir) == _final_loss(Path(ref["run_dir"]))
    finally:
        cancel_slurm_jobs_under(tmp_path)


@pytest.mark.slurm
@pytest.mark.slow
def test_cancel_stops_the_pending_followup_before_the_attempt(tmp_path):
    """A cancelled attempt is "not ok" to Slurm: were the follow-up still queued it would start (and
    find nothing to retry). `clusterctl cancel` scancels it first, so it never runs."""
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    data, tok = tiny_data(tmp_path, n=320)
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'model = "tiny"\nsteps = 4\n[data]\nshards = "{data}"\ntokenizer = "{tok}"\n')
    db = tmp_path / "reg.db"
    env = {"CLUSTERCTL_REGISTRY": str(db), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
    try:
        r = run_cli("submit", "--profile", "slurm-local", "--config", str(cfg), "--hold", "--json", env=env)
        assert r.returncode == 0, r.stderr
        sub = json.loads(r.stdout)
        rows = _registry_rows(db, "SELECT data FROM events WHERE run_id = ? AND kind = 'followup'", sub["run_id"])
        (fu,) = [json.loads(d) for (d,) in rows]
        assert fu["after"] == sub["job_id"] and _queued([fu["job_id"]]), fu
        r = run_cli("cancel", sub["run_id"], env=env)
        assert r.returncode == 0, r.stderr
        jobs = [sub["job_id"], fu["job_id"]]
        wait_until(lambda: not _queued(jobs), 60, lambda: f"still queued: {_queued(jobs)}")
        wait_until(lambda: _acct(fu["job_id"])[0] == "CANCELLED", 60, "the follow-up cancelled, never run")
        fid = fu["job_id"]
        assert not (Path(sub["run_dir"]) / "side" / "followup" / fid / f"{fid}_0_log.out").exists()  # never ran
    finally:
        cancel_slurm_jobs_under(tmp_path)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_requeued_attempt_does_not_start_its_followup():
    """What the follow-up relies on (Slurm 22.05.8): a job requeued while it runs (submitit's requeue on
    time-out or preemption is `scontrol requeue`) has not ended, so an afternotok job stays pending."""
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    attempt = sbatch_job("--requeue", "-p", "debug", "--wrap", "sleep 300")
    follow = sbatch_job(
        "-p", "debug", f"--dependency=afternotok:{attempt}", "--kill-on-invalid-dep=yes", "--wrap", "true"
    )
    try:
        wait_until(lambda: f"{attempt}|RUNNING" in _queued([attempt]), 60, "the attempt running")
        subprocess.run(["scontrol", "requeue", attempt], check=True, timeout=deadline(30))
        wait_until(lambda: f"{attempt}|PENDING" in _queued([attempt]), 60, "the attempt pending again")
        for _ in range(3):  # a few scheduling passes later: still waiting on its dependency
            assert _queued([follow]) == [f"{follow}|PENDING"], _queued([follow])
            time.sleep(1)
    finally:
        subprocess.run(["scancel", follow], timeout=deadline(30))
        subprocess.run(["scancel", attempt], timeout=deadline(30))
