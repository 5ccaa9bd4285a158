"""clusterctl against the real local Slurm cluster (scripts/slurm-local.sh, started by `make test`):
a 2-node tiny training run, a preemption requeue that resumes exactly, cancel, a bad partition,
and 16 concurrent CLI processes. Marked slurm + slow; they skip when the cluster is not up."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clusterctl.runs.registry import Registry
from tests.conftest import REPO, deadline, run_cli, slurm_rank_processes, slurm_up, tiny_data

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    root = tmp_path_factory.mktemp("e2e")
    data, tok = tiny_data(root)
    cfg = root / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 24\nprecision = "fp32"\nlog_every = 1\n'
        f'checkpoint_every = 4\nkeep_checkpoints = 2\n[data]\nshards = "{data}"\ntokenizer = "{tok}"\n'
        f"[optim]\nlr = 1e-3\nwarmup_steps = 4\n"
    )
    env = {"CLUSTERCTL_REGISTRY": str(root / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(root / "runs")}
    return {"root": root, "cfg": cfg, "env": env}


def _submit(world, name, *extra):
    r = run_cli(
        "submit",
        "--profile",
        "slurm-local",
        "--config",
        str(world["cfg"]),
        "--name",
        name,
        "--json",
        *extra,
        env=world["env"],
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _status(world, run_id):
    r = run_cli("status", run_id, "--json", env=world["env"])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["runs"][0]


def _wait(
    world,
    run_id,
    until=lambda row: row["state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
    timeout=420,
):
    end = time.monotonic() + deadline(timeout)
    while time.monotonic() < end:
        row = _status(world, run_id)
        if until(row):
            return row
        time.sleep(2)
    pytest.fail(f"{run_id}: still {row['state']} after {deadline(timeout):g} s")


def _final_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = {r["step"]: r for r in rows}  # a requeued run logs the steps after its checkpoint twice
    return last[max(last)]["loss"]


@pytest.fixture(scope="module")
def completed(world):
    sub = _submit(world, "e2e2n")
    row = _wait(world, sub["run_id"])
    return sub, row


def test_two_node_training_completes(world, completed):
    sub, row = completed
    assert row["state"] == "COMPLETED", row
    assert row["job_id"] == sub["job_id"] and row["step"] == 24
    assert row["alloc_gpus"] == 2 and row["gpu_hours"] > 0
    for rank in (0, 1):
        r = run_cli("logs", sub["run_id"], "--rank", str(rank), env=world["env"])
        assert r.returncode == 0 and f"global_rank={rank}(2)" in r.stdout, r.stdout + r.stderr
    r0 = run_cli("logs", sub["run_id"], env=world["env"]).stdout
    assert "2 rank(s)" in r0 and "step 24/24" in r0


def test_two_node_run_is_measured_once_per_node_and_accounted_by_sacct(world, completed):
    sub, _ = completed
    files = sorted(p.name.split("-")[0] for p in Path(sub["run_dir"], "energy").glob("*.csv"))
    assert files == ["node000", "node001"]  # one tracker per node, on the node's local rank 0
    r = run_cli("report", "energy", "--run", sub["run_id"], "--json", env=world["env"])
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    assert row["energy_kwh"] > 0 and row["co2_kg"] > 0 and row["energy_source"] == "codecarbon"
    assert row["gpu_hours_source"] == "sacct" and row["gpu_hours"] > 0
    assert row["estimated_kwh"] is not None  # the plan's estimate beside the measured figure


def test_preemption_requeues_and_resumes_exactly(world, completed):
    sub = _submit(world, "e2epre")
    run_dir = Path(sub["run_dir"])
    end = time.monotonic() + deadline(300)
    while not list((run_dir / "checkpoints").glob("step_*")):  # a complete checkpoint exists
        assert time.monotonic() < end, "no checkpoint"
        time.sleep(1)
    subprocess.run(["scancel", "--signal=USR2", sub["job_id"]], check=True, timeout=deadline(30))
    row = _wait(world, sub["run_id"])
    assert row["state"] == "COMPLETED" and row["requeues"] >= 1, row
    events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "preempt" in events or "timeout" in events
    assert "resume" in events
    assert _final_loss(run_dir) == _final_loss(Path(completed[0]["run_dir"]))  # same as the uninterrupted run


def _rank_pids(job_id: str, rank: int) -> list[int]:
    """The processes of one rank of a Slurm job on this machine (the local cluster's nodes are here)."""
    return [pid for pid, _ in slurm_rank_processes(rank, SLURM_JOB_ID=job_id)]


def test_sigkill_of_one_rank_is_retried_and_ends_with_the_same_loss(world, completed):
    """One rank SIGKILLed (an OOM killer, a sick node): srun ends the step (--kill-on-bad-exit), Slurm
    reports FAILED 9:0, clusterctl retries it by itself (a status refresh reconciles), and the retry
    resumes from the newest checkpoint to the uninterrupted run's final loss."""
    import os
    import signal

    sub = _submit(world, "e2ekill")
    run_dir = Path(sub["run_dir"])
    end = time.monotonic() + deadline(300)
    while not list((run_dir / "checkpoints").glob("step_*")):  # a complete checkpoint exists
        assert time.monotonic() < end, "no checkpoint"
        time.sleep(1)
    pids = _rank_pids(sub["job_id"], 1)
    assert pids, "rank 1 of the job is not running here"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    row = _wait(
        world,
        sub["run_id"],
        until=lambda r: (
            r["state"] == "COMPLETED"
            or (r["state"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") and len(r["job_ids"]) > 1)
        ),
        timeout=420,
    )
    assert row["state"] == "COMPLETED" and len(row["job_ids"]) == 2, row
    jobs = Registry(Path(world["env"]["CLUSTERCTL_REGISTRY"])).jobs(sub["run_id"])
    assert jobs[0].state == "FAILED" and jobs[1].kind == "retry", jobs
    assert _final_loss(run_dir) == _final_loss(Path(completed[0]["run_dir"]))


def test_cancel_and_bad_partition(world, tmp_path):
    sub = _submit(world, "e2ecancel", "--hold")
    r = run_cli("cancel", sub["run_id"], env=world["env"])
    assert r.returncode == 0, r.stderr
    assert _wait(world, sub["run_id"], timeout=60)["state"] == "CANCELLED"
    prof = tmp_path / "badpart.toml"
    prof.write_text(
        (REPO / "cluster_profiles" / "slurm-local.toml")
        .read_text()
        .replace('name = "slurm-local"', 'name = "badpart"')
        .replace('partition = "debug"', 'partition = "nope"')
    )
    r = run_cli("submit", "--profile", str(prof), "--config", str(world["cfg"]), env=world["env"])
    # refused before sbatch: preflight asks the scheduler which partitions exist (issue 25 point 5)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "slurm.partition" in r.stderr, r.stderr
    assert "nope" in r.stderr and "debug" in r.stderr, r.stderr  # what was given and what is allowed
    assert r.stderr.strip().count("\n") == 0


def test_sixteen_concurrent_cli_processes(world):
    def work(i):
        if i % 2:
            return run_cli("status", "--all", "--json", env=world["env"])
        return run_cli(
            "submit",
            "--profile",
            "slurm-local",
            "--config",
            str(world["cfg"]),
            "--name",
            f"cc{i}",
            "--hold",
            "--json",
            env=world["env"],
        )

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(work, range(16)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    subs = [json.loads(r.stdout) for i, r in enumerate(results) if i % 2 == 0]
    for r in results[1::2]:
        json.loads(r.stdout)  # every status answer is whole JSON
    reg = Registry(Path(world["env"]["CLUSTERCTL_REGISTRY"]))
    try:
        for s in subs:
            run = reg.get_run(s["run_id"])
            jobs = reg.jobs(run.run_id)
            assert [j.job_id for j in jobs] == [s["job_id"]]
            assert Path(run.run_dir, "config.toml").exists()
    finally:  # the follow-ups first: a cancelled attempt would start its follow-up (afternotok)
        followups = [e["data"]["job_id"] for s in subs for e in reg.events(s["run_id"]) if e["kind"] == "followup"]
        subprocess.run(["scancel", *followups], timeout=deadline(30))
        subprocess.run(["scancel", *[s["job_id"] for s in subs]], timeout=deadline(30))
