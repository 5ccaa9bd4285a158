"""bench/run_all.py: every section it names exposes rows(rounds); a section that fails is a row that
says so (not a traceback that hides the other sections); unknown sections are a one-line error.
Timing itself is never asserted (that is the benchmark's job)."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import deadline

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("run_all")


def test_every_section_has_rows(run_all):
    for target in run_all.SECTIONS.values():
        module, _, function = target.partition(":")  # "module" (its rows) or "module:function"
        fn = getattr(importlib.import_module(module), function or "rows")
        params = inspect.signature(fn).parameters
        assert next(iter(params)) == "rounds", target  # run_all calls rows(rounds)


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
        [sys.executable, str(BENCH / "run_all.py"), "--only", "cli,nope"],
        capture_output=True,
        text=True,
        timeout=deadline(60),
    )
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "--only: unknown section nope; allowed: cli, step, data, start, index, ranks"
    ]


@pytest.mark.slow
def test_the_step_rows_time_what_the_trainer_runs():
    """bench_step times the trainer's own choice (on one fp32 rank: DeepSpeed's stage 1 without gradient
    hooks) beside ZeRO-2 with its hooks under both reductions, each a real session. In a process of its
    own: a session initialises torch.distributed and exports RANK/WORLD_SIZE, which would leak into every
    later test's jobs (sbatch passes the environment on)."""
    args = ["--rounds", "1", "--steps", "1", "--accum", "2", "--set", "global_batch=8"]
    r = subprocess.run(
        [sys.executable, str(BENCH / "bench_step.py"), *args],
        capture_output=True,
        text=True,
        timeout=deadline(300),
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    row = next(line for line in r.stdout.splitlines() if line.split()[:2] == ["2", "4"])
    assert re.search(r"ZeRO-2 on one rank as stage 1, no gradient hooks \(chosen\) \d\.\d{3} ", row), row
    assert re.search(r"ZeRO-2, coalesced reduction \d\.\d{3} .*ZeRO-2, per micro step reduction \d\.\d{3} ", row), row
