"""Energy measured for real by the trainer (codecarbon on this CPU box), then reported by clusterctl:
a run killed with SIGKILL keeps the energy of its last flush, a resumed attempt writes its own file
instead of overwriting the first, and `clusterctl report energy` sums both attempts.

The one-tracker-per-node rule with two ranks on one node is checked in test_trainer_run.py
(the submitit preemption test), where each timeline line names the rank that measured."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from clusterctl.runs.registry import Registry
from clusterctl.specs import RunRecord
from tests.conftest import BIN, REPO, deadline, run_cli
from tests.test_trainer_run import data, write_config  # noqa: F401  (module fixture reused)

pytestmark = pytest.mark.slow
ENV = {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "VLTRAIN_COUNTRY": "FRA",
    "VLTRAIN_PUE": "1.2",
    "VLTRAIN_ENERGY_FLUSH_S": "0.5",
}


def _energy_kwh(path: Path) -> float:
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return float(rows[-1]["energy_consumed"]) if rows else 0.0


def _train_until_energy_then_kill(cfg: Path, run: Path, known: set[Path]) -> Path:
    """Start `vltrain train`, wait until this attempt's tracker file holds a non-zero total and the run
    has a checkpoint to resume from, then SIGKILL it (no handler runs, no final flush)."""
    proc = subprocess.Popen(
        [str(BIN / "vltrain"), "train", "--config", str(cfg), "--run-dir", str(run)],
        cwd=REPO,
        env=os.environ | ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        end = time.monotonic() + deadline(240)
        while True:
            assert proc.poll() is None, f"the run ended early: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < end, f"no energy flushed within {deadline(240):g} s"
            new = (
                [p for p in (run / "energy").glob("node000-*.csv") if p not in known]
                if (run / "energy").exists()
                else []
            )
            if new and _energy_kwh(new[0]) > 0 and list((run / "checkpoints").glob("step_*")):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=deadline(30))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "[codecarbon" not in err and "codecarbon" not in err.lower(), err[-2000:]  # its logging kept quiet
    return new[0]


def test_killed_attempts_keep_their_energy_and_the_report_sums_them(data, tmp_path):  # noqa: F811
    cfg = write_config(tmp_path / "cfg.toml", data, steps=100_000, checkpoint_every=1, precision="fp32")
    run = tmp_path / "run"
    first = _train_until_energy_then_kill(cfg, run, set())
    kwh_first = _energy_kwh(first)
    second = _train_until_energy_then_kill(cfg, run, {first})  # resumes from the checkpoint: a new attempt
    assert _energy_kwh(first) == kwh_first, "the second attempt changed the first attempt's file"
    files = sorted((run / "energy").glob("*.csv"))
    assert files == sorted([first, second])  # one node, two attempts: two files, none overwritten
    timeline = [json.loads(line) for line in first.with_suffix(".timeline.jsonl").read_text().splitlines()]
    assert timeline and {t["rank"] for t in timeline} == {0}
    assert [t["energy_kwh"] for t in timeline] == sorted(t["energy_kwh"] for t in timeline)  # cumulative

    reg = Registry(tmp_path / "reg.db")
    reg.add_run(
        RunRecord(
            "killed-1",
            "killed",
            "local",
            "local",
            str(run),
            time.time() - 60,
            "ann",
            1,
            100_000,
            "FAILED",
            plan={"estimate": {"energy_kwh": 1.0, "co2_kg": 0.1}},
        )
    )
    reg.close()
    r = run_cli("report", "energy", "--run", "killed", "--json", env={"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db")})
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    total = kwh_first + _energy_kwh(second)
    assert row["energy_kwh"] == pytest.approx(total, abs=1e-9) and total > kwh_first > 0  # report rounds to 1e-9 kWh
    assert row["co2_kg"] > 0 and row["pue"] == pytest.approx(1.2) and row["energy_source"] == "codecarbon"
