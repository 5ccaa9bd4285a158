"""Zero-shot classification where a user looks: `clusterctl status` (an EVAL column, or a line per run
when the terminal is too narrow for it), `watch` (the run panel, the plain lines, the final summary),
`report eval` (0-shot columns, every figure in --json) and the end of `submit --wait`, from eval.json
files written into run directories as the trainer writes them (vltrain.evaluate), and silent where a
run's eval.json has no "zero_shot" or the run has none. clusterctl reads eval.json; no torch here."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from clusterctl.runs.registry import Registry
from clusterctl.specs import RunRecord
from tests.conftest import run_cli

DIGITS, SYNTH, BARE = "digits-20261207-010203-ab12", "synth-20261207-010203-cd34", "bare-20261207-010203-ef56"
ZERO_SHOT = {"top1": 0.8123, "top5": 0.9871, "classes": 10, "n": 297, "templates": 3, "chance_top1": 0.1}


def eval_json(zero_shot: dict | None) -> dict:
    ev = {
        "step": 300,
        "n": 300,
        "chance_r1": 1 / 300,
        "i2t": {"R@1": 0.1524, "R@5": 0.4, "R@10": 0.6},
        "t2i": {"R@1": 0.1411, "R@5": 0.41, "R@10": 0.62},
        "cider": 0.5,
        "caption_samples": 300,
        "examples": [],
    }
    return ev | ({"zero_shot": zero_shot} if zero_shot else {})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A registry of three completed local runs: one evaluated with zero-shot (digits), one without
    (synthetic scenes: no classes), one never evaluated."""
    root = tmp_path_factory.mktemp("zs-display")
    reg = Registry(root / "registry.db")
    for n, (run_id, ev) in enumerate(((BARE, None), (SYNTH, eval_json(None)), (DIGITS, eval_json(ZERO_SHOT))), 1):
        rd = root / "runs" / run_id
        rd.mkdir(parents=True)
        reg.add_run(
            RunRecord(
                run_id=run_id,
                name=run_id.split("-")[0],
                profile="local",
                executor="local",
                run_dir=str(rd),
                created_at=time.time() - 100 + n,
                user="u",
                gpus=1,
                total_steps=300,
                state="COMPLETED",
                config={},
                plan={"global_batch": 64},
            )
        )
        reg.add_job(run_id, f"9{n}", "submit", submitted_at=time.time() - 100)
        record = {"step": 300, "loss": 1.5, "samples_per_s": 100.0, "time": time.time()}
        (rd / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        if ev is not None:
            (rd / "eval.json").write_text(json.dumps(ev))
    reg.close()
    return {"root": root, "env": {"CLUSTERCTL_REGISTRY": str(root / "registry.db"), "PATH": "/usr/bin:/bin"}}


def cli(world: dict, *args: str, columns: int = 120) -> str:
    r = run_cli(*args, env=world["env"] | {"COLUMNS": str(columns)})
    assert r.returncode == 0, r.stderr
    return r.stdout


def _line(out: str, run_id: str) -> str:
    (line,) = [x for x in out.splitlines() if x.startswith(run_id)]
    return line


def test_status_shows_zero_shot_top1_else_r1_in_its_eval_column(world):
    out = cli(world, "status", "--all")  # --all from the registry's summaries: the same headline
    assert "top-1 0.812" in _line(out, DIGITS) and "R@1 0.152" in _line(out, SYNTH)
    assert json.loads(cli(world, "status", "--all", "--json"))["runs"] == [
        json.loads(cli(world, "status", r, "--json"))["runs"][0] for r in (DIGITS, SYNTH, BARE)
    ]
    out = cli(world, "status", DIGITS)
    assert out.splitlines()[0].split()[:8] == ["RUN", "JOB", "PROFILE", "STATE", "RQ", "STEP", "LOSS", "EVAL"]
    assert "top-1 0.812" in _line(out, DIGITS)
    out = cli(world, "status", SYNTH)
    assert "R@1 0.152" in _line(out, SYNTH) and "top-1" not in out
    out = cli(world, "status", BARE)  # no eval.json: silent, no column
    assert "EVAL" not in out and "eval" not in out


def test_status_json_carries_the_headline_and_null_without_an_eval(world):
    rows = {}
    for run_id in (DIGITS, SYNTH, BARE):
        (row,) = json.loads(cli(world, "status", run_id, "--json"))["runs"]
        rows[run_id] = row["eval"]
    assert rows[DIGITS] == {"metric": "top-1", "value": 0.8123, "chance": 0.1, "step": 300}
    assert rows[SYNTH] == {"metric": "R@1", "value": 0.1524, "chance": 1 / 300, "step": 300}
    assert rows[BARE] is None


def test_status_too_narrow_for_the_column_gives_each_run_an_eval_line(world, monkeypatch, capsys):
    """At 80 columns these run ids leave no room for EVAL: a line per evaluated run, whole, instead
    (rendered in-process: status_table.print_status over collected rows)."""
    from clusterctl.render.status_table import print_status

    monkeypatch.setenv("COLUMNS", "80")
    rows = []
    for run_id, ev in ((DIGITS, ZERO_SHOT), (SYNTH, None), (BARE, "none")):
        head = None if ev == "none" else {"metric": "top-1", "value": 0.8123, "chance": 0.1, "step": 300}
        if ev is None:
            head = {"metric": "R@1", "value": 0.1524, "chance": 1 / 300, "step": 300}
        rows.append(_status_row(run_id, head))
    print_status({"runs": rows, "notes": [], "source": "registry"})
    out = capsys.readouterr().out
    assert all(len(x) <= 80 for x in out.splitlines() if " eval " in x or x.startswith("RUN"))
    assert f"{DIGITS} eval step 300: zero-shot top-1 0.812 (chance 0.100)" in out.splitlines()
    assert f"{SYNTH} eval step 300: i2t R@1 0.152 (chance 0.0033)" in out.splitlines()
    assert f"{BARE} eval" not in out and "EVAL" not in out


def _status_row(run_id: str, head: dict | None) -> dict:
    return {
        "run_id": run_id,
        "job_id": "91",
        "profile": "local",
        "state": "COMPLETED",
        "requeues": 0,
        "resumes": 0,
        "step": 300,
        "total_steps": 300,
        "loss": 1.5,
        "samples_per_s": 100.0,
        "eta_s": None,
        "elapsed_s": 60.0,
        "gpu_hours": 0.01,
        "eval": head,
    }


def test_watch_says_zero_shot_in_its_final_summary(world):
    out = cli(world, "watch", DIGITS, SYNTH, BARE, "--interval", "0.2", columns=200)
    _, summary = out.split("3 run(s) finished\n", 1)  # the plain progress lines stay as they were
    blocks = {}
    for line in summary.splitlines():
        if not line.startswith(" "):
            run_id = line.split(":", 1)[0]
        blocks[run_id] = blocks.get(run_id, "") + line + "\n"
    assert "  eval: zero-shot top-1 0.812  i2t R@1 0.152" in blocks[DIGITS]
    assert "  eval: i2t R@1 0.152" in blocks[SYNTH] and "zero-shot" not in blocks[SYNTH]
    assert "eval" not in blocks[BARE]


def test_the_run_panel_has_an_eval_line_within_80_columns_and_none_without_one():
    from rich.console import Console

    from clusterctl.render.watch_view import PANEL_LINES, RunView, Tail, run_panel

    row = {"run_id": DIGITS, "name": "digits", "state": "RUNNING", "job_id": "91", "node_list": "n1"}
    row |= {"requeues": 0, "resumes": 0, "step": 150, "total_steps": 300, "eta_s": 60.0, "gpu_hours": 0.01}
    for ev, expected in (
        (eval_json(ZERO_SHOT), "eval step 300: zero-shot top-1 0.812 top-5 0.987 (chance 0.100)"),
        (eval_json(None), "eval step 300: i2t R@1 0.152 (chance 0.0033)"),
        ({}, None),
    ):
        v = RunView(Tail(Path("/nonexistent")), Tail(Path("/nonexistent")))
        v.eval = ev
        console = Console(width=80, record=True, color_system=None)
        console.print(run_panel(row, v, width=80))
        lines = console.export_text().splitlines()
        assert all(len(x) <= 80 for x in lines) and len(lines) <= PANEL_LINES
        assert (expected is None) == all("eval" not in x for x in lines)
        if expected:
            assert any(expected in x for x in lines), lines
    wide = Console(width=100, record=True, color_system=None)
    v.eval = eval_json(ZERO_SHOT)
    wide.print(run_panel(row, v, width=100))  # room for recall beside it
    assert "(chance 0.100) | i2t R@1 0.152" in wide.export_text()


def test_report_eval_has_zero_shot_columns_and_json_figures(world):
    out = cli(world, "report", "eval")
    head = [x for x in out.splitlines() if "0-shot" in x]
    assert head and head[0].split()[:2] == ["0-shot", "0-shot"]
    assert _line(out.replace(" " + DIGITS, DIGITS), DIGITS).split()[1:3] == ["81.2", "98.7"]
    assert _line(out.replace(" " + SYNTH, SYNTH), SYNTH).split()[1:3] == ["-", "-"]
    assert "0-shot: % of the labelled held-out images over 10 classes, chance top-1 10 %" in " ".join(out.split())
    rows = {r["run_id"]: r for r in json.loads(cli(world, "report", "eval", "--json"))["rows"]}
    got = {k: rows[DIGITS][k] for k in rows[DIGITS] if "zero_shot" in k or k == "chance_top1"}
    assert got == {f"zero_shot_{k}": ZERO_SHOT[k] for k in ("top1", "top5", "classes", "n", "templates")} | {
        "chance_top1": 0.1
    }
    assert rows[SYNTH]["zero_shot_top1"] is None


def test_report_eval_with_zero_shot_fits_80_columns_with_run_ids_whole(world):
    out = cli(world, "report", "eval", columns=80)
    assert all(len(x) <= 80 for x in out.splitlines())
    assert all(out.count(r) == 1 for r in (DIGITS, SYNTH, BARE)) and "0-shot" in out and "81.2" in out


def test_report_eval_without_any_zero_shot_has_no_such_column(world):
    out = cli(world, "report", "eval", "--run", SYNTH)
    assert "0-shot" not in out and "15.2" in out


def test_the_end_of_submit_wait_names_zero_shot_beside_recall(world, capsys):
    from clusterctl.cli.cmd_submit import _print_outcome

    runs = world["root"] / "runs"
    _print_outcome(DIGITS, runs / DIGITS, "COMPLETED")
    out = " ".join(capsys.readouterr().out.split())
    assert "held-out eval: zero-shot top-1 0.812 i2t R@1 0.152 i2t R@5 0.400" in out
    assert out.endswith("(chance top-1 0.100, R@1 0.0033)")
    _print_outcome(SYNTH, runs / SYNTH, "COMPLETED")
    out = " ".join(capsys.readouterr().out.split())
    assert "held-out eval: i2t R@1 0.152" in out and "zero-shot" not in out and out.endswith("(chance R@1 0.0033)")
    _print_outcome(BARE, runs / BARE, "COMPLETED")
    assert "eval" not in capsys.readouterr().out


def test_submit_makes_a_relative_data_classes_absolute_like_the_other_data_paths(tmp_path, monkeypatch):
    """The job starts in another directory: data.classes must not stay relative to the submitter's."""
    from clusterctl.runs.submit import absolute_data_paths
    from vltrain.config import load_train_config

    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(None, {"data.shards": "d", "data.classes": "d/eval/classes.json"})
    assert absolute_data_paths(cfg).data.classes == str(tmp_path / "d" / "eval" / "classes.json")


def test_submit_refuses_a_bad_classes_json_before_training(tmp_path):
    """preflight.data (what submit checks before sbatch) reads the classes.json the evaluator would: a
    bad one is a one-line problem now, not an error after the whole run has trained."""
    from clusterctl.runs.preflight import data
    from tests.test_zero_shot import write_labelled
    from vltrain.config import load_train_config

    write_labelled(tmp_path / "d", 4, 0)
    write_labelled(tmp_path / "d" / "eval", 4, 100)
    cfg = load_train_config(None, {"data.shards": str(tmp_path / "d")})
    assert data(cfg) == []
    (tmp_path / "d" / "eval" / "classes.json").write_text('{"classes": ["a", "a"], "templates": ["{}"]}')
    assert data(cfg) == [f"{tmp_path}/d/eval/classes.json: classes: 'a' appears twice; allowed: {ALLOWED}"]
    missing = load_train_config(None, {"data.shards": str(tmp_path / "d"), "data.classes": str(tmp_path / "no")})
    assert data(missing) == [f"data.classes: {tmp_path}/no does not exist; allowed: a classes.json file"]


ALLOWED = "a non-empty list of distinct strings (the class names, in label order)"
