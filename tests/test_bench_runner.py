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


def test_several_runs_are_judged_on_the_median_of_their_ratios(run_all):
    """--runs N: one row per name, its ratio the median of the runs' (not the last run's, not the mean),
    the spread their min-max; the goal judged on that median, so one run over the goal does not fail the
    row and a row over it in most runs does; a run whose section failed stays a NOT MET row of its own."""

    def row(name, ratio, goal="<= 1.05x"):
        return {
            "name": name,
            "ratio": ratio,
            "spread": [ratio, ratio],
            "goal": goal,
            "ok": ratio <= 1.05,
            "detail": "d",
        }

    runs = [
        [row("a", 1.02), row("b", 1.06), row("c", 2.0, "measured")],
        [row("a", 1.07), row("b", 1.04), row("c", 4.0, "measured")],
        [row("a", 1.00), row("b", 1.08), row("c", 3.0, "measured")],
        [{"name": "bench_x: failed", "ratio": None, "spread": None, "goal": None, "ok": False, "detail": "boom"}],
    ]
    a, b, c, failed = run_all.combine(runs)
    assert (a["name"], a["ratio"], a["spread"], a["ok"], a["runs"]) == ("a", 1.02, [1.0, 1.07], True, [1.02, 1.07, 1.0])
    assert (b["ratio"], b["spread"], b["ok"]) == (1.06, [1.04, 1.08], False)
    assert (c["ratio"], c["ok"]) == (3.0, False)  # no "<=/>=" goal: the row's own verdict (the last run's)
    assert "median of 3 runs (1.020 1.070 1.000)" in a["detail"]
    assert failed["ok"] is False and "NOT MET" in run_all.line(failed)
    at_least = run_all.combine([[row("d", 2.0, ">= 3x")], [row("d", 3.5, ">= 3x")], [row("d", 3.2, ">= 3x")]])
    assert at_least[0]["ratio"] == 3.2 and at_least[0]["ok"] is True
    (one,) = run_all.combine([[row("a", 1.07)]])  # one run: the row as the section gave it
    assert one == row("a", 1.07)


def test_runs_below_one_is_a_one_line_error():
    r = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--only", "cli", "--runs", "0"],
        capture_output=True,
        text=True,
        timeout=deadline(60),
    )
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["--runs: 0; allowed: 1 or more"]


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
