"""Sweeps (issue 28 point 1): `submit --sweep key=v1,v2 [--sweep-file F] [--max-parallel N]`.

Pure: the grid, value parsing, the sweep file, the job array's spec. CLI: one-line errors, the
dry-run listing. On the real local Slurm cluster (slurm + slow): one job array whose points each
COMPLETE in their own run directory with their own value, `status`/`logs` per point, a retry of one
killed point that leaves the other alone, and `cancel SWEEP`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from clusterctl.runs import sweep as sw
from tests.conftest import (
    cancel_slurm_jobs_under,
    no_scheduler,
    one_line_error,
    run_cli,
    slurm_rank_processes,
    slurm_up,
    tiny_data,
    trainer_shards,
    wait_until,
)
from vltrain.common.errors import UserError

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


# --- pure ---------------------------------------------------------------------------------------


def test_the_grid_crosses_every_key_first_axis_slowest_values_parsed_as_set_takes_them():
    axes = sw.parse_axes(["optim.lr=1e-4,3e-4", 'model="tiny",small', "optim.betas=[0.9, 0.95],[0.8,0.9]"])
    assert axes[0] == ("optim.lr", [1e-4, 3e-4])
    assert axes[1] == ("model", ["tiny", "small"])  # a TOML string, and a bare word as a string
    assert axes[2] == ("optim.betas", [[0.9, 0.95], [0.8, 0.9]])  # commas inside brackets stay
    points = sw.grid(axes)
    assert len(points) == 8
    assert points[0] == {"optim.lr": 1e-4, "model": "tiny", "optim.betas": [0.9, 0.95]}
    assert points[1]["optim.betas"] == [0.8, 0.9] and points[4]["optim.lr"] == 3e-4
    assert sw.parse_axes(["seed=1"]) == [("seed", [1])]


@pytest.mark.parametrize(
    ("item", "says"),
    [("optim.lr", "is not key=v1,v2"), ("=1,2", "is not key=v1,v2"), ("seed=1,,2", "has an empty value")],
)
def test_a_malformed_sweep_is_one_line_naming_the_flag_and_the_shape(item, says):
    with pytest.raises(UserError) as e:
        sw.parse_axes([item])
    assert str(e.value).startswith("--sweep") and says in str(e.value) and "allowed:" in str(e.value)


def test_a_key_swept_twice_or_by_both_flag_and_file_is_refused():
    with pytest.raises(UserError, match="--sweep seed: given twice"):
        sw.parse_axes(["seed=1", "seed=2"])
    with pytest.raises(UserError, match="also set by --sweep-file"):
        sw.combine(sw.parse_axes(["seed=1,2"]), [{"seed": 3}])
    with pytest.raises(UserError, match="at most 1000"):
        sw.combine(
            sw.parse_axes(["seed=" + ",".join(map(str, range(40))), "steps=" + ",".join(map(str, range(30)))]), None
        )


def test_a_sweep_file_lists_points_in_json_or_toml_and_crosses_with_the_grid(tmp_path):
    j = tmp_path / "points.json"
    j.write_text(json.dumps([{"optim.lr": 1e-3}, {"optim": {"lr": 2e-3, "warmup_steps": 5}}]))
    assert sw.read_points(j) == [{"optim.lr": 1e-3}, {"optim.lr": 2e-3, "optim.warmup_steps": 5}]
    t = tmp_path / "points.toml"
    t.write_text('[[point]]\n"optim.lr" = 1e-3\n\n[[point]]\noptim.lr = 2e-3\n')
    listed = sw.read_points(t)
    assert listed == [{"optim.lr": 1e-3}, {"optim.lr": 2e-3}]
    crossed = sw.combine(sw.parse_axes(["seed=1,2"]), listed)
    assert crossed == [{"optim.lr": 1e-3, "seed": 1}, {"optim.lr": 1e-3, "seed": 2}, {"optim.lr": 2e-3, "seed": 1},
                       {"optim.lr": 2e-3, "seed": 2}]  # fmt: skip
    for bad, says in (("{}", "no list of points"), ("[1, 2]", "no list of points"), ("[{", "not valid JSON")):
        j.write_text(bad)
        with pytest.raises(UserError, match=f"--sweep-file: {j}: .*{says}"):
            sw.read_points(j)
    with pytest.raises(UserError, match="cannot read"):
        sw.read_points(tmp_path / "missing.toml")


def test_the_difference_is_the_resolved_configs_not_only_the_point():
    base = {"model": "tiny", "optim": {"lr": 2e-3, "warmup_steps": 4}, "seed": 0}
    point = {"model": "tiny", "optim": {"lr": 1e-3, "warmup_steps": 4}, "seed": 0, "steps": 9}
    diff = sw.difference(base, point)
    assert diff == {"optim.lr": [2e-3, 1e-3], "steps": [None, 9]}
    assert sw.describe(diff) == "optim.lr=0.001 (was 0.002), steps=9 (was null)"
    assert sw.describe({}) == "no difference from the base config"


def test_the_array_spec_runs_each_tasks_own_setup_in_one_script(tmp_path):
    from clusterctl.backends.slurm.array import array_spec
    from clusterctl.backends.slurm.backend import BACKEND
    from clusterctl.planning.profiles import load_profile

    prof = load_profile("slurm-local")
    dirs = [tmp_path / "runs" / f"r{i}" for i in range(3)]
    specs = [BACKEND.launch_spec(prof, d, "sw") for d in dirs]
    spec = array_spec(specs, tmp_path / "runs" / "sweep", max_parallel=2)
    assert spec.folder == str(tmp_path / "runs" / "sweep" / "tasks" / "%a" / "submitit" / "%A_%a")
    assert spec.params["array_parallelism"] == 2 and spec.params["additional_parameters"]["hold"] is True
    setup = spec.params["setup"]
    for i, d in enumerate(dirs):  # task i changes into point i's run directory, and only task i
        branch = setup[setup.index(f"{i})") : setup.index(";;", setup.index(f"{i})"))]
        assert f"cd {d.absolute()} || exit 1" in branch
        assert [line for line in branch if line.startswith("cd ")] == [f"cd {d.absolute()} || exit 1"]
    assert setup[0] == 'case "${SLURM_ARRAY_TASK_ID:-}" in' and setup[-1] == "esac"
    other = BACKEND.launch_spec(prof, dirs[0], "sw", exclude=("a1",))
    with pytest.raises(UserError, match="point 1's Slurm job differs from point 0's in additional_parameters"):
        array_spec([specs[0], other], tmp_path / "runs" / "sweep", max_parallel=2)


def test_an_array_tasks_job_id_is_the_one_squeue_and_the_registry_use():
    from vltrain.rundir import scheduler_job_id

    assert scheduler_job_id({"SLURM_JOB_ID": "844", "SLURM_ARRAY_JOB_ID": "841", "SLURM_ARRAY_TASK_ID": "3"}) == "841_3"
    assert scheduler_job_id({"SLURM_JOB_ID": "844"}) == "844"
    assert scheduler_job_id({"SUBMITIT_LOCAL_JOB_ID": "123"}) == "123" and scheduler_job_id({}) is None


def test_a_sweep_id_finds_its_runs_in_point_order_and_filters_reports(tmp_path):
    from clusterctl.runs.registry import Registry
    from clusterctl.specs import RunRecord

    reg = Registry(tmp_path / "r.db")
    sid = "m-sweep-20260101-000000-abcd"
    for run_id, created, plan in (
        ("b", 1.0, {"sweep": sw.membership(sid, 1, {"seed": 2})}),
        ("a", 2.0, {"sweep": sw.membership(sid, 0, {"seed": 1})}),
        ("c", 3.0, {"sweep": sw.membership("other-sweep-x", 0, {})}),
        ("d", 4.0, {}),
    ):
        reg.add_run(
            RunRecord(run_id, run_id, "p", "slurm", str(tmp_path / run_id), created, "u", 1, 4, "PENDING", plan=plan)
        )
    reg._conn.execute("UPDATE runs SET plan = 'not json' WHERE run_id = 'd'")  # a damaged plan is no sweep's
    assert [r.run_id for r in sw.runs_of(reg, sid)] == ["a", "b"]  # point order, not submission order
    assert sw.runs_of(reg, "a") == [] and sw.expand(reg, [sid, "d"]) == ["a", "b", "d"]
    assert sw.run_filter(reg, sid) == {"run_id": None, "sweep": sid}
    assert sw.run_filter(reg, "c") == {"run_id": "c"} and sw.run_filter(reg, None) == {"run_id": None}
    assert sorted(r.run_id for r, _ in reg.index(sweep=sid)) == ["a", "b"]


# --- the CLI -------------------------------------------------------------------------------------


def test_the_dry_run_lists_each_points_resolved_difference_and_submits_nothing(tmp_path, env):
    d = trainer_shards(tmp_path / "data")
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 6\nprecision = "fp32"\n[data]\nshards = "{d / "shards"}"\n'
        f'tokenizer = "{d / "tok.model"}"\n[optim]\nlr = 2e-3\n'
    )
    env = env | no_scheduler(tmp_path)
    args = ["submit", "--profile", "slurm-local", "--config", str(cfg), "--sweep", "optim.lr=1e-3,3e-3"]
    r = run_cli(*args, "--sweep", "seed=1,2", "--dry-run", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [p["point"] for p in out["points"]] == [
        {"optim.lr": 1e-3, "seed": 1}, {"optim.lr": 1e-3, "seed": 2},
        {"optim.lr": 3e-3, "seed": 1}, {"optim.lr": 3e-3, "seed": 2},
    ]  # fmt: skip
    assert out["points"][3]["difference"] == {"optim.lr": [2e-3, 3e-3], "seed": [0, 2]}
    assert out["executor"] == "slurm" and out["max_parallel"] == 4
    r = run_cli(*args, "--dry-run", "--max-parallel", "1", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "2 points" in lines[0] and "at most 1 at once" in lines[0] and "nothing submitted" in lines[0]
    assert lines[1].split() == ["0", "optim.lr=0.001", "(was", "0.002)"], lines
    assert lines[2].split()[:2] == ["1", "optim.lr=0.003"], lines
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reg.db").exists()


def test_an_unknown_key_is_refused_as_set_refuses_it_naming_sweep(tmp_path, env):
    env = env | no_scheduler(tmp_path)
    r = run_cli("submit", "--profile", "slurm-local", "--sweep", "optim.lrr=1e-3,2e-3", "--dry-run", env=env)
    one_line_error(r, "error: --sweep")
    assert "unknown key" in r.stderr and "lr" in r.stderr
    r = run_cli("submit", "--profile", "slurm-local", "--sweep", "optim.lr=1e-3", "--wait", env=env)
    one_line_error(r, "error: --wait: not with --sweep")
    bad = tmp_path / "p.toml"
    bad.write_text("x = 1\n")
    r = run_cli("submit", "--profile", "slurm-local", "--sweep-file", str(bad), "--dry-run", env=env)
    one_line_error(r, f"error: --sweep-file: {bad}: holds no list of points")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_on_the_local_executor_the_points_run_one_after_another(tmp_path, env):
    """No scheduler: submit runs point 1 once point 0 has ended, each a normal local run (2 x ~25 s)."""
    d = trainer_shards(tmp_path / "data")
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 2\nprecision = "fp32"\nlog_every = 1\n[data]\n'
        f'shards = "{d / "shards"}"\ntokenizer = "{d / "tok.model"}"\n'
    )
    r = run_cli(
        "submit", "--profile", "local", "--config", str(cfg), "--sweep", "seed=1,2", "--json", env=env, timeout=300
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert [x["state"] for x in out["runs"]] == ["COMPLETED", "COMPLETED"], out
    assert "one after another" in r.stderr  # progress on stderr: stdout stays one JSON document
    from clusterctl.runs.registry import Registry

    reg = Registry(Path(env["CLUSTERCTL_REGISTRY"]))
    runs = sw.runs_of(reg, out["sweep_id"])
    assert [r.run_id for r in runs] == [x["run_id"] for x in out["runs"]]
    first_ended = (Path(runs[0].run_dir) / "metrics.jsonl").stat().st_mtime
    assert runs[1].created_at >= first_ended, "point 1 was submitted before point 0 had ended"
    for run, seed in zip(runs, (1, 2)):
        assert f"seed = {seed}" in (Path(run.run_dir) / "config.toml").read_text()
        assert run.plan["sweep"]["point"] == {"seed": seed}


# --- on the local Slurm cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    root = tmp_path_factory.mktemp("sweep")
    data, tok = tiny_data(root)
    cfg = root / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 12\nprecision = "fp32"\nlog_every = 1\n'
        f'checkpoint_every = 4\nkeep_checkpoints = 2\n[data]\nshards = "{data}"\ntokenizer = "{tok}"\n'
        f"[optim]\nlr = 1e-3\nwarmup_steps = 4\n"
    )
    env = {"CLUSTERCTL_REGISTRY": str(root / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(root / "runs")}
    yield {"root": root, "cfg": cfg, "env": env}
    cancel_slurm_jobs_under(root)


def _sweep(world, name, *extra):
    args = ["submit", "--profile", "slurm-local", "--config", str(world["cfg"]), "--name", name, "--json"]
    r = run_cli(*args, *extra, env=world["env"])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _status(world, ref):
    r = run_cli("status", ref, "--json", env=world["env"])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["runs"]


def _task_rank(array_id: str, task: int, rank: int) -> list[int]:
    """The processes of one rank of one array task on this machine (its SLURM_JOB_ID is the task's own)."""
    found = slurm_rank_processes(rank, SLURM_ARRAY_JOB_ID=array_id, SLURM_ARRAY_TASK_ID=str(task))
    return [pid for pid, _ in found]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_is_one_job_array_and_a_killed_point_is_retried_alone(world):
    """Two points as array tasks <A>_0 and <A>_1; task 1's rank 1 is SIGKILLed after a checkpoint: its
    follow-up (afternotok:<A>_1) retries that run as an ordinary job; point 0 completes untouched."""
    out = _sweep(world, "swa", "--sweep", "optim.lr=1e-3,2e-3", "--max-parallel", "2", "--max-retries", "1")
    sweep_id, runs = out["sweep_id"], out["runs"]
    try:
        array = runs[0]["job_id"].split("_")[0]
        assert [r["job_id"] for r in runs] == [f"{array}_0", f"{array}_1"], runs
        dirs = [Path(r["run_dir"]) for r in runs]
        wait_until(lambda: list((dirs[1] / "checkpoints").glob("step_*")), 300, "point 1's first checkpoint")
        pids = wait_until(lambda: _task_rank(array, 1, 1), 60, "point 1's rank 1 running here")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

        def settled():
            rows = _status(world, sweep_id)  # a command: it also retries, as the follow-up would
            return rows if all(r["state"] in ENDED for r in rows) and len(rows[1]["job_ids"]) == 2 else None

        rows = wait_until(settled, 400, lambda: f"the sweep's runs to end: {_status(world, sweep_id)}")
        assert [r["run_id"] for r in rows] == [r["run_id"] for r in runs]
        assert [r["state"] for r in rows] == ["COMPLETED", "COMPLETED"], rows
        assert rows[0]["job_ids"] == [f"{array}_0"], rows[0]  # the other point: one attempt, untouched
        first, retry = rows[1]["job_ids"]
        assert first == f"{array}_1" and "_" not in retry, rows[1]  # the retry: an ordinary job of that run
        assert (dirs[1] / "submitit" / retry / f"{retry}_submission.sh").is_file()
        for i, (d, lr) in enumerate(zip(dirs, (1e-3, 2e-3))):  # each point's value in its own run directory
            assert f"lr = {lr}" in (d / "config.toml").read_text()
            plan = json.loads((d / "plan.json").read_text())
            assert plan["sweep"] == {"id": sweep_id, "index": i, "point": {"optim.lr": lr}}
            log = run_cli("logs", runs[i]["run_id"], "--job", f"{array}_{i}", env=world["env"])
            assert log.returncode == 0 and "step" in log.stdout.lower(), log.stderr
            assert (d / "submitit" / f"{array}_{i}" / f"{array}_{i}_0_log.out").is_file()
            # the trainer's and provenance's job id is the task's as squeue/sacct/the registry name it
            start = json.loads((d / "events.jsonl").read_text().splitlines()[0])
            assert start["event"] == "start" and start["job_id"] == f"{array}_{i}", start
            assert {json.loads(h.read_text())["job_id"] for h in (d / "hosts").glob(f"*job{array}_{i}-r0*")} == {
                f"{array}_{i}"
            }
        r = run_cli("report", "gpu-hours", "--run", sweep_id, "--json", env=world["env"])  # the sweep's runs
        assert r.returncode == 0, r.stderr
        assert sorted(row["key"] for row in json.loads(r.stdout)["rows"]) == sorted(x["run_id"] for x in runs)
    finally:
        run_cli("cancel", sweep_id, env=world["env"])


@pytest.mark.slurm
@pytest.mark.slow
def test_cancel_takes_the_sweep_id_and_cancels_every_point(world):
    out = _sweep(world, "swc", "--sweep", "seed=1,2,3", "--hold")
    sweep_id = out["sweep_id"]
    r = run_cli("cancel", sweep_id, env=world["env"])
    assert r.returncode == 0, r.stderr
    assert sorted(line.split()[1] for line in r.stdout.splitlines()) == sorted(x["run_id"] for x in out["runs"])
    rows = _status(world, sweep_id)
    assert [x["state"] for x in rows] == ["CANCELLED"] * 3, rows
    array = out["runs"][0]["job_id"].split("_")[0]
    q = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i %T"], capture_output=True, text=True, timeout=60)
    assert all("PENDING" not in line and "RUNNING" not in line for line in q.stdout.splitlines()), q.stdout
    r = run_cli("cancel", sweep_id, env=world["env"])
    assert r.returncode == 0 and "no run still pending or running" in r.stdout, r.stdout + r.stderr
