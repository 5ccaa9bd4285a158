"""`clusterctl report` end to end over a fixture registry and run directories (no Slurm, no training)."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest
from PIL import Image

from clusterctl.runs.registry import Registry
from clusterctl.runs.usage import COLUMNS, merge_timelines
from clusterctl.specs import RunRecord
from tests.conftest import REPO, run_cli

HEADER = "timestamp,project_name,run_id,duration,emissions,energy_consumed,country_iso_code,pue\n"
DAY = 86400.0


@pytest.fixture
def world(tmp_path):
    """Three finished runs on two profiles: one requeued (two attempts on two nodes), one with sacct data."""
    reg = Registry(tmp_path / "reg.db")
    t0 = time.time() - 3 * DAY
    specs = [("alpha", "a100x64", 0.0, 2), ("beta", "a100x64", DAY, 1), ("gamma", "slurm-local", 2 * DAY, 1)]
    for i, (name, profile, offset, attempts) in enumerate(specs):
        run_dir = tmp_path / "runs" / name
        (run_dir / "energy").mkdir(parents=True)
        created = t0 + offset
        reg.add_run(
            RunRecord(
                name,
                name,
                profile,
                "slurm",
                str(run_dir),
                created,
                "ann" if i < 2 else "bob",
                16,
                10,
                "COMPLETED",
                plan={"estimate": {"energy_kwh": 3.0, "co2_kg": 0.15}},
            )
        )
        for a in range(attempts):
            job = reg.add_job(name, str(100 + 10 * i + a), "submit", submitted_at=created + a * 100)
            fields = {"state": "COMPLETED", "started_at": created + a * 100, "ended_at": created + a * 100 + 1800}
            if name != "beta":  # beta has no accounting data: GPU-hours from registry times
                fields |= {"alloc_gpus": 16, "elapsed_s": 1800.0}
            reg.update_job(job.job_id, **fields)
            for node in range(2):
                tag = f"node{node:03d}-job{job.job_id}-r0-1"
                (run_dir / "energy" / f"{tag}.csv").write_text(HEADER + "x,p,r,1800,0.05,1.0,FRA,1.2\n")
                lines = [
                    json.dumps(
                        {
                            "time": created + a * 100 + s,
                            "energy_kwh": s / 1800,
                            "co2_kg": 0.05 * s / 1800,
                            "duration_s": s,
                        }
                    )
                    for s in (600, 1200, 1800)
                ]
                (run_dir / "energy" / f"{tag}.timeline.jsonl").write_text("\n".join(lines) + "\n")
        (run_dir / "metrics.jsonl").write_text(
            "".join(
                json.dumps(
                    {"step": s, "loss": 9 - s * 0.5, "itc": 3 - s * 0.1, "mlm": 4 - s * 0.2, "caption": 2 - s * 0.1}
                )
                + "\n"
                for s in range(1, 11)
            )
            + '{"step": 11, "lo'
        )  # last line cut by a kill
    return {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "PATH": "/nonexistent"}  # no Slurm clients at all


def _json(*args, env):
    r = run_cli("report", *args, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_energy_by_run_sums_nodes_and_attempts(world):
    d = _json("energy", env=world)
    assert d["columns"] == list(COLUMNS)
    rows = {r["key"]: r for r in d["rows"]}
    assert rows["alpha"]["energy_kwh"] == pytest.approx(4.0)  # 2 attempts x 2 nodes x 1 kWh
    assert rows["beta"]["energy_kwh"] == pytest.approx(2.0)
    assert rows["alpha"]["co2_kg"] == pytest.approx(0.2)
    assert rows["alpha"]["carbon_intensity_g_per_kwh"] == pytest.approx(50.0)
    assert rows["alpha"]["estimated_kwh"] == 3.0 and rows["alpha"]["pue"] == 1.2
    assert rows["alpha"]["energy_source"] == "codecarbon"


def test_gpu_hours_by_profile_with_sources(world):
    d = _json("gpu-hours", "--by", "profile", env=world)
    rows = {r["key"]: r for r in d["rows"]}
    assert rows["a100x64"]["gpu_hours"] == pytest.approx(16 * 0.5 * 3)  # alpha 2 jobs + beta 1 job, 30 min each
    assert rows["a100x64"]["gpu_hours_source"] == "registry+sacct"
    assert rows["slurm-local"]["gpu_hours_source"] == "sacct"


@pytest.mark.parametrize(
    "by, keys", [("user", {"ann", "bob"}), ("profile", {"a100x64", "slurm-local"}), ("run", {"alpha", "beta", "gamma"})]
)
def test_by(world, by, keys):
    assert {r["key"] for r in _json("energy", "--by", by, env=world)["rows"]} == keys


def test_day_and_month_and_filters(world):
    days = _json("energy", "--by", "day", env=world)["rows"]
    assert len(days) == 3 and sum(r["runs"] for r in days) == 3
    months = _json("energy", "--by", "month", env=world)["rows"]
    assert sum(r["runs"] for r in months) == 3 and len(months) in (1, 2)
    only = _json("energy", "--profile", "slurm-local", env=world)["rows"]
    assert [r["key"] for r in only] == ["gamma"]
    one = _json("energy", "--run", "beta", env=world)["rows"]
    assert [r["key"] for r in one] == ["beta"]
    future = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 2 * DAY))
    assert _json("energy", "--since", future, env=world)["rows"] == []


def test_csv_columns(world):
    r = run_cli("report", "energy", "--csv", env=world)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert tuple(rows[0].keys()) == COLUMNS and len(rows) == 3
    doc = (REPO / "docs" / "reports.md").read_text()
    for col in COLUMNS:
        assert f"`{col}`" in doc, f"column {col} is not documented in docs/reports.md"


def _valid_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert w > 300 and h > 200
        assert len(im.convert("L").getcolors(maxcolors=1 << 16) or range(11)) > 10  # not a blank canvas


def test_energy_plot(world, tmp_path):
    out = tmp_path / "energy.png"
    r = run_cli("report", "energy", "--plot", str(out), env=world)
    assert r.returncode == 0, r.stderr
    _valid_png(out)


def test_loss_report_and_plot(world, tmp_path):
    out = tmp_path / "loss.png"
    r = run_cli("report", "loss", "alpha", "--plot", str(out), env=world)
    assert r.returncode == 0, r.stderr
    assert "loss" in r.stdout and "10 logged steps" in r.stdout  # the cut line is skipped
    _valid_png(out)


@pytest.mark.parametrize(
    "args, msg",
    [
        (("energy", "--by", "week"), "error: --by: 'week' is not known; allowed: run, profile, day, month, user"),
        (("energy", "--since", "yesterday"), "error: --since: 'yesterday' is not a date"),
        (("energy", "--plot", "out.jpg"), "error: --plot: 'out.jpg' is not a .png file"),
        (("energy", "--plot", "/no/such/dir/x.png"), "error: --plot: directory '/no/such/dir' does not exist"),
        (("energy", "--json", "--csv"), "error: --csv: given together with --json"),
        (("loss", "ghost"), "error: "),
    ],
)
def test_bad_input(world, args, msg):
    r = run_cli("report", *args, env=world)
    assert r.returncode == 2 and r.stderr.startswith(msg), r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_timelines_of_attempts_add_up():
    a = [(0.0, 1.0, 0.1), (10.0, 2.0, 0.2)]
    b = [(20.0, 0.5, 0.05), (30.0, 1.5, 0.15)]  # a requeued attempt starts again from zero
    merged = merge_timelines([a, b])
    assert merged[-1] == pytest.approx((30.0, 3.5, 0.35))
    assert [m[1] for m in merged] == sorted(m[1] for m in merged)  # cumulative never goes down


def test_text_table_fits_80_columns_and_never_cuts_a_number(world):
    r = run_cli("report", "energy", env=world | {"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in r.stdout, r.stdout
    head = " ".join(lines[:5])
    assert "kWh" in head and "CO2eq" in head and " g " in head + " "  # one unit per column: 0.2 kg reads 200 g
    alpha = next(line for line in lines if line.lstrip().startswith("alpha")).split()
    assert alpha[1:] == [
        "16",
        "sacct",
        "4",
        "200",
        "3",
        "150",
    ]  # 2 x 16 GPUs x 30 min; GPU-h, source, kWh, g CO2eq, plan kWh, plan g
    assert "times" in next(line for line in lines if line.lstrip().startswith("beta"))  # registry start/end
    assert "grid 50 g/kWh" in r.stdout and "PUE 1.2" in r.stdout  # the same on every row: said once, below


def test_units_follow_the_largest_value():
    from clusterctl.render.units import CO2_UNITS, ENERGY_UNITS, pick_unit

    assert pick_unit([0.0021, None], ENERGY_UNITS) == (1e3, "Wh")
    assert pick_unit([4.0, 0.5], ENERGY_UNITS) == (1.0, "kWh")
    assert pick_unit([13_200.0], ENERGY_UNITS) == (1e-3, "MWh")
    assert pick_unit([0.2], CO2_UNITS) == (1e3, "g") and pick_unit([750.0, 2400.0], CO2_UNITS) == (1e-3, "t")
    assert pick_unit([], CO2_UNITS) == (1e3, "g")
