"""Reports and `status --all` over a generated 10,000-run registry: output correctness (sums, groups,
filters, JSON), the registry's per-run summaries (computed once, summed by SQL, invalidated when a
run's rows or files change) — not time (bench/bench_cli.py measures that)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import time
from collections import defaultdict

import pytest

from clusterctl.runs.registry import SCHEMA_VERSION, Registry
from clusterctl.specs import JobRecord, RunRecord
from tests.conftest import run_cli

N = 10_000
ACTIVE = 20  # the newest runs are running; the others ended long ago (settled)
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()  # 10,000 runs 10 min apart: January to March
PROFILES = ("a100x64", "a100x32", "h100x128", "slurm-local")
USERS = ("ann", "bob", "cyd")
FINALS = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
HEADER = "timestamp,project_name,run_id,duration,emissions,energy_consumed,country_iso_code,pue\n"


def expected_run(i: int) -> dict:
    """What the generator gives run i (finished runs only): the figures a report must show."""
    measured = i % 10 == 0
    return {
        "key": f"r{i:05d}",
        "profile": PROFILES[i % 4],
        "user": USERS[i % 3],
        "created": T0 + i * 600,
        "gpu_hours": 8.0,  # 8 GPUs x 1 h, from sacct or from the registry's start/end
        "source": "sacct" if i % 3 else "registry",
        "energy_kwh": 1.0 + (i % 7) * 0.5 if measured else 0.0,
        "co2_kg": 0.05 if measured else 0.0,
        "requeues": 1 if i % 11 == 0 else 0,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """10,000 runs written in one transaction (Registry.insert_runs); a run directory with one
    codecarbon file for every tenth run, and metrics for the running ones."""
    root = tmp_path_factory.mktemp("scale")
    now = time.time()
    items = []
    for i in range(N):
        active = i >= N - ACTIVE
        run_dir = root / "runs" / f"r{i:05d}"
        created = T0 + i * 600 if not active else now - 3600 + i - N
        state = "RUNNING" if active else FINALS[i % 4]
        run = RunRecord(
            f"r{i:05d}",
            f"name{i % 100}",
            PROFILES[i % 4],
            "slurm",
            str(run_dir),
            created,
            USERS[i % 3],
            8,
            1000,
            state,
            config={"global_batch": 64},
            plan={"global_batch": 64, "estimate": {"energy_kwh": 2.0, "co2_kg": 0.1}},
        )
        job = JobRecord(str(100_000 + i), run.run_id, 1, "submit", created, state, started_at=created + 60)
        if not active:
            job.ended_at = created + 3660
            job.exit_code = "0:0"
            if i % 3:
                job.elapsed_s, job.alloc_gpus = 3600.0, 8
            job.requeues = 1 if i % 11 == 0 else 0
        items.append((run, [job]))
        if i % 10 == 0 and not active:
            e = expected_run(i)
            (run_dir / "energy").mkdir(parents=True)
            (run_dir / "energy" / f"node000-{job.job_id}-r0.csv").write_text(
                HEADER + f"t,p,r,3600,{e['co2_kg']},{e['energy_kwh']},FRA,1.2\n"
            )
        if active:
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.jsonl").write_text(
                "".join(
                    json.dumps({"step": s, "loss": 5.0 / (1 + s), "samples_per_s": 100.0}) + "\n" for s in range(50)
                )
            )
    db = root / "reg.db"
    reg = Registry(db)
    reg.insert_runs(items)
    reg.close()
    env = {"CLUSTERCTL_REGISTRY": str(db), "PATH": "/nonexistent", "COLUMNS": "200"}
    return {"root": root, "db": db, "env": env}


def _json(world, *args):
    r = run_cli(*args, "--json", env=world["env"], timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _finished(pred=lambda e: True):
    return [e for e in map(expected_run, range(N - ACTIVE)) if pred(e)]


def test_energy_by_run_every_row_right_and_second_call_from_sql_is_the_same(world):
    """The first report computes and stores 10,000 summaries; the second sums them in SQL: same rows."""
    first = _json(world, "report", "energy")
    second = _json(world, "report", "energy")
    assert len(first["rows"]) == N
    by_key = {r["key"]: r for r in second["rows"]}
    for e in _finished():
        row = by_key[e["key"]]
        assert row["gpu_hours"] == pytest.approx(e["gpu_hours"]) and row["gpu_hours_source"] == e["source"]
        assert row["energy_kwh"] == pytest.approx(e["energy_kwh"]) and row["co2_kg"] == pytest.approx(e["co2_kg"])
        assert row["estimated_kwh"] == 2.0 and row["requeues"] == e["requeues"]
        assert row["energy_source"] == ("codecarbon" if e["energy_kwh"] else "none")
        assert row["pue"] == (1.2 if e["energy_kwh"] else None)
    settled = [k for k in by_key if int(k[1:]) < N - ACTIVE]
    assert [r for r in first["rows"] if r["key"] in settled] == [r for r in second["rows"] if r["key"] in settled]
    conn = sqlite3.connect(world["db"])
    assert conn.execute("SELECT count(*) FROM summaries WHERE settled = 1").fetchone()[0] == N - ACTIVE
    assert conn.execute("SELECT count(*) FROM summaries WHERE settled = 0").fetchone()[0] == ACTIVE


@pytest.mark.parametrize("by", ["month", "day", "profile", "user"])
def test_groupings_sum_the_runs(world, by):
    _json(world, "report", "gpu-hours")  # summaries stored: the groups below are SQL's
    rows = {r["key"]: r for r in _json(world, "report", "gpu-hours", "--by", by, "--until", "2026-04-01")["rows"]}

    def key(e):
        day = dt.datetime.fromtimestamp(e["created"], dt.UTC)
        return {"month": day.strftime("%Y-%m"), "day": day.strftime("%Y-%m-%d")}.get(by) or e[by]

    want = defaultdict(list)
    for e in _finished():
        want[key(e)].append(e)
    assert set(rows) == set(want)
    for k, es in want.items():
        assert rows[k]["runs"] == len(es)
        assert rows[k]["gpu_hours"] == pytest.approx(8.0 * len(es))
        assert rows[k]["energy_kwh"] == pytest.approx(sum(e["energy_kwh"] for e in es))
        assert rows[k]["requeues"] == sum(e["requeues"] for e in es)
        assert rows[k]["gpu_hours_source"] == "+".join(sorted({e["source"] for e in es}))
    if by == "month":
        assert sorted(rows) == ["2026-01", "2026-02", "2026-03"]


def test_filters_are_applied(world):
    """--profile, --user, --since and --until (SQL) give the runs the generator put there."""
    rows = _json(
        world, "report", "energy", "--profile", "a100x32", "--user", "bob", "--since", "2026-02-01", "--until",
        "2026-02-15T12:00",
    )["rows"]  # fmt: skip
    lo = dt.datetime(2026, 2, 1, tzinfo=dt.UTC).timestamp()
    hi = dt.datetime(2026, 2, 15, 12, tzinfo=dt.UTC).timestamp()
    want = _finished(lambda e: e["profile"] == "a100x32" and e["user"] == "bob" and lo <= e["created"] < hi)
    assert sorted(r["key"] for r in rows) == sorted(e["key"] for e in want) and want
    one = _json(world, "report", "gpu-hours", "--run", "r00042")["rows"]
    assert [r["key"] for r in one] == ["r00042"] and one[0]["gpu_hours"] == pytest.approx(8.0)


def test_csv_and_text_have_every_run(world):
    r = run_cli("report", "energy", "--csv", env=world["env"], timeout=300)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == N + 1
    r = run_cli("report", "energy", env=world["env"], timeout=300)
    assert r.returncode == 0, r.stderr
    keys = [line.split()[0] for line in r.stdout.splitlines() if line.startswith((" r0", " r1"))]
    assert len(keys) == N and len(set(keys)) == N  # every run once, on one line each (200 columns)
    line = next(line for line in r.stdout.splitlines() if line.startswith(" r00010 "))
    assert line.split()[1:4] == ["8", "sacct", "0"]  # GPU-h, its source, requeues: nothing cut


def test_status_all_json_streams_every_run(world):
    d = _json(world, "status", "--all")
    _json(world, "status", "--all")  # the second from the rows the registry keeps
    d2 = _json(world, "status", "--all")
    runs = d2["runs"]
    assert len(runs) == N and set(d2) == {"source", "notes", "runs"}
    assert [r["created_at"] for r in runs] == sorted((r["created_at"] for r in runs), reverse=True)
    assert [r for r in d["runs"] if r["state"] != "RUNNING"] == [r for r in runs if r["state"] != "RUNNING"]
    one = _json(world, "status", "r00123")["runs"][0]  # the path that reads the run's files
    assert next(r for r in runs if r["run_id"] == "r00123") == one
    running = next(r for r in runs if r["state"] == "RUNNING")
    assert running["step"] == 49 and running["loss"] == pytest.approx(0.1)
    assert list(one) == list(running)  # one key order


def test_summary_follows_registry_and_file_changes(world, tmp_path):
    """A settled summary goes when its run's rows change (triggers); an active run's figures follow
    its files (size and mtime); the registry of an older clusterctl gains the table."""
    env = world["env"]
    reg = Registry(world["db"])
    _json(world, "report", "gpu-hours")
    reg.update_job("100042", run_id="r00042", elapsed_s=7200.0)  # accounting corrected
    row = _json(world, "report", "gpu-hours", "--run", "r00042")["rows"][0]
    assert row["gpu_hours"] == pytest.approx(16.0)
    active = f"r{N - 1:05d}"
    (world["root"] / "runs" / active / "energy").mkdir(exist_ok=True)
    csv_file = world["root"] / "runs" / active / "energy" / "node000-x-r0.csv"
    csv_file.write_text(HEADER + "t,p,r,60,0.01,0.5,FRA,1.2\n")
    assert _json(world, "report", "energy", "--run", active)["rows"][0]["energy_kwh"] == pytest.approx(0.5)
    csv_file.write_text(HEADER + "t,p,r,120,0.02,0.75,FRA,1.2\n")
    os.utime(csv_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert _json(world, "report", "energy", "--run", active)["rows"][0]["energy_kwh"] == pytest.approx(0.75)
    reg.add_job("r00050", "999", "resume")  # resumed: no longer settled, its new job counts
    conn = sqlite3.connect(world["db"])
    assert conn.execute("SELECT count(*) FROM summaries WHERE run_id IN ('r00042', 'r00050')").fetchone()[0] <= 1
    st = _json(world, "status", "r00050")["runs"][0]
    assert st["job_ids"] == ["100050", "999"]
    row = next(r for r in _json(world, "status", "--all")["runs"] if r["run_id"] == "r00050")
    assert row["job_ids"] == ["100050", "999"]
    r = run_cli("report", "energy", "--by", "week", env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: --by: 'week' is not known")


def test_old_registry_gains_summaries_and_a_readonly_one_is_read(tmp_path):
    from clusterctl.runs.dbfile import connect
    from clusterctl.runs.registry import migrate

    path = tmp_path / "old.db"
    conn = connect(path)
    migrate(conn, target=2)  # what the previous clusterctl made
    conn.execute(
        "INSERT INTO runs VALUES ('old-1','old','a100x64','slurm','/nonexistent',1.0,'u',8,10,'COMPLETED','{}',"
        '\'{"estimate": {"energy_kwh": 1.5}}\')'
    )
    conn.execute(
        "INSERT INTO jobs (job_id, run_id, attempt, kind, submitted_at, state, elapsed_s, alloc_gpus) "
        "VALUES ('7','old-1',1,'submit',1.0,'COMPLETED',3600.0,8)"
    )
    conn.close()
    from clusterctl.runs.history import current

    old = Registry(path, readonly=True)  # read-only at schema 2: summaries computed, not stored
    assert not old.has_summaries
    ((run, s),) = current(old, old.index()).rows
    assert (run.run_id, s.gpu_hours, s.estimated_kwh) == ("old-1", 8.0, 1.5)
    old.close()
    env = {"CLUSTERCTL_REGISTRY": str(path), "PATH": "/nonexistent"}
    row = json.loads(run_cli("report", "gpu-hours", "--json", env=env).stdout)["rows"][0]
    assert row["gpu_hours"] == pytest.approx(8.0) and row["estimated_kwh"] == 1.5
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_status_row_keys_are_those_of_the_stored_format():
    """Stored status rows (summaries.STATUS_FORMAT) have runs.status.RunStatus's keys: a change to
    them must bump STATUS_FORMAT, so rows of the old shape are made again."""
    from clusterctl.runs.status import RunStatus
    from clusterctl.runs.summaries import STATUS_FORMAT

    keys = [
        *("run_id", "name", "profile", "executor", "state", "job_id", "job_ids", "requeues", "resumes", "step"),
        *("total_steps", "loss", "samples_per_s", "eta_s", "elapsed_s", "gpu_hours", "alloc_gpus", "node_list"),
        *("exit_code", "run_dir", "created_at", "reason", "pending_reason", "pending_detail", "expected_start"),
        *("eval", "commit", "dirty", "excluded_nodes", "startup", "lineage"),
    ]
    assert (STATUS_FORMAT, list(RunStatus.__annotations__)) == (6, keys)


def test_sql_rows_equal_python_rows():
    """A group summed by SQL (usage.sql_row) reads as the same runs added one by one (Totals)."""
    from clusterctl.runs.usage import RunUsage, Totals, sql_row

    us = [
        RunUsage("a", "a", "p", "u", 0.0, 8, 8.0, "sacct", 1.5, 0.05, 1.2, [], 2.0, 0.1, 1, 0, 1),
        RunUsage("b", "b", "p", "u", 0.0, 8, 4.0, "registry", 0.0, 0.0, None, [], None, None, 0, 2, 0),
    ]
    t = Totals()
    for u in us:
        t.add(u)
    sql = ("k", 2, 12.0, "sacct,registry", 1.5, 0.05, 2.0, 1, 0.1, 1, 1.2, 1.2, 1, 1, 1, 2)
    assert sql_row(sql) == t.row("k")


def test_run_rows_are_sql_rows_of_one_run():
    """By run, each settled run's row is made from its own figures (usage.run_rows, Registry.settled_runs)
    and reads as the row of a group of that one run summed by SQL (usage.sql_row)."""
    from clusterctl.runs.usage import run_rows, sql_row

    runs = [  # run id, GPU-h, source, kWh, kg CO2, PUE, plan kWh, plan kg, measured, requeues, resumes
        ("a", 8.123456789, "sacct", 1.5, 0.05, 1.2, 2.0, 0.1, 1, 1, 0),
        ("b", 4.0, "registry+sacct", 0.0, 0.0, None, None, None, 0, 0, 2),
        ("c", 0, "none", 0, 0, 1.1, 3, 0.2, 0, None, None),
        ("d", 8.123456789, "sacct", 1.5, 0.05, 1.2, 2.0, 0.1, 1, 0, 0),  # the same figures again: rounded once
        ("e", 1.0000005, "sacct", 1e10, 1e-320, 1.2, 2.0, 0.1, 1, 0, 0),  # grid intensity 0.0
        ("f", 1.0000005, "sacct", 1e10, -1e-320, 1.2, 2.0, 0.1, 1, 0, 0),  # and -0.0: not taken for 0.0
    ]
    as_groups = [
        (k, 1, h, src, kwh, co2, est, int(est is not None), est_co2, int(est_co2 is not None), pue, pue,
         int(pue is not None), m, rq, rs)
        for k, h, src, kwh, co2, pue, est, est_co2, m, rq, rs in runs
    ]  # fmt: skip
    mine = run_rows(runs)
    assert mine == [sql_row(t) for t in as_groups]
    assert [list(r.items()) for r in mine] == [list(sql_row(t).items()) for t in as_groups]  # keys in order
    assert json.dumps(mine) == json.dumps([sql_row(t) for t in as_groups])  # -0.0 stays -0.0
    assert [r["carbon_intensity_g_per_kwh"] for r in mine][-2:] == [0.0, 0.0] and "-0.0" in json.dumps(mine[-1])


def test_run_columns_are_the_rows_merged_by_key():
    """The table's columns by run (usage.run_columns) hold the rows run_rows makes of the settled
    runs and the rows of the others, in key order (a key in both: the fresh row)."""
    from clusterctl.runs.usage import COLUMNS, run_columns, run_rows

    def fig(k, h, kwh):  # run id, GPU-h, source, kWh, kg CO2, PUE, plan kWh, plan kg, measured, requeues, resumes
        return (k, h, "sacct", kwh, kwh * 0.05, 1.2, 2.0, 0.1, 1, 0, 1)

    settled = [fig("b", 8.0, 1.5), fig("d", 8.0, 1.5), fig("f", 4.123456789, 0.0)]  # sorted, as SQL gives them
    others = run_rows([fig("g", 1.0, 2.0), fig("a", 2.0, 0.5), fig("d", 3.0, 0.25)])  # any order; "d" in both
    want = sorted([r for r in run_rows(settled) if r["key"] != "d"] + others, key=lambda r: r["key"])
    cols = run_columns(settled, others)
    assert list(cols) == [*COLUMNS, "requeues", "resumes"]
    assert [dict(zip(cols, values)) for values in zip(*cols.values())] == want
    assert run_columns(settled, []) == {k: [r[k] for r in run_rows(settled)] for k in cols}
    assert run_columns([], others)["key"] == ["a", "d", "g"] and run_columns([], [])["key"] == []


def test_country_table_is_pycountrys():
    pycountry = pytest.importorskip("pycountry")
    from clusterctl.planning.iso3166 import ALPHA_3

    assert {c.alpha_3 for c in pycountry.countries} == ALPHA_3


def test_report_loss_reads_head_and_tail_of_a_large_file(tmp_path):
    from clusterctl.runs.artifacts import loss_summary

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [json.dumps({"step": s, "loss": 9 - s * 0.001, "itc": 1.0}) for s in range(1, 3001)]
    lines[1500:1500] = [json.dumps({"step": s, "loss": 0.0}) for s in range(1000, 1200)]  # a resume re-logs
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3001, "lo')
    whole = loss_summary(run_dir)
    assert (whole.steps, whole.first["step"], whole.last["step"], whole.keys) == (3000, 1, 3000, ["loss", "itc"])
    head_tail = loss_summary(run_dir, full_max=1000)
    assert head_tail.steps is None and head_tail.first == whole.first and head_tail.last == whole.last
