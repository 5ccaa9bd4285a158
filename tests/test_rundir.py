"""The contract between clusterctl and vltrain (vltrain.rundir): what the launcher sets is what the
trainer reads, and the run directory's log names are submitit's own."""

from __future__ import annotations

from pathlib import Path

from clusterctl.backends.common import trainer_env
from clusterctl.planning.profiles import load_profile
from tests.conftest import run_cli
from vltrain import metrics
from vltrain.rundir import JobEnv, RunDir


def test_what_the_launcher_sets_the_trainer_reads():
    prof = load_profile("a100x64")
    env = trainer_env(prof, Path("/scratch/runs/r1"))
    seen = JobEnv.from_env(env)
    assert seen == JobEnv(
        run_dir="/scratch/runs/r1", profile="a100x64", peak_tflops=312.0, country="FRA", pue=1.2, device="cuda"
    )
    assert metrics.peak_tflops("NVIDIA H100 80GB HBM3", env) == 312.0  # the profile's peak wins over the table


def test_unreadable_figures_fall_back_instead_of_failing_the_job():
    env = JobEnv.from_env({JobEnv.PEAK_TFLOPS: "fast", JobEnv.PUE: "nan", JobEnv.COUNTRY: ""})
    assert env.peak_tflops is None and env.pue == 1.0 and env.country is None
    assert metrics.peak_tflops("NVIDIA A100-SXM4-80GB", {JobEnv.PEAK_TFLOPS: "fast"}) is None  # set: it wins


def test_task_logs_are_where_submitit_writes_them():
    from submitit.core.utils import JobPaths

    rd = RunDir("/scratch/runs/r1")
    paths = JobPaths(rd.submitit / "%j", job_id="1234", task_id=3)
    assert rd.task_log("1234", 3) == paths.stdout and rd.task_log("1234", 3, stderr=True) == paths.stderr
    assert rd.result_pickles("1234")[0] == JobPaths(rd.submitit / "%j", job_id="1234", task_id=0).result_pickle


def test_vltrain_train_takes_the_run_directory_from_the_job_environment(tmp_path):
    """CLUSTERCTL_RUN_DIR was set for every rank and read by nothing; `vltrain train` now defaults to it."""
    r = run_cli(
        "train", "--set", "data.shards=/nonexistent/shards", prog="vltrain", env={JobEnv.RUN_DIR: str(tmp_path / "run")}
    )
    assert r.returncode == 2 and "data.shards" in r.stderr and "--run-dir" not in r.stderr, r.stderr
    r = run_cli("train", "--set", "data.shards=/nonexistent/shards", prog="vltrain", env={JobEnv.RUN_DIR: ""})
    assert r.returncode == 2 and "--run-dir" in r.stderr, r.stderr
