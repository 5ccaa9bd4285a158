"""`report loss` and `report energy --plot` over a real run: two nodes (two torchrun agents on this
machine, one rank each, so each node's local rank 0 measures its own energy with codecarbon), a
curriculum of two stages (MIM + contrastive, then captioning: seed 001's shape), metrics, energy
timelines and eval.json written by the trainer itself.

What is checked: every objective that some stage weights is shown (MIM included), none that no stage
weights (MLM here), each only over the stages that weight it, with the boundary marked; the energy
series of a run is monotone and ends at the sum of its nodes; `report energy` at 80 columns never
folds or cuts a run id."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import tomli_w

from clusterctl.runs.registry import Registry
from clusterctl.specs import RunRecord
from tests.conftest import BIN, REPO, deadline, run_cli, trainer_shards

pytestmark = pytest.mark.slow
STAGES = [
    {"name": "mim+contrastive", "steps": 3},  # [loss] below: itc 1, mim 1
    {"name": "captioning", "loss": {"itc": 0.0, "mim": 0.0, "caption": 1.0}},
]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "VLTRAIN_COUNTRY": "FRA", "VLTRAIN_ENERGY_FLUSH_S": "0.3"}


def staged_config(path: Path, data: Path, steps: int = 6) -> Path:
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
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 2},
        "loss": {"itc": 1.0, "mim": 1.0, "mlm": 0.0, "caption": 0.0},
        "stages": STAGES,
    }
    path.write_text(tomli_w.dumps(cfg))
    return path


def two_node_run(cfg: Path, run_dir: Path) -> None:
    """Two torchrun agents on this machine as nodes 0 and 1 of one job; both stopped if anything fails."""
    from vltrain.distenv import free_port

    port = str(free_port())
    procs = []
    try:
        for node in range(2):
            cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1"]
            cmd += ["--master_addr", "127.0.0.1", "--master_port", port, "-m", "vltrain.cli", "train"]
            cmd += ["--config", str(cfg), "--run-dir", str(run_dir)]
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, env=os.environ | ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        for p in procs:
            out, _ = p.communicate(timeout=deadline(300))
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The real two-node staged run, and a run that never started (no energy, no metrics), in a registry."""
    root = tmp_path_factory.mktemp("report-plots")
    data = trainer_shards(root / "data")
    reg = Registry(root / "reg.db")
    ids = []
    for name, train in (("staged-two-nodes", True), ("never-started", False)):
        run_id = reg.new_run_id(name)
        run_dir = root / "runs" / run_id
        run_dir.mkdir(parents=True)
        created = time.time()
        if train:
            two_node_run(staged_config(root / "cfg.toml", data), run_dir)
        state = "COMPLETED" if train else "FAILED"
        plan = {"estimate": {"energy_kwh": 1e-4, "co2_kg": 5e-6}}
        reg.add_run(
            RunRecord(run_id, name, "slurm-local-2x2", "local", str(run_dir), created, "ann", 2, 6, state, plan=plan)
        )
        ids.append(run_id)
    reg.close()
    env = {"CLUSTERCTL_REGISTRY": str(root / "reg.db"), "PATH": "/nonexistent"}  # no Slurm clients
    return {"env": env, "run": ids[0], "never": ids[1], "run_dir": root / "runs" / ids[0], "db": root / "reg.db"}


