"""Backends' launch specs: sbatch scripts rendered by the Slurm backend (golden files for every
shipped profile), the local backend's spec, and injection guards (clusterctl.backends)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from clusterctl.backends import get_backend
from clusterctl.backends.common import check_job_name, trainer_env
from clusterctl.planning.profiles import builtin_dir, load_profile, read_profile
from vltrain.common.errors import UserError

GOLDEN = Path(__file__).parent / "fixtures" / "sbatch"
SLURM_PROFILES = sorted(p.stem for p in builtin_dir().glob("*.toml") if read_profile(p).executor == "slurm")
RUN_DIR = Path("/scratch/runs/demo-20260101-000000-abcd")
PYTHON = "/opt/venv/bin/python"


def launch_spec(profile, run_dir, job_name, hold=False):
    return get_backend(profile.executor).launch_spec(profile, run_dir, job_name, hold=hold)


def render_sbatch(spec, python=None):
    return get_backend("slurm").dryrun(spec, python=python)


@pytest.mark.parametrize("name", SLURM_PROFILES)
def test_sbatch_matches_recorded_file(name):
    spec = launch_spec(load_profile(name), RUN_DIR, "vltrain-demo")
    text = render_sbatch(spec, python=PYTHON)
    golden = GOLDEN / f"{name}.sh"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"re-record with UPDATE_GOLDEN=1 if the change is intended: {golden}"


def test_a100x64_script_has_what_the_profile_says():
    text = render_sbatch(launch_spec(load_profile("a100x64"), RUN_DIR, "xl"), python=PYTHON)
    for line in (
        "#SBATCH --nodes=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --time=2880",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR2@180",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        "#SBATCH --mem=0",  # exclusive: all of each node's memory
        "export NCCL_IB_HCA==mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_6,mlx5_7,mlx5_8,mlx5_9",  # exact names
        "export NCCL_P2P_LEVEL=NVL",
        "export NCCL_IB_DISABLE=0",
    ):
        assert line in text.splitlines(), line
    assert f"{PYTHON} -P -u -m submitit.core._submit {RUN_DIR}/submitit/%j" in text


def test_local_profile_has_no_sbatch_but_a_local_spec():
    spec = launch_spec(load_profile("local"), RUN_DIR, "demo")
    assert spec.executor == "local" and spec.params["tasks_per_node"] == 1
    assert spec.env["DS_ACCELERATOR"] == "cpu"
    local = get_backend("local")
    assert not local.renders_script and get_backend("slurm").renders_script
    assert local.dryrun(spec) == f"local executor: 1 process(es) on this machine, run dir {RUN_DIR}"
    with pytest.raises(UserError, match="--hold"):
        launch_spec(load_profile("local"), RUN_DIR, "demo", hold=True)


def test_every_executor_a_profile_may_name_has_a_backend():
    from clusterctl.backends import BACKENDS
    from clusterctl.backends.api import Backend
    from clusterctl.specs import EXECUTORS

    assert set(BACKENDS) == set(EXECUTORS)
    for name in EXECUTORS:
        backend = get_backend(name)
        assert isinstance(backend, Backend) and backend.name == name


@pytest.mark.parametrize("name", ["x; rm -rf /", "a\nb", "$(id)", "`id`", "-leading", ""])
def test_bad_job_names_are_refused(name):
    with pytest.raises(UserError, match="--name"):
        check_job_name(name)


@pytest.mark.parametrize("value", ["INFO\n#SBATCH --x", "$(curl x)", "a'b", 'a"b', "`id`", "a\\b"])
def test_profile_env_injection_is_refused(tmp_path, value):
    src = (builtin_dir() / "a100x64.toml").read_text()
    bad = src.replace(
        'inter_node = "infiniband"', 'inter_node = "infiniband"\nenv = { NCCL_DEBUG = ' + json.dumps(value) + " }"
    )
    path = tmp_path / "a100x64.toml"
    path.write_text(bad)
    with pytest.raises(UserError, match=r"interconnect\.env"):
        read_profile(path)


def test_every_script_line_is_inert():
    """Whatever the profile holds, each #SBATCH line is one flag and each export one quoted word."""
    for name in SLURM_PROFILES:
        text = render_sbatch(launch_spec(load_profile(name), RUN_DIR, "n"), python=PYTHON)
        for line in text.splitlines():
            if line.startswith("#SBATCH"):
                assert re.fullmatch(r"#SBATCH --[a-z\-]+(=[^\s;|&`$]+)?", line), line
            if line.startswith("export "):
                assert re.fullmatch(r"export [A-Z_][A-Z0-9_]*=[^\s;|&`$]+", line), line


