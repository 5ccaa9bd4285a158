"""Hostile and unlucky input (issue 15): nothing accepted that cannot run, every refusal one line that
names the flag, field or file. Each case failed on the code before (a traceback, a NaN accepted, a
silent shadowing, an unbounded search, a path Slurm mangles)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, deadline, dry_run_exit, one_line_error, run_cli


# --- 1. NaN and infinity pass no check ------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting, starts",
    [
        ("loss.itc=nan", "error: --set loss.itc: nan is not a finite number"),
        ("optim.lr=nan", "error: --set optim.lr: nan is not a finite number"),
        ("optim.warmup_fraction=nan", "error: --set optim.warmup_fraction: nan is not a finite number"),
        ("optim.lr=inf", "error: --set optim.lr: inf is not a finite number"),
        ("loss.caption=-inf", "error: --set loss.caption: -inf is not a finite number"),
    ],
)
def test_non_finite_config_values_are_refused_at_submit(env, setting, starts):
    one_line_error(run_cli("submit", "--profile", "local", "--set", setting, "--dry-run", env=env), starts)


@pytest.mark.parametrize("field, value", [("memory_gib", "nan"), ("peak_bf16_tflops", "nan"), ("power_w", "inf")])
def test_non_finite_profile_values_are_refused(tmp_path, field, value):
    src = (REPO / "cluster_profiles" / "a100x64.toml").read_text()
    head, gpu = src.split("[gpu]\n", 1)
    path = tmp_path / "a100x64.toml"
    path.write_text(head + "[gpu]\n" + re.sub(rf"(?m)^{field} = .*$", f"{field} = {value}", gpu, count=1))
    r = run_cli("profiles", "validate", str(path))
    one_line_error(r, f"error: {path}: gpu.{field}: {value} is not a finite number")


@pytest.mark.parametrize(
    "args, starts",
    [
        (("--hours", "nan"), "error: --hours: nan is not valid"),
        (("--hours", "inf"), "error: --hours: inf is not valid"),
        (("--duration", "6w", "--node-power-w", "-1000"), "error: --node-power-w: -1000 is not valid"),
        (
            ("--duration", "6w", "--pue", "0.5"),
            "error: --pue: 0.5 is not valid; allowed: a finite number >= 1 and <= 3",
        ),
        (("--duration", "6w", "--mfu", "nan"), "error: --mfu: nan is not valid"),
        (("--duration", "6w", "--claimed-gpu-hours", "0"), "error: --claimed-gpu-hours: 0 is not valid"),
        (("--tokens", "1e400", "--params", "1B"), "error: --tokens: '1e400' is not a count"),
    ],
)
def test_estimate_numbers_are_finite_and_in_range(args, starts):
    one_line_error(run_cli("estimate", "--profile", "a100x32", *args), starts)


# --- 6. profiles from the working directory -----------------------------------------------------------
def _shadow(tmp_path: Path, extra_env: str = "") -> Path:
    cwd = tmp_path / "cloned-repo"
    (cwd / "cluster_profiles").mkdir(parents=True)
    src = (REPO / "cluster_profiles" / "a100x64.toml").read_text()
    if extra_env:
        src = src.replace('inter_node = "infiniband"', f'inter_node = "infiniband"\nenv = {{ {extra_env} }}')
    (cwd / "cluster_profiles" / "a100x64.toml").write_text(src)
    return cwd


def test_a_profile_from_the_working_directory_says_so_and_that_it_shadows_the_shipped_one(env, tmp_path):
    cwd = _shadow(tmp_path)
    r = run_cli("plan", "--profile", "a100x64", env=env, cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert (
        f"profile a100x64 from the working directory ({cwd / 'cluster_profiles'}), shadowing the shipped one"
        in r.stdout
    )
    r = run_cli("submit", "--profile", "a100x64", "--dry-run", "--json", env=env, cwd=cwd)
    assert '"profile_source": "the working directory' in r.stdout
    r = run_cli("profiles", "show", "a100x64", env=env, cwd=cwd)
    assert "source: the working directory" in r.stdout and "shadowing the shipped one" in r.stdout


@pytest.mark.parametrize("var", ["LD_PRELOAD", "PYTHONPATH", "BASH_ENV", "PYTHONWARNINGS", "NCCL_NET_PLUGIN"])
def test_code_loading_env_from_a_cloned_repo_is_refused(env, tmp_path, var):
    cwd = _shadow(tmp_path, f'{var} = "/tmp/x"')
    r = run_cli("submit", "--profile", "a100x64", "--dry-run", env=env, cwd=cwd)
    one_line_error(r, f"error: {cwd / 'cluster_profiles' / 'a100x64.toml'}: interconnect.env: {var} ")
    assert "--allow-env" in r.stderr and "the working directory" in r.stderr
    r = run_cli("submit", "--profile", "a100x64", "--dry-run", "--allow-env", env=env, cwd=cwd)
    dry_run_exit(r)


def test_the_users_own_profiles_may_set_it(env, tmp_path):
    mine = tmp_path / "config" / "clusterctl" / "profiles"
    mine.mkdir(parents=True)
    src = (REPO / "cluster_profiles" / "a100x64.toml").read_text().replace('name = "a100x64"', 'name = "mine"')
    (mine / "mine.toml").write_text(
        src.replace(
            'inter_node = "infiniband"', 'inter_node = "infiniband"\nenv = { LD_LIBRARY_PATH = "/opt/nccl/lib" }'
        )
    )
    r = run_cli("plan", "--profile", "mine", env=env, cwd=tmp_path)
    assert r.returncode == 0 and f"profile mine from your config ({mine})" in r.stdout, r.stdout + r.stderr


# --- 7. unbounded work and what clusterctl owns -------------------------------------------------------
def test_a_huge_global_batch_is_refused_fast(env):
    t = time.monotonic()
    r = run_cli("plan", "--profile", "a100x64", "--global-batch", str(10**18), env=env)
    one_line_error(
        r, "error: --global-batch: 1000000000000000000 is out of range; allowed: an integer from 1 to 10,000,000"
    )
    assert time.monotonic() - t < deadline(10)  # a guard against unbounded work, not a benchmark


@pytest.mark.parametrize(
    "line, starts",
    [
        ('time_limit = "400-00:00:00"', "slurm.time_limit: '400-00:00:00' is longer than 365 days"),
        *[
            (f'extra = {{ "{opt}" = "1" }}', f"slurm.extra: '{opt}' is set by clusterctl from the profile")
            for opt in ("array", "requeue", "hold", "export", "output", "error")
        ],
    ],
)
def test_slurm_fields_clusterctl_owns_or_slurm_would_change(tmp_path, line, starts):
    src = (REPO / "cluster_profiles" / "a100x64.toml").read_text()
    src = (
        re.sub(r"(?m)^time_limit = .*$", line, src)
        if line.startswith("time_limit")
        else src.replace("[slurm]\n", f"[slurm]\n{line}\n")
    )
    path = tmp_path / "a100x64.toml"
    path.write_text(src)
    one_line_error(run_cli("profiles", "validate", str(path)), f"error: {path}: {starts}")


# --- 8. paths Slurm would expand -----------------------------------------------------------------------
def test_a_percent_in_the_runs_directory_is_refused(env, tmp_path):
    r = run_cli(
        "submit", "--profile", "slurm-local", "--dry-run", env=env | {"CLUSTERCTL_RUNS_DIR": str(tmp_path / "50%")}
    )
    one_line_error(r, f"error: run directory: '{tmp_path / '50%'}/")
    assert "contains '%', which Slurm expands in log file names" in r.stderr
