"""Aggregation of GPU-hours, energy and carbon on fixture data (pure functions)."""

from __future__ import annotations

import csv
import datetime as dt
import io
from types import SimpleNamespace as NS

import pytest

from clusterctl.runs.usage import (
    COLUMNS,
    aggregate,
    gpu_hours,
    group_key,
    parse_day,
    parse_energy_csv,
    to_csv,
    usage_for,
)
from vltrain.common.errors import UserError

HEADER = "timestamp,project_name,run_id,duration,emissions,energy_consumed,country_iso_code,pue\n"


def _csv(*rows):
    return HEADER + "".join(
        f"2026-11-01T00:00:{i:02d},p,r,{d},{co2},{kwh},FRA,1.2\n" for i, (d, co2, kwh) in enumerate(rows)
    )


def _ts(day: str) -> float:
    return dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp()


def _run(run_id, profile="a", user="ann", day="2026-11-01", gpus=8, estimate=None):
    return NS(
        run_id=run_id,
        name=run_id,
        profile=profile,
        user=user,
        created_at=_ts(day),
        gpus=gpus,
        executor="slurm",
        plan={"estimate": estimate} if estimate else {},
    )


def _job(alloc=None, elapsed=None, start=None, end=None):
    return NS(alloc_gpus=alloc, elapsed_s=elapsed, started_at=start, ended_at=end)


def test_energy_csv_takes_last_cumulative_row():
    r = parse_energy_csv(_csv((10, 0.001, 0.02), (20, 0.002, 0.04)), "node000", "job1-r0-1")
    assert (r.energy_kwh, r.co2_kg, r.duration_s, r.pue) == (0.04, 0.002, 20.0, 1.2)
    assert parse_energy_csv(HEADER, "n", "a") is None


def test_gpu_hours_prefers_sacct_and_says_so():
    assert gpu_hours(8, [_job(alloc=16, elapsed=3600)], now=0) == (16.0, "sacct")
    assert gpu_hours(8, [_job(start=0, end=1800)], now=0) == (4.0, "registry")
    hours, src = gpu_hours(8, [_job(alloc=16, elapsed=3600), _job(start=0, end=1800)], now=0)
    assert (hours, src) == (20.0, "registry+sacct")
    assert gpu_hours(8, [_job(start=100)], now=100 + 3600) == (8.0, "registry")  # running: until now
    assert gpu_hours(8, [], now=0) == (0.0, "none")


def test_requeued_attempts_sum():
    readings = [
        parse_energy_csv(_csv((60, 0.01, 0.2)), "node000", "job7-r0-1"),
        parse_energy_csv(_csv((30, 0.005, 0.1)), "node000", "job7-r1-2"),
        parse_energy_csv(_csv((30, 0.005, 0.1)), "node001", "job7-r1-2"),
    ]
    u = usage_for(_run("r1"), [_job(alloc=2, elapsed=90)], readings, now=0)
    assert u.energy_kwh == pytest.approx(0.4) and u.co2_kg == pytest.approx(0.02)
    assert u.intensity == pytest.approx(50.0)


@pytest.fixture
def usages():
    runs = [
        (
            _run("r1", "a100x64", "ann", "2026-10-30", estimate={"energy_kwh": 1.0, "co2_kg": 0.1}),
            [_job(alloc=64, elapsed=3600)],
            2.0,
            0.1,
        ),
        (_run("r2", "a100x64", "bob", "2026-11-01"), [_job(alloc=64, elapsed=1800)], 1.0, 0.05),
        (_run("r3", "local", "ann", "2026-11-01"), [_job(start=0, end=3600)], 0.0, 0.0),
    ]
    out = []
    for run, jobs, kwh, co2 in runs:
        readings = [parse_energy_csv(_csv((1, co2, kwh)), "node000", "a")] if kwh else []
        out.append(usage_for(run, jobs, readings, now=0))
    return out


@pytest.mark.parametrize(
    "by, expected",
    [
        ("run", {"r1": (1, 64.0, 2.0), "r2": (1, 32.0, 1.0), "r3": (1, 8.0, 0.0)}),
        ("profile", {"a100x64": (2, 96.0, 3.0), "local": (1, 8.0, 0.0)}),
        ("user", {"ann": (2, 72.0, 2.0), "bob": (1, 32.0, 1.0)}),
        ("day", {"2026-10-30": (1, 64.0, 2.0), "2026-11-01": (2, 40.0, 1.0)}),
        ("month", {"2026-10": (1, 64.0, 2.0), "2026-11": (2, 40.0, 1.0)}),
    ],
)
def test_aggregate_by_each_key(usages, by, expected):
    rows = aggregate(usages, by)
    got = {r["key"]: (r["runs"], r["gpu_hours"], r["energy_kwh"]) for r in rows}
    assert got == expected


def test_sources_and_estimates_are_reported(usages):
    rows = {r["key"]: r for r in aggregate(usages, "profile")}
    assert rows["a100x64"]["gpu_hours_source"] == "sacct"
    assert rows["local"]["gpu_hours_source"] == "registry"
    assert rows["a100x64"]["energy_source"] == "codecarbon" and rows["local"]["energy_source"] == "none"
    assert rows["a100x64"]["estimated_kwh"] == 1.0
    assert rows["a100x64"]["carbon_intensity_g_per_kwh"] == pytest.approx(50.0)


def test_csv_has_documented_columns(usages):
    text = to_csv(aggregate(usages, "run"))
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames) == COLUMNS
    assert len(list(reader)) == 3


def test_bad_by_and_dates():
    with pytest.raises(UserError, match="--by: 'week'"):
        group_key(None, "week")
    with pytest.raises(UserError, match="--since: 'yesterday' is not a date"):
        parse_day("yesterday", "--since")
    assert parse_day("2026-11-01", "--since") == _ts("2026-11-01")