def test_trainer_env_rejects_unsafe_run_dir():
    with pytest.raises(UserError, match="CLUSTERCTL_RUN_DIR"):
        trainer_env(load_profile("local"), Path("/tmp/x$(id)"))


LEAKED = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "1"}


def job_env():
    """What a job sees: `env` run inside it (a stdlib callable, so the pickle needs no test module)."""
    import functools
    import subprocess

    return functools.partial(subprocess.check_output, ["env"], text=True)


def test_launcher_variables_of_the_submitting_shell_do_not_reach_a_local_job(tmp_path, monkeypatch):
    """A shell holding torch.distributed's variables (a notebook, a job under torchrun) submits: the
    trainer would read them before its executor's (vltrain.distenv.detect) and every rank would train
    alone. The job script unsets them; the rest of the environment still reaches the job."""
    import submitit

    from clusterctl.backends.common import LAUNCHER_VARS

    for k, v in LEAKED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CLUSTERCTL_TEST_KEPT", "yes")
    (tmp_path / "run").mkdir()  # the job starts in its run directory (submit makes it first)
    spec = launch_spec(load_profile("local"), tmp_path / "run", "envcheck")
    assert spec.params["setup"][0] == f"unset {' '.join(LAUNCHER_VARS)}" and set(LEAKED) <= set(LAUNCHER_VARS)
    ex = submitit.LocalExecutor(folder=str(tmp_path / "sub"))
    ex.update_parameters(**spec.params)
    env = dict(line.split("=", 1) for line in ex.submit(job_env()).result().splitlines() if "=" in line)
    assert not set(LEAKED) & set(env), {k: env[k] for k in set(LEAKED) & set(env)}
    assert env["CLUSTERCTL_TEST_KEPT"] == "yes" and env["VLTRAIN_DEVICE"] == "cpu"


def test_only_a_backend_no_scheduler_remembers_recovers_its_jobs_from_files(tmp_path, monkeypatch):
    """Backend.recover_job (registry rebuild, runs.repair): None by default (Slurm: accounting is asked
    on the next refresh); the local backend reads submitit's result, else FAILED once the controller is
    gone (ended when the job's folder last changed), and None while the controller runs."""
    import pickle

    from clusterctl.backends import local
    from clusterctl.specs import JobRecord, RunState
    from vltrain.rundir import RunDir

    folder = RunDir(tmp_path).submitit / "4242"
    folder.mkdir(parents=True)
    (folder / "4242_submitted.pkl").write_bytes(b"\x80\x04N.")
    os.utime(folder / "4242_submitted.pkl", (1000.0, 1000.0))
    job = JobRecord("4242", "r", 1, "submit", 900.0, RunState.UNKNOWN)
    assert get_backend("slurm").recover_job(tmp_path, job, 2) is None
    monkeypatch.setattr(local, "pid_alive", lambda pid: True)
    assert get_backend("local").recover_job(tmp_path, job, 2) is None
    monkeypatch.setattr(local, "pid_alive", lambda pid: False)
    assert get_backend("local").recover_job(tmp_path, job, 2) == {
        "state": RunState.FAILED, "started_at": 900.0, "ended_at": 1000.0, "elapsed_s": 100.0, "alloc_gpus": 2,
    }  # fmt: skip
    result = folder / "4242_0_result.pkl"
    result.write_bytes(pickle.dumps(("success", None), protocol=4))
    os.utime(result, (1100.0, 1100.0))
    assert get_backend("local").recover_job(tmp_path, job, 2) == {
        "state": RunState.COMPLETED, "started_at": 900.0, "ended_at": 1100.0, "elapsed_s": 200.0, "alloc_gpus": 2,
    }  # fmt: skip
