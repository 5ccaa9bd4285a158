"""Pure parts of the live view: sparklines, incremental tails, panels that fit 80 columns."""

from __future__ import annotations

import json

from rich.console import Console

from clusterctl.render.watch_view import (
    PANEL_LINES,
    RunView,
    Tail,
    data_wait,
    fits_panels,
    plain_line,
    run_panel,
    runs_table,
    sparkline,
    summary_lines,
)


def test_sparkline_scales_between_min_and_max():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 5, 5]) == "▁▁▁"
    assert sparkline([]) == ""
    assert len(sparkline(list(range(100)), width=10)) == 10
    assert sparkline([3.0, float("nan"), 1.0]) == "█▁"


def test_tail_reads_only_new_complete_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    t = Tail(p)
    assert t.lines() == []  # the file does not exist yet
    p.write_text('{"step": 1}\n{"step": 2')
    assert t.lines() == ['{"step": 1}']
    assert t.offset == p.stat().st_size  # nothing will be read twice
    with p.open("a") as f:
        f.write('}\n{"step": 3}\n')
    assert t.lines() == ['{"step": 2}', '{"step": 3}']
    assert t.lines() == []
    p.write_text("new attempt\n")  # truncated: start over
    assert t.lines() == ["new attempt"]


def test_tail_never_reads_more_than_asked(tmp_path):
    p = tmp_path / "big.log"
    p.write_text("x" * 5000 + "\nlast line\n")
    t = Tail(p)
    assert t.lines(max_bytes=100) == ["last line"]


def _row(**kw):
    return {
        "run_id": "tiny-20261122-120000-ab12",
        "name": "tiny",
        "state": "RUNNING",
        "job_id": "42",
        "node_list": "a[1-2]",
        "requeues": 1,
        "step": 30,
        "total_steps": 100,
        "eta_s": 95.0,
        "gpu_hours": 0.0123,
        "elapsed_s": 300.0,
    } | kw


def _view():
    v = RunView(Tail("/nonexistent"), Tail("/nonexistent"))
    v.feed_metrics(
        [
            json.dumps(
                {
                    "step": s,
                    "loss": 10 - s / 10,
                    "itc": 3.0 - s / 50,
                    "mlm": 4.0,
                    "caption": 3.0,
                    "samples_per_s": 120.5,
                    "step_time_s": 0.5,
                    "data_wait_s": 0.015,
                    "mfu": 0.31,
                }
            )
            for s in range(1, 31)
        ]
        + ["{broken"]
    )
    v.feed_log(["step 30/100 | loss 7.0000", ""])
    v.energy_kwh, v.co2_kg = 0.0042, 0.00024
    return v


def test_panel_fits_80_columns_and_shows_the_essentials():
    console = Console(width=80, record=True, color_system=None)
    console.print(run_panel(_row(), _view(), width=80))
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert len(lines) <= PANEL_LINES and fits_panels(2, 24)  # two runs and the footer fit in 24 rows
    for expected in (
        "RUNNING",
        "job 42",
        "a[1-2]",
        "requeues 1",
        "30/100",
        "ETA 1:35",
        "loss",
        "itc",
        "120.5 samples/s",
        "MFU 31.0%",
        "GPU-h",
        "4.2 Wh",
        "0.24 g CO2eq",
        "step 30/100",
        "data wait 15 ms/step (3%)",
    ):
        assert expected in text, expected


def test_plain_line_and_summary():
    v = _view()
    line = plain_line(_row(), v)
    assert line.startswith("tiny-20261122-120000-ab12 RUNNING step 30/100 loss 7.0000 requeues 1")
    assert "data wait 15 ms/step (3%)" in line
    out = summary_lines(
        [_row(state="COMPLETED")], {"tiny-20261122-120000-ab12": v}, {"tiny-20261122-120000-ab12": {"i2t R@1": 0.5}}
    )
    assert out[0] == "1 run(s) finished"
    assert "COMPLETED" in out[1] and "final loss 7.0000" in out[1]
    assert "i2t R@1 0.500" in out[-1]
    big = plain_line(_row(gpu_hours=12480.4), v)  # a 64-GPU week: no exponent notation
    assert "12,480 GPU-h" in big and "4.2 Wh" in big  # 0.0042 kWh, in the unit that reads best


def test_many_runs_switch_to_one_line_each_within_80x24():
    assert not fits_panels(3, 24)
    rows = [
        _row(run_id=f"run-{i:02d}", name=f"sweep-lr-{i:02d}", state="RUNNING" if i % 3 else "PENDING", step=10 * i)
        for i in range(30)
    ]
    views = {r["run_id"]: _view() for r in rows}
    console = Console(width=80, height=24, record=True, color_system=None)
    console.print(runs_table(rows, views, 80, 24))
    lines = console.export_text().splitlines()
    assert len(lines) <= 23 and all(len(line) <= 80 for line in lines)  # the footer's line is left free
    assert lines[0].split()[:4] == ["RUN", "STATE", "STEP", "ETA"]
    assert "sweep-lr-00" in lines[1] and "PENDING" in lines[1] and "7.000" in lines[1]
    assert "RUNNING" in lines[2] and "1:35" in lines[2]  # ETA
    shown = sum("sweep-lr-" in line for line in lines)
    assert lines[-1].strip().startswith(f"... {30 - shown} more")
    few = Console(width=80, height=24, record=True, color_system=None)
    few.print(runs_table(rows[:4], views, 80, 24))
    text = few.export_text()
    assert "more" not in text and sum("sweep-lr-" in ln for ln in text.splitlines()) == 4


def test_data_wait_is_ms_per_step_and_share_of_the_step():
    assert data_wait({"data_wait_s": 0.0042, "step_time_s": 0.21}) == "data wait 4.2 ms/step (2%)"
    assert data_wait({"data_wait_s": 1.5, "step_time_s": 2.0}) == "data wait 1,500 ms/step (75%)"
    assert data_wait({"data_wait_s": 0.0, "step_time_s": 0.2}) == "data wait 0.0 ms/step (0%)"
    assert data_wait({"data_wait_s": 0.02}) == "data wait 20 ms/step"  # no step time: no share
    for m in ({}, {"data_wait_s": None}, {"data_wait_s": float("nan")}, {"data_wait_s": -1.0}, {"data_wait_s": True}):
        assert data_wait(m) is None, m  # a run that does not log it (older runs) shows nothing
    v = RunView(Tail("/nonexistent"), Tail("/nonexistent"))
    v.feed_metrics([json.dumps({"step": 1, "loss": 3.0, "samples_per_s": 10.0})])
    console = Console(width=80, record=True, color_system=None)
    console.print(run_panel(_row(), v, width=80))
    assert "data wait" not in console.export_text() and "data wait" not in plain_line(_row(), v)
