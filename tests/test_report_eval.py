"""`report eval` across real runs: two short local trainings (one process each) that evaluate on the
held-out shards at their end and write eval.json (vltrain.evaluate), and one stopped before its end
(no eval.json). The table shows Recall@K both ways and CIDEr-D per run within 80 columns, run ids
whole; --json carries every figure of each eval.json; a run without one is named, not dropped."""

from __future__ import annotations

import json
import time

import pytest

from clusterctl.runs.registry import Registry
from clusterctl.specs import RunRecord
from tests.conftest import run_cli, trainer_shards
from tests.test_report_plots import staged_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-eval")
    data = trainer_shards(root / "data")
    reg = Registry(root / "reg.db")
    runs = {}
    for name, steps, stop in (("eval-first", 4, None), ("eval-second", 6, None), ("stopped-early", 6, 2)):
        run_id = reg.new_run_id(name)
        run_dir = root / "runs" / run_id
        cfg = staged_config(root / f"{name}.toml", data, steps=steps)
        args = ["train", "--config", str(cfg), "--run-dir", str(run_dir)] + (
            ["--stop-after", str(stop)] if stop else []
        )
        r = run_cli(*args, prog="vltrain", env={"OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        rec = RunRecord(run_id, name, "local", "local", str(run_dir), time.time(), "ann", 1, steps, "COMPLETED")
        reg.add_run(rec)
        runs[name] = (run_id, run_dir)
    reg.close()
    return {"env": {"CLUSTERCTL_REGISTRY": str(root / "reg.db"), "PATH": "/nonexistent"}, "runs": runs}


def _report(world, *args, columns="80"):
    r = run_cli("report", "eval", *args, env=world["env"] | {"COLUMNS": columns})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_json_has_each_runs_recall_and_cider(world):
    d = json.loads(_report(world, "--json"))
    rows = {r["run_id"]: r for r in d["rows"]}
    for name in ("eval-first", "eval-second"):
        run_id, run_dir = world["runs"][name]
        ev = json.loads((run_dir / "eval.json").read_text())  # written by the trainer at the run's end
        row = rows.pop(run_id)
        assert row["step"] == ev["step"] == {"eval-first": 4, "eval-second": 6}[name]
        assert row["n"] == ev["n"] and row["cider"] == ev["cider"] and row["chance_r1"] == ev["chance_r1"]
        for side in ("i2t", "t2i"):
            assert [row[f"{side}_r{k}"] for k in (1, 5, 10)] == [ev[side][f"R@{k}"] for k in (1, 5, 10)]
    assert rows == {}
    assert d["without_eval"] == [world["runs"]["stopped-early"][0]]


def test_table_at_80_columns(world):
    out = _report(world)
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    assert "R@1" in out and "R@5" in out and "CIDEr-D" in out
    for name in ("eval-first", "eval-second"):
        run_id, run_dir = world["runs"][name]
        ev = json.loads((run_dir / "eval.json").read_text())
        row = next(line.split() for line in lines if line.split()[:1] == [run_id])  # the id whole
        shown = [float(v) for v in row[1:]]
        assert f"{100 * ev['i2t']['R@1']:.1f}" in row[1:] and f"{100 * ev['t2i']['R@5']:.1f}" in row[1:]
        assert shown[-1] == pytest.approx(ev["cider"], abs=5e-4)  # CIDEr-D, last
    assert f"held-out pairs {ev['n']}" in out  # the same on every row: said once
    stopped = world["runs"]["stopped-early"][0]
    assert f"no eval.json yet: {stopped}" in out.replace("\n", " ")


def test_one_run_and_bad_run(world):
    run_id, _ = world["runs"]["eval-first"]
    d = json.loads(_report(world, "--run", "eval-first", "--json"))
    assert [r["run_id"] for r in d["rows"]] == [run_id] and d["without_eval"] == []
    r = run_cli("report", "eval", "--run", "ghost", env=world["env"])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0
