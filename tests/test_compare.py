"""`clusterctl compare` over real runs: two short local trainings (one process each, the tiny preset,
learning rates 2e-3 and 5e-4) that log metrics.jsonl and evaluate into eval.json at their end, grouped
under a sweep id the way runs.sweep records it (plan["sweep"]); a third run that has logged nothing
yet, in another sweep. Checked: only the config keys that differ, final and best figures as the files
hold them, GPU-hours and cost at the profile's price, sweep-id expansion, the JSON shape, the PNG,
the sparklines, 80 columns, and one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid

import pytest
import tomli_w

from clusterctl.runs.registry import Registry
from clusterctl.runs.sweep import membership
from clusterctl.specs import RunRecord, RunState
from tests.conftest import run_cli, trainer_shards


def _config(path, data, lr, steps):
    cfg = {
        "model": "tiny",
        "global_batch": 8,
        "accumulation": 1,
        "steps": steps,
        "precision": "fp32",
        "seed": 0,
        "log_every": 1,
        "checkpoint_every": 0,
        "data": {"shards": str(data / "shards"), "tokenizer": str(data / "tok.model"), "shuffle_buffer": 64},
        "optim": {"lr": lr, "min_lr": 1e-4, "warmup_steps": 2},
        "loss": {"itc": 1.0, "mim": 1.0, "mlm": 0.0, "caption": 0.0},
    }
    path.write_text(tomli_w.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = trainer_shards(root / "data")
    reg = Registry(root / "reg.db")
    sweep, other = f"sw-{uuid.uuid4().hex[:8]}", f"sw-{uuid.uuid4().hex[:8]}"
    runs = {}
    for i, (name, lr) in enumerate((("lr-high", 2e-3), ("lr-low", 5e-4))):
        run_id = reg.new_run_id(name)
        run_dir = root / "runs" / run_id
        cfg = _config(root / f"{name}.toml", data, lr, steps=5)
        r = run_cli(
            "train", "--config", str(cfg), "--run-dir", str(run_dir), prog="vltrain", env={"OMP_NUM_THREADS": "1"},
            timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        plan = {"sweep": membership(sweep, i, {"optim.lr": lr})}  # as submit --sweep records it
        if i == 1:
            plan["lineage"] = {"from_run": runs["lr-high"][0], "from_step": 2, "weights_only": True}
        reg.add_run(
            RunRecord(run_id, name, "local", "local", str(run_dir), time.time(), "ann", 1, 5, "COMPLETED", plan=plan)
        )
        runs[name] = (run_id, run_dir)
    # the first run ran one GPU-hour (registry times) on a profile priced at 2.5 EUR per GPU-hour
    high_id, high_dir = runs["lr-high"]
    (high_dir / "profile.json").write_text(json.dumps({"name": "local", "cost": {"currency": "EUR", "gpu_hour": 2.5}}))
    start = time.time() - 7200
    reg.add_job(high_id, f"local-{uuid.uuid4().hex[:6]}", "submit", submitted_at=start)
    job = reg.jobs(high_id)[0]
    reg.update_job(job.job_id, high_id, started_at=start, ended_at=start + 3600, state=RunState.COMPLETED)
    # a run that has logged nothing yet (its config: the first run's, 9 steps), in another sweep
    run_id = reg.new_run_id("waiting")
    run_dir = root / "runs" / run_id
    run_dir.mkdir(parents=True)
    text = (high_dir / "config.toml").read_text()
    assert "steps = 5\n" in text
    (run_dir / "config.toml").write_text(text.replace("steps = 5\n", "steps = 9\n"))
    plan = {"sweep": membership(other, 0, {})}
    reg.add_run(
        RunRecord(run_id, "waiting", "local", "local", str(run_dir), time.time(), "ann", 1, 9, "PENDING", plan=plan)
    )
    runs["waiting"] = (run_id, run_dir)
    reg.close()
    env = {"CLUSTERCTL_REGISTRY": str(root / "reg.db"), "PATH": "/nonexistent"}  # no Slurm to ask
    yield {"env": env, "runs": runs, "sweep": sweep, "other": other, "root": root}
    shutil.rmtree(root / "runs", ignore_errors=True)


def _compare(world, *args, columns="80"):
    r = run_cli("compare", *args, env=world["env"] | {"COLUMNS": columns})
    assert r.returncode == 0, r.stderr
    return r.stdout


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_json_differences_figures_and_shape(world):
    d = json.loads(_compare(world, world["sweep"], "waiting", "--json"))
    assert set(d) == {"runs", "differences", "notes"}
    ids = [r["run_id"] for r in d["runs"]]
    assert ids == [world["runs"][n][0] for n in ("lr-high", "lr-low", "waiting")]
    # differences only: the learning rate and the steps, each with every run's value
    assert d["differences"] == {"optim.lr": [2e-3, 5e-4, 2e-3], "steps": [5, 5, 9]}
    high, low, waiting = d["runs"]
    for row, name in ((high, "lr-high"), (low, "lr-low")):
        recs = _metrics(world["runs"][name][1])
        assert row["steps_logged"] == len(recs) == 5
        for k in ("loss", "itc", "mim"):
            vals = [(r["step"], r[k]) for r in recs]
            best = min(vals, key=lambda p: p[1])
            assert row["losses"][k] == {"final": vals[-1][1], "final_step": 5, "best": best[1], "best_step": best[0]}
        assert set(row["losses"]) == {"loss", "itc", "mim"}  # mlm and caption are weighted 0: not shown
        assert row["curve"] == [[r["step"], r["loss"]] for r in recs]
        ev = json.loads((world["runs"][name][1] / "eval.json").read_text())
        assert row["eval"]["i2t_r1"] == ev["i2t"]["R@1"] and row["eval"]["t2i_r10"] == ev["t2i"]["R@10"]
        assert row["eval"]["step"] == ev["step"] == 5
        assert row["sweep"]["id"] == world["sweep"]
    # the two rates trained differently: their curves are not the same numbers
    assert high["curve"] != low["curve"]
    assert high["gpu_hours"] == pytest.approx(1.0, rel=1e-3) and high["gpu_hours_source"] == "registry"
    assert high["money"]["currency"] == "EUR" and high["money"]["total"] == pytest.approx(2.5, rel=1e-3)
    assert low["money"] is None and low["gpu_hours"] == 0  # no price in its profile, no job
    assert high["energy_kwh"] is None  # no codecarbon file: not measured, not 0
    assert low["lineage"] == {"from_run": high["run_id"], "from_step": 2, "weights_only": True}
    assert waiting["steps_logged"] == 0 and waiting["losses"] == {} and waiting["curve"] == []
    assert waiting["eval"] is None and waiting["sweep"]["id"] == world["other"]


@pytest.mark.slow
def test_sweep_id_expands_to_its_runs_once(world):
    high, low = (world["runs"][n][0] for n in ("lr-high", "lr-low"))
    d = json.loads(_compare(world, world["sweep"], "--json"))
    assert [r["run_id"] for r in d["runs"]] == [high, low]  # the sweep's order, not the other sweep's run
    d = json.loads(_compare(world, low, world["sweep"], "--json"))
    assert [r["run_id"] for r in d["runs"]] == [low, high]  # named first, then the sweep's others; once each
    d = json.loads(_compare(world, "lr-high", "--json"))
    assert [r["run_id"] for r in d["runs"]] == [high] and d["differences"] == {}  # one run: nothing differs


@pytest.mark.slow
def test_table_at_80_columns_with_sparklines(world):
    out = _compare(world, world["sweep"], "waiting")
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    for name in ("lr-high", "lr-low", "waiting"):
        assert world["runs"][name][0] in out.split()  # each run id whole
    assert "config: 2 keys differ" in out
    block = lines[
        lines.index("config: 2 keys differ") + 3 : lines.index(next(x for x in lines if x.startswith(" figure")))
    ]
    assert [line.split()[0] for line in block if line] == ["optim.lr", "steps"]  # seed, model...: the same, not shown
    assert block[0].split()[1:] == ["0.002", "0.0005", "0.002"]
    recs = _metrics(world["runs"]["lr-high"][1])
    final = next(line for line in lines if line.startswith(" total loss final"))
    assert f"{recs[-1]['loss']:.4g}" == final.split()[3]  # run A's column
    spark = {line.split()[0]: line for line in lines[lines.index("total loss by step (first -> last logged)") + 1 :]}
    assert set(spark) == {"A", "B", "C"}
    assert any(ch in spark["A"] for ch in "▁▂▃▄▅▆▇█") and any(ch in spark["B"] for ch in "▁▂▃▄▅▆▇█")
    assert "no metrics yet" in spark["C"]
    assert "cost" in out and "2.5 EUR" in out
    ev = json.loads((world["runs"]["lr-low"][1] / "eval.json").read_text())
    r1 = next(line for line in lines if line.startswith(" t2i R@1 %"))
    assert r1.split()[4] == f"{100 * ev['t2i']['R@1']:.1f}"  # run B's column, in percent as report eval
    assert f"from {world['runs']['lr-high'][0]}@2 (weights only)" in out


@pytest.mark.slow
def test_plot_writes_a_png(world):
    png = world["root"] / "cmp.png"
    out = _compare(world, world["sweep"], "waiting", "--plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert f"plot written to {png}" in out


@pytest.mark.slow
def test_bad_input_is_one_line(world):
    for args, words in (
        (("ghost",), ("RUN|SWEEP", "'ghost'", "sweep id")),
        (("lr-high", "ghost"), ("'ghost'",)),
        (("lr-high", "--plot", str(world["root"] / "x.jpg")), ("--plot", ".png")),
        (("lr-high", "--plot", str(world["root"] / "no" / "x.png")), ("--plot", "does not exist")),
    ):
        r = run_cli("compare", *args, env=world["env"])
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr
        assert all(w in r.stderr for w in words), r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (world["root"] / "x.jpg").exists()


# --- the pure parts -------------------------------------------------------------------------------


def test_config_differences_only():
    from clusterctl.runs.compare import ABSENT, config_differences, flatten

    a = {"optim": {"lr": 1e-3, "warmup": 10}, "steps": 5, "stages": [{"n": 1}], "flag": True}
    b = {"optim": {"lr": 1e-3, "warmup": 20}, "steps": 5, "stages": [{"n": 2}], "flag": 1}
    c = {"optim": {"lr": 1e-3}, "steps": 5, "stages": [{"n": 1}], "flag": True}
    assert flatten(a) == {"optim.lr": 1e-3, "optim.warmup": 10, "steps": 5, "stages": [{"n": 1}], "flag": True}
    diffs = config_differences([a, b, c])
    assert diffs == {
        "flag": [True, 1, True],  # True == 1 in Python, but not the same setting
        "optim.warmup": [10, 20, ABSENT],
        "stages": [[{"n": 1}], [{"n": 2}], [{"n": 1}]],
    }
    assert config_differences([a]) == {} and config_differences([a, dict(a)]) == {}


def test_best_and_final_figures():
    from clusterctl.runs.compare import loss_figures

    rows = [
        {"step": 1, "loss": 5.0, "itc": None},
        {"step": 2, "loss": 2.0, "itc": 3.0},
        {"step": 3, "loss": 4.0, "itc": 1.0},
        {"step": 4, "loss": math.nan},
    ]
    f = loss_figures(rows, ["loss", "itc", "mim"])
    assert f["loss"]["best"] == 2.0 and f["loss"]["best_step"] == 2
    assert math.isnan(f["loss"]["final"]) and f["loss"]["final_step"] == 4  # diverged: shown as such
    assert f["itc"] == {"final": 1.0, "final_step": 3, "best": 1.0, "best_step": 3}
    assert "mim" not in f  # never logged


def test_grid_fits_the_width_in_blocks_and_letters():
    from clusterctl.render.compare_view import grid, letter, sparkline

    assert [letter(i) for i in (0, 25, 26, 27, 701, 702)] == ["A", "Z", "AA", "AB", "ZZ", "AAA"]
    heads = [letter(i) for i in range(12)]
    rows = [("total loss final", [f"{i}.12345" for i in range(12)]), ("GPU-hours", ["1"] * 12)]
    lines = grid("figure", rows, heads, 80)
    assert all(len(line) <= 80 for line in lines)
    shown = [w for line in lines if line.startswith(" total loss final") for w in line.split()[3:]]
    assert shown == [f"{i}.12345" for i in range(12)]  # every run's value, whole, over several blocks
    assert sum(line.startswith(" figure") for line in lines) >= 2
    assert len(grid("figure", rows, heads, None)) == 5  # no width: one block
    s = sparkline([(i, float(100 - i)) for i in range(100)], width=10)
    assert len(s) == 10 and s[0] == "█" and s[-1] == "▁"


def test_thin_keeps_ends():
    from clusterctl.runs.compare import thin

    pts = [(float(i), float(i)) for i in range(1000)]
    t = thin(pts, 50)
    assert len(t) == 50 and t[0] == pts[0] and t[-1] == pts[-1]
    assert thin(pts[:10], 50) == pts[:10]


def test_long_config_values_get_lines_of_their_own_folded_not_cut():
    from clusterctl.render.compare_view import differences

    stages = [
        [{"name": f"stage-{i}", "steps": 1000 * (i + 1), "loss": {"itc": 1.0, "mim": 0.5}} for i in range(n)]
        for n in (3, 4)
    ]
    diffs = {"optim.lr": [1e-3, 2e-3], "stages": stages}
    lines = differences(diffs, ["A", "B"], 80)
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert next(line for line in lines if line.startswith(" optim.lr")).split() == ["optim.lr", "0.001", "0.002"]
    i = lines.index(" stages")
    b = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("    B "))
    a_text = " ".join(line.strip() for line in lines[i + 1 : b]).removeprefix("A").strip()
    assert json.loads(a_text) == stages[0]  # every run's value whole, folded at its spaces
    b_text = " ".join(line.strip() for line in lines[b:] if line).removeprefix("B").strip()
    assert json.loads(b_text) == stages[1]