def _cli(world, *args, columns="120"):
    r = run_cli("report", *args, env=world["env"] | {"COLUMNS": columns})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_loss_json_has_every_weighted_objective_and_the_stages(world):
    d = json.loads(_cli(world, "loss", world["run"], "--json"))
    logged = [json.loads(line) for line in (world["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert all(m["mlm"] == 0.0 for m in logged) and any(m["mim"] > 0 for m in logged)  # what the trainer logged
    keys = {k for s in d["steps"] for k in s} - {"step"}
    assert keys == {"loss", "itc", "mim", "caption"}  # MIM shown; MLM, weighted 0 in every stage, not
    assert [(s["name"], s["first"], s["last"]) for s in d["stages"]] == [
        ("mim+contrastive", 1, 3),
        ("captioning", 4, 6),
    ]
    assert d["stages"][0]["weights"]["mim"] == 1.0 and d["stages"][1]["weights"]["mim"] == 0.0
    assert [s["step"] for s in d["steps"]] == [1, 2, 3, 4, 5, 6]
    trained = [sorted(k for k, v in s.items() if v is not None and k != "step") for s in d["steps"]]
    assert trained == [["itc", "loss", "mim"]] * 3 + [["caption", "loss"]] * 3  # not trained there: null, not 0


def test_loss_text_is_stage_by_stage(world):
    out = _cli(world, "loss", world["run"])
    first, second = out.split("stage 2/2")
    assert "stage 1/2 mim+contrastive, steps 1-3: itc 1, mim 1" in first
    assert second.startswith(" captioning, steps 4-6: caption 1")
    names = lambda text: {line.split()[0] for line in text.splitlines() if line.startswith("  ")}
    assert names(first) == {"loss", "itc", "mim"} and names(second) == {"loss", "caption"}
    assert "mlm" not in out


def test_loss_plot_draws_each_objective_over_the_stages_that_weight_it(world, tmp_path):
    from clusterctl.render.plots import loss_lines
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.reports import in_stages, loss_report

    report = loss_report(Registry(world["db"]), world["run"], every=True)
    lines, bounds = loss_lines(in_stages(report.stages, report.every), report.keys)
    drawn = {(ln.key, ln.stage): ln.steps for ln in lines}
    assert drawn == {
        ("loss", "mim+contrastive"): (1, 2, 3),  # the total: one segment per stage, no line across the switch
        ("itc", "mim+contrastive"): (1, 2, 3),
        ("mim", "mim+contrastive"): (1, 2, 3),
        ("loss", "captioning"): (4, 5, 6),
        ("caption", "captioning"): (4, 5, 6),
    }
    assert bounds == [3.5]
    out = tmp_path / "loss.png"
    assert "plot written to" in _cli(world, "loss", world["run"], "--plot", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_energy_series_is_monotone_and_sums_the_nodes(world, tmp_path):
    from clusterctl.runs.reports import energy_series
    from clusterctl.runs.usage import parse_timeline

    files = sorted((world["run_dir"] / "energy").glob("node*.timeline.jsonl"))
    assert [f.name[:7] for f in files] == ["node000", "node001"]  # one tracker per node
    per_file = [parse_timeline(f.read_text()) for f in files]
    reg = Registry(world["db"])
    (series,) = energy_series([reg.get_run(world["run"])]).values()
    energy = [e for _, e, _ in series]
    hours = [h for h, _, _ in series]
    assert len(series) >= 3 and hours == sorted(hours)
    assert energy == sorted(energy) and [c for _, _, c in series] == sorted(c for _, _, c in series)
    assert energy[-1] == pytest.approx(sum(pts[-1][1] for pts in per_file), rel=1e-9)
    out = tmp_path / "energy.png"
    _cli(world, "energy", "--plot", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_timeline_line_out_of_order_never_lowers_the_total(world):
    """A node's file that goes back (a line appended late, a tracker restarted into the same file):
    the total holds its highest value, so the series stays monotone."""
    from clusterctl.runs.usage import merge_timelines, parse_timeline

    a, b = (parse_timeline(f.read_text()) for f in sorted((world["run_dir"] / "energy").glob("node*.timeline.jsonl")))
    late = [*a, (a[-1][0] + 1.0, a[0][1], a[0][2])]  # node 0's first total again, after its last
    merged = merge_timelines([late, b])
    assert [e for _, e, _ in merged] == sorted(e for _, e, _ in merged)
    assert merged[-1][1] == pytest.approx(a[-1][1] + b[-1][1], rel=1e-9)


def test_energy_table_at_80_columns_keeps_run_ids_whole(world):
    out = _cli(world, "energy", columns="80")
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    for run_id in (world["run"], world["never"]):
        row = next(line.split() for line in lines if line.split()[:1] == [run_id])  # whole
        assert len(row) > 3, out  # and its figures on the same line: the one-valued columns went below
    assert "grid" in out and "PUE" in out  # said once under the table: the run without energy has none
