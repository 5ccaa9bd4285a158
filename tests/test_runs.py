"""submit / logs / cancel / resume without a cluster: dry runs, bad input, retry decisions."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from clusterctl.runs.registry import Registry
from clusterctl.runs.retry import cluster_failure, should_retry
from clusterctl.specs import JobRecord, RunRecord
from tests.conftest import dry_run_exit, run_cli


@pytest.fixture
def env(tmp_path):
    return {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}


def _job(state, exit_code=None, kind="submit", n=1):
    return JobRecord(
        job_id=str(100 + n), run_id="r", attempt=n, kind=kind, submitted_at=0.0, state=state, exit_code=exit_code
    )


def _run(state="FAILED", max_retries=2):
    return RunRecord("r", "r", "p", "slurm", "/x", 0.0, "u", 2, 10, state, plan={"max_retries": max_retries})


@pytest.mark.parametrize(
    "state, code, expected",
    [
        ("NODE_FAIL", None, True),
        ("FAILED", "75:0", True),  # the trainer's "lost the communicator" code
        ("FAILED", "137:0", True),
        ("FAILED", "0:9", True),  # killed by SIGKILL
        ("FAILED", "9:0", True),  # one rank SIGKILLed under srun: Slurm 22.05 puts the signal in the code field
        ("FAILED", "134:0", True),  # NCCL's watchdog: SIGABRT
        ("FAILED", "6:0", True),
        ("FAILED", "143:0", True),
        ("FAILED", "1:0", False),  # a Python exception in user code
        ("FAILED", "2:0", False),  # a bad config
        ("FAILED", None, False),
        ("TIMEOUT", "0:0", False),  # submitit requeues time-outs itself
        ("CANCELLED", "0:15", False),  # the user cancelled it
        ("COMPLETED", "0:0", False),
    ],
)
def test_cluster_failures_are_told_from_user_failures(state, code, expected):
    assert cluster_failure(_job(state, code)) is expected


def test_retries_stop_at_max_retries():
    first = _job("FAILED", "1:0", "submit", 1)
    assert not should_retry(_run(), [first])
    jobs = [_job("NODE_FAIL", None, "submit", 1)]
    assert should_retry(_run(max_retries=2), jobs)
    jobs += [_job("FAILED", "137:0", "retry", 2)]
    assert should_retry(_run(max_retries=2), jobs)
    jobs += [_job("FAILED", "75:0", "retry", 3)]
    assert not should_retry(_run(max_retries=2), jobs)  # two retries used
    assert not should_retry(_run(max_retries=0), jobs[:1])
    assert not should_retry(_run(state="CANCELLED"), jobs[:1])


def test_only_one_process_claims_a_failed_run(tmp_path):
    reg = Registry(tmp_path / "r.db")
    reg.add_run(_run())

    def claim(_):
        return Registry(tmp_path / "r.db").claim_run("r", "FAILED", "SUBMITTING")

    with ThreadPoolExecutor(8) as ex:
        wins = list(ex.map(claim, range(16)))
    assert sum(wins) == 1 and reg.get_run("r").state == "SUBMITTING"


def test_dry_run_prints_plan_and_sbatch_and_creates_nothing(tmp_path, env):
    r = run_cli(
        "submit",
        "--profile",
        "a100x64",
        "--model",
        "crossmodal-xl",
        "--global-batch",
        "8192",
        "--set",
        "activation_checkpointing=true",
        "--dry-run",
        env=env,
    )
    dry_run_exit(r)
    assert "#SBATCH --nodes=8" in r.stdout and "#SBATCH --gpus-per-node=8" in r.stdout
    assert "export NCCL_IB_HCA==mlx5_0,mlx5_1," in r.stdout and "#SBATCH --signal=USR2@" in r.stdout
    # the split is the planner's (largest micro batch that fits), shown whole: M x A x 64 = 8192
    m = re.search(r"global batch 8192 = micro batch (\d+) x accumulation (\d+) x 64 data-parallel", r.stdout)
    assert m and int(m[1]) * int(m[2]) * 64 == 8192, r.stdout
    assert not (tmp_path / "runs").exists()
    assert Registry(tmp_path / "reg.db").count_runs() == 0


def test_dry_run_json(env):
    r = run_cli("submit", "--profile", "slurm-local", "--dry-run", "--json", "--name", "t1", env=env)
    dry_run_exit(r)
    d = json.loads(r.stdout)
    assert d["executor"] == "slurm" and d["plan"]["world_size"] == 2
    assert (
        d["plan"]["micro_batch"] * d["plan"]["accumulation"] * d["plan"]["data_parallel"] == d["plan"]["global_batch"]
    )
    assert "#SBATCH --partition=debug" in d["sbatch"]


@pytest.mark.parametrize(
    "args, msg",
    [
        (("--profile", "nope"), "error: --profile: "),
        (("--profile", "local", "--set", "optim.lr"), "error: --set: 'optim.lr' is not key=value"),
        (("--profile", "local", "--set", "optim.lr=-1"), "error: --set optim.lr: -1 is out of range"),
        (("--profile", "local", "--model", "huge"), "error: --model: unknown preset 'huge'"),
        (("--profile", "local", "--name", "a;rm -rf /"), "error: --name: 'a;rm -rf /' is not a valid job name"),
        (
            ("--profile", "local", "--global-batch", "7", "--set", "accumulation=2"),
            "error: accumulation: 2 does not divide",
        ),
        (("--profile", "local", "--config", "/nonexistent.toml"), "error: /nonexistent.toml: no such file"),
    ],
)
def test_submit_bad_input_is_one_line_and_leaves_nothing(tmp_path, env, args, msg):
    r = run_cli("submit", *args, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(msg), r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_logs_and_cancel_of_unknown_run(env):
    for cmd in (("logs", "ghost"), ("cancel", "ghost"), ("resume", "ghost")):
        r = run_cli(*cmd, env=env)
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
        assert "ghost" in r.stderr


@pytest.mark.parametrize("profile, device", [("a100x64", "cuda"), ("local", "cpu")])
def test_ds_config_is_the_one_deepspeed_runs_on_the_profiles_device(tmp_path, monkeypatch, profile, device):
    """runs.submit.create writes the DeepSpeed config the trainer builds on the profile's device
    (vltrain.dsconfig.deepspeed_config with that device and the model's parameter count). It wrote the
    CPU one for every profile: on GPUs no overlap_comm, no fused AdamW and DeepSpeed's default buckets."""
    from clusterctl.runs import submit
    from vltrain.dsconfig import deepspeed_config
    from vltrain.model_math import param_count
    from vltrain.presets import resolve_model
    from vltrain.rundir import RunDir

    monkeypatch.setattr(submit, "submit_attempt", lambda reg, run, prof, kind, hold=False, **_: "1")
    reg = Registry(tmp_path / "reg.db")
    p = submit.prepare(profile, None, [], check=False)
    run_id = reg.new_run_id(p.name)
    submit.create(reg, p, run_id, tmp_path / run_id, max_retries=0)
    written = json.loads(RunDir(tmp_path / run_id).ds_config.read_text())
    cfg, world = p.config, p.profile.world_size
    params = param_count(resolve_model(cfg.model))
    want = deepspeed_config(cfg, cfg.micro_batch, cfg.accumulation, world, device=device, params=params)
    assert p.profile.gpu.kind == device
    assert written == json.loads(json.dumps(want))
    other = "cpu" if device == "cuda" else "cuda"
    assert written != json.loads(
        json.dumps(deepspeed_config(cfg, cfg.micro_batch, cfg.accumulation, world, device=other, params=params))
    )


def test_a_read_only_registry_is_followed_not_retried(tmp_path, monkeypatch):
    """A run whose last job failed for the cluster's reason is retried by the commands that refresh,
    except from a read-only registry (what the scheduler says is shown, not saved; status and watch
    skip the retry). `logs --follow` there stopped on the registry's read-only error instead of
    following the run to its end (lifecycle.current_state retried without asking). A registry says
    FAILED with retries left when a report refreshed the run (reports do not retry)."""
    from clusterctl import backends
    from clusterctl.backends.api import Backend, Poll
    from clusterctl.runs import lifecycle
    from clusterctl.specs import RunState

    class Failing(Backend):
        name, initial_state, has_accounting = "slurm", RunState.PENDING, True

        def poll(self, pairs, now, timeout):
            return Poll([{"state": RunState.FAILED, "exit_code": "75:0"} for _ in pairs], source="fake")

    fake = Failing()
    monkeypatch.setattr(backends, "get_backend", lambda executor: fake)
    import clusterctl.runs.status as status_mod

    monkeypatch.setattr(status_mod, "get_backend", lambda executor: fake)
    (tmp_path / "run").mkdir()
    reg = Registry(tmp_path / "r.db")
    reg.add_run(
        RunRecord("r", "r", "p", "slurm", str(tmp_path / "run"), 0.0, "u", 2, 10, "RUNNING", plan={"max_retries": 2})
    )
    reg.add_job("r", "101", "submit")
    reg.update_job("101", "r", state=RunState.FAILED, exit_code="75:0")  # a report refreshed it: no retry there
    reg.set_run_state("r", RunState.FAILED)
    reg.close()
    ro = Registry(tmp_path / "r.db", readonly=True)
    assert lifecycle.current_state(ro, ro.get_run("r")) == RunState.FAILED
    assert [j.job_id for j in Registry(tmp_path / "r.db").jobs("r")] == ["101"]  # nothing submitted
