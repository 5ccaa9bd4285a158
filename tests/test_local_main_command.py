"""The README's main command, shortened: `clusterctl submit --profile local --wait` trains for real
through submitit's local executor, then `report energy` shows that run's measured kWh and CO2 and
`report gpu-hours --by profile` its GPU-hours with their source (what `make demo` runs)."""

from __future__ import annotations

import json
import tomllib

import pytest

from tests.conftest import run_cli, tiny_data

pytestmark = pytest.mark.slow


def test_submit_local_wait_then_energy_and_gpu_hour_reports(tmp_path):
    data, tok = tiny_data(tmp_path, n=600)
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 20\nprecision = "fp32"\nlog_every = 5\n'
        f'checkpoint_every = 10\n[data]\nshards = "{data}"\ntokenizer = "{tok}"\n'
    )
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}

    shown = run_cli("submit", "--profile", "local", "--config", str(cfg), "--dry-run", "--json", env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["checks"] == {"problems": [], "warnings": []}
    r = run_cli("submit", "--profile", "local", "--config", str(cfg), "--name", "demo", "--wait", env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 20/20" in r.stdout and "COMPLETED" in r.stdout
    # the run directory keeps the resolved config the dry run showed, and the trainer ran exactly it
    (run_dir,) = (tmp_path / "runs").iterdir()
    kept = tomllib.loads((run_dir / "config.toml").read_text())
    assert kept == {k: v for k, v in json.loads(shown.stdout)["config"].items() if v is not None}

    r = run_cli("report", "energy", "--json", env=env)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    assert row["key"].startswith("demo-") and row["energy_source"] == "codecarbon"
    assert row["energy_kwh"] > 0 and row["co2_kg"] > 0 and row["estimated_kwh"] > 0
    text = run_cli("report", "energy", env=env)
    assert text.returncode == 0 and "energy" in text.stdout and "CO2eq" in text.stdout and "demo-" in text.stdout
    assert "…" not in text.stdout  # no number cut to fit

    r = run_cli("report", "gpu-hours", "--by", "profile", "--json", env=env)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    assert row["key"] == "local" and row["gpu_hours"] > 0 and row["gpu_hours_source"] == "registry"
    text = run_cli("report", "gpu-hours", "--by", "profile", env=env)
    assert text.returncode == 0 and "registry" in text.stdout and "local" in text.stdout
