"""`clusterctl watch` asks Slurm once per refresh for all the runs it shows, and sacct only when a job
ended; Slurm is replaced by logging PATH shims (as in test_status.py), so this runs anywhere."""

from __future__ import annotations

import json

from clusterctl.runs.registry import Registry
from tests.conftest import run_cli
from tests.test_status import add, calls, shim

RUNNING_ROW = "{id}|RUNNING|0:1$n|2024-05-01T10:00:00|a1|cpu=1,node=1,gres/gpu=1|0|None|"  # elapsed grows per call
ACCT_ROW = "{id}|COMPLETED|00:01:00|60|2024-05-01T10:00:00|2024-05-01T10:01:00|billing=1,cpu=1,gres/gpu=1,node=1|a1|0:0"


def test_one_squeue_per_refresh_for_all_runs_and_sacct_once_at_the_end(tmp_path):
    reg = Registry(tmp_path / "reg.db")
    for run_id, job in (("alpha-1", "301"), ("beta-2", "302")):
        run_dir = tmp_path / "runs" / run_id
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 5 - s / 10}) + "\n" for s in range(1, 21))
        )
        add(reg, run_id, [job], state="RUNNING", run_dir=run_dir, total_steps=20)
    reg.close()
    bin_dir = tmp_path / "bin"
    # squeue lists both jobs running for its first three calls, then neither (they ended)
    rows = "\n".join(RUNNING_ROW.format(id=j) for j in ("301", "302"))
    shim(
        bin_dir, "squeue", f'n=$(/bin/grep -c "^squeue" "$SHIM_LOG"); [ "$n" -le 3 ] && printf "%s\\n" "{rows}"; exit 0'
    )
    acct = "\n".join(ACCT_ROW.format(id=j) for j in ("301", "302"))
    shim(bin_dir, "sacct", f'printf "%s\\n" "{acct}"')
    env = {
        "CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"),
        "PATH": str(bin_dir),
        "SHIM_LOG": str(tmp_path / "calls.log"),
    }

    r = run_cli("watch", "alpha-1", "beta-2", "--interval", "0.2", env=env, timeout=60)

    assert r.returncode == 0, r.stderr
    assert "2 run(s) finished" in r.stdout and r.stdout.count("COMPLETED") >= 2
    log = calls(tmp_path)
    squeues = [c for c in log if c.startswith("squeue")]
    assert len(squeues) == 4  # three refreshes while running, one that saw them gone: one call each
    assert all(c.split("-j ")[1].split()[0] == "301,302" for c in squeues)  # both runs in one call
    (sacct,) = [c for c in log if c.startswith("sacct")]  # only once the jobs had left the queue
    assert log.index(sacct) == len(log) - 1 and "-j 301,302" in sacct
    # without a terminal: a line when a run moves (here: RUNNING, then COMPLETED), not one per refresh
    # although its GPU-hours grew on every refresh
    for run_id in ("alpha-1", "beta-2"):
        states = [line.split()[1] for line in r.stdout.splitlines() if line.startswith(f"{run_id} ")]
        assert states == ["RUNNING", "COMPLETED"], r.stdout
