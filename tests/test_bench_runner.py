"""bench/run_all.py: every section it names exposes rows(rounds); a section that fails is a row that
says so (not a traceback that hides the other sections); unknown sections are a one-line error.
Timing itself is never asserted (that is the benchmark's job)."""

from __future__ import annotations

import importlib
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("run_all")


def test_every_section_has_rows(run_all):
    for module in run_all.SECTIONS.values():
        mod = importlib.import_module(module)
        params = inspect.signature(mod.rows).parameters
        assert next(iter(params)) == "rounds", module  # run_all calls rows(rounds)


def test_a_failing_section_is_one_row_saying_so(run_all, tmp_path, monkeypatch):
    (tmp_path / "bench_broken.py").write_text("def rows(rounds):\n    raise RuntimeError('no cluster here')\n")
    monkeypatch.setattr(run_all, "BENCH", tmp_path)
    rows = run_all.section("bench_broken", 1)
    assert len(rows) == 1 and rows[0]["ok"] is False and "no cluster here" in rows[0]["detail"]
    assert "NOT MET" in run_all.line(rows[0])


def test_rows_come_back_and_print(run_all, tmp_path, monkeypatch):
    (tmp_path / "bench_fine.py").write_text(
        "def rows(rounds):\n"
        "    return [{'name': 'x vs y', 'ratio': 1.5 + rounds, 'spread': [1.4, 1.9], 'goal': '<= 3x', 'ok': True,"
        " 'detail': 'd'}]\n"
    )
    monkeypatch.setattr(run_all, "BENCH", tmp_path)
    (row,) = run_all.section("bench_fine", 1)
    assert row["ratio"] == 2.5
    text = run_all.line(row)
    assert "2.500x" in text and "1.400-1.900" in text and "<= 3x" in text and text.split()[-2] == "ok"


def test_unknown_section_is_a_one_line_error():
    r = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--only", "cli,nope"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["--only: unknown section nope; allowed: cli, step, data, start"]


@pytest.mark.slow
def test_the_step_rows_time_what_the_trainer_runs(monkeypatch):
    """bench_step's row times the trainer's own choice (on one fp32 rank: DeepSpeed's stage 1 without
    gradient hooks) and its full run times ZeRO-2 with its hooks beside it, each a real session."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bench_step = importlib.import_module("bench_step")
    cfg, tmp = bench_step.setup(str(BENCH.parent / "configs" / "tiny.toml"), ["global_batch=8"])
    m, stops = bench_step.measure(cfg, tmp, 2, argparse.Namespace(rounds=1, steps=1, chosen_only=False))
    for s in reversed(stops):
        s.restore()
    shutil.rmtree(tmp)
    assert m["words"] == {
        "auto": "ZeRO-2 on one rank as stage 1, no gradient hooks",
        "coalesced": "ZeRO-2, coalesced reduction",
        "per_micro_step": "ZeRO-2, per micro step reduction",
    }
    assert set(m["ms"]) == {"bare", *m["words"]} and all(v > 0 for v in m["ms"].values())
