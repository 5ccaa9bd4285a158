"""`clusterctl profiles calibrate`: the [calibration] table written into a profile's text (comments and
other tables kept, checked before it lands), the aggregate over ranks, the command's one-line errors, a
real local-executor job and one real 2-node Slurm job (clusterctl.runs.calibrate, runs.calibration_file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from clusterctl.planning.profiles import builtin_dir, read_profile
from clusterctl.runs import calibration_file
from clusterctl.runs.calibrate import aggregate
from tests.conftest import (
    REPO,
    cancel_slurm_jobs_under,
    deadline,
    no_scheduler,
    one_line_error,
    run_cli,
    slurm_up,
    wait_until,
)
from vltrain.common.errors import UserError


def figures(**over):
    out = {
        "measured_at": "2026-12-07T09:12:00Z",
        "slurm_job": "1234",
        "ranks": 2,
        "threads_per_rank": 1,
        "matmul_gflops": {"64": 1.9, "128": 7.5, "256": 20.1},
        "op_overhead_us": 9.5,
        "memory_gb_s": 6.2,
        "allreduce_gb_s": 1.1,
        "allreduce_latency_us": 120.0,
        "base_rss_mib": 410.0,
    }
    return out | over


HEAD = (builtin_dir() / "slurm-local.toml").read_text().replace('name = "slurm-local"', 'name = "mine"')


def test_replacing_the_table_keeps_every_other_byte():
    """An old [calibration] (with a sub-table) in the middle of the file: only its lines change; the
    comment above the next table and the comments elsewhere stay."""
    before = HEAD + "# measured last week\n"
    old = '[calibration]\nmeasured_at = "2025-01-01T00:00:00Z"  # old\n\n[calibration.matmul_gflops]\n64 = 1.0\n'
    after = "\n# where it runs\n[storage]\n# none\n"
    text = before + old + after
    new = calibration_file.replace_table(text, calibration_file.render(figures()))
    assert new == before + calibration_file.render(figures()) + after
    again = calibration_file.replace_table(new, calibration_file.render(figures(ranks=4)))
    assert again == before + calibration_file.render(figures(ranks=4)) + after
    assert tomllib.loads(again)["calibration"]["ranks"] == 4


def test_a_profile_without_the_table_gets_it_appended():
    new = calibration_file.replace_table(HEAD, calibration_file.render(figures()))
    assert new == HEAD + "\n" + calibration_file.render(figures())
    assert new.count("[calibration]") == 1


def test_written_file_parses_back_and_keeps_its_mode(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(HEAD)
    path.chmod(0o640)
    dest = calibration_file.write(path, "the path", figures())
    assert dest == path and path.stat().st_mode & 0o777 == 0o640
    cal = read_profile(path).calibration
    assert cal is not None and cal.ranks == 2 and cal.matmul_gflops["256"] == 20.1
    assert path.read_text().startswith(HEAD)


def test_a_dry_run_writes_nothing(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(HEAD)
    assert calibration_file.write(path, "the path", figures(), dry_run=True) == path
    assert path.read_text() == HEAD


@pytest.mark.parametrize(
    "text, fig, says",
    [
        (HEAD, figures(ranks=0), "calibration.ranks"),  # the profile's parser refuses the figures
        ("calibration = { ranks = 1 }\n" + HEAD, figures(), "nothing written"),  # a key outside a header
    ],
    ids=["invalid-figures", "inline-table"],
)
def test_a_result_that_does_not_parse_writes_nothing(tmp_path, text, fig, says):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=says) as e:
        calibration_file.write(path, "the path", fig)
    assert "\n" not in str(e.value)
    assert path.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.toml"]  # no temporary file left


def test_a_shipped_profile_is_copied_to_the_user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    shipped = builtin_dir() / "slurm-local.toml"
    text = shipped.read_text()
    dest = calibration_file.write(shipped, "shipped", figures())
    assert dest == tmp_path / "config" / "clusterctl" / "profiles" / "slurm-local.toml"
    assert shipped.read_text() == text
    assert dest.read_text() == text + "\n" + calibration_file.render(figures())
    assert read_profile(dest).calibration is not None


def test_aggregate_takes_medians_and_rank_0s_all_reduce():
    ranks = [
        {"threads_per_rank": t, "matmul_gflops": {"64": m}, "memory_gb_s": c, "allreduce_gb_s": a}
        for t, m, c, a in ((1, 10.0, 3.0, 0.5), (2, 30.0, 1.0, 0.9), (4, 20.0, 2.0, 0.7), (1, 40.0, 9.0, 0.8))
    ]
    out = aggregate(ranks, "77", "2026-12-07T00:00:00Z")
    assert out == {
        "measured_at": "2026-12-07T00:00:00Z",
        "slurm_job": "77",
        "ranks": 4,
        "threads_per_rank": 1,  # the lower median: a whole number
        "matmul_gflops": {"64": 25.0},
        "memory_gb_s": 2.5,
        "allreduce_gb_s": 0.5,
    }
    assert list(out)[:3] == ["measured_at", "slurm_job", "ranks"]


class FakeBackend:
    """A scheduler that says `state` for every poll and records what was cancelled."""

    initial_state = "PENDING"

    def __init__(self, state: str) -> None:
        self.state, self.cancelled = state, []

    def poll(self, pairs, now, timeout):
        from clusterctl.backends.api import Poll

        return Poll([{"state": self.state}], waiting={pairs[0][1].job_id: {"reason": "Resources"}})

    def cancel(self, job_id):
        self.cancelled.append(job_id)


def fake_wait(tmp_path, monkeypatch, state, timeout_s=60.0, progress=lambda _: None):
    from clusterctl.planning.profiles import load_profile
    from clusterctl.runs import calibrate
    from clusterctl.specs import LaunchSpec

    monkeypatch.setattr(calibrate, "POLL_S", 0.0)
    monkeypatch.setattr(calibrate, "RESULT_LAG_S", 0.0)
    backend = FakeBackend(state)
    spec = LaunchSpec("slurm", str(tmp_path / "submitit"), "calibrate-x", {})
    try:
        calibrate.wait(backend, spec, "42", load_profile("slurm-local"), timeout_s, progress)  # type: ignore[arg-type]
    finally:
        assert backend.cancelled == ["42"]  # whatever ended the wait


def test_wait_cancels_on_failure_timeout_and_ctrl_c(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"job 42 ended COMPLETED without figures; its log: .*42_0_log.err$"):
        fake_wait(tmp_path, monkeypatch, "COMPLETED")
    with pytest.raises(UserError, match=r"^--timeout: calibration job 42 did not finish in 0 s \(PENDING\)"):
        fake_wait(tmp_path, monkeypatch, "PENDING", timeout_s=0.0)
    lines = []

    def interrupt(line):
        lines.append(line)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fake_wait(tmp_path, monkeypatch, "PENDING", progress=interrupt)
    assert lines == ["calibration job 42: pending (Resources), 0 s"]


def test_calibrate_help_imports_no_torch():
    from tests.test_import_hygiene import PROBE, STARTUP_HEAVY

    r = subprocess.run(
        [sys.executable, "-c", PROBE, "profiles", "calibrate", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=deadline(60),
    )
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"exit": 0, "heavy": []}, (STARTUP_HEAVY, r.stderr[-500:])


# --- the command ----------------------------------------------------------------------------------


def test_unknown_and_gpu_profiles_are_one_line_errors(env):
    one_line_error(run_cli("profiles", "calibrate", "no-such", env=env), "error: NAME: no profile named 'no-such'")
    one_line_error(run_cli("profiles", "calibrate", "a100x64", env=env), "error: NAME: profile 'a100x64' has gpu.kind")


def test_slurm_unreachable_is_one_line_and_submits_nothing(env, tmp_path):
    r = run_cli("profiles", "calibrate", "slurm-local", env=env | no_scheduler(tmp_path))
    one_line_error(r, "error: Slurm unreachable (")
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "config" / "clusterctl" / "profiles").exists()


def local_profile(d: Path, name: str, setup: str = "") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    text = (builtin_dir() / "local.toml").read_text().replace('name = "local"', f'name = "{name}"')
    path = d / f"{name}.toml"
    path.write_text(text.replace('recipe = "tiny"', f'recipe = "tiny"\nsetup = ["{setup}"]') if setup else text)
    return path


def test_a_failed_job_is_one_line_with_its_log(env, tmp_path):
    """A local job whose set-up line fails: the job ends without figures, the profile is untouched."""
    path = local_profile(tmp_path / "profiles", "broken", setup="exit 3")
    text = path.read_text()
    r = run_cli("profiles", "calibrate", "broken", cwd=tmp_path, env=env | {"CLUSTERCTL_PROFILES": str(path.parent)})
    one_line_error(r, "error: calibration job ")
    assert "its log: " + str(tmp_path / "runs" / ".calibrate") in r.stderr
    assert path.read_text() == text


@pytest.mark.slow
def test_local_executor_calibrates_and_times_out(env, tmp_path):
    """The local executor runs the same job (one rank, slurm_job "local"); --timeout cancels it."""
    path = local_profile(tmp_path / "profiles", "here")
    text = path.read_text()
    e = env | {"CLUSTERCTL_PROFILES": str(path.parent)}
    r = run_cli("profiles", "calibrate", "here", "--timeout", "1", cwd=tmp_path, env=e)
    one_line_error(r, "error: --timeout: calibration job ")
    pid = int(r.stderr.split("calibration job ")[1].split()[0])
    assert not Path(f"/proc/{pid}").exists() or b"submitit" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert path.read_text() == text
    r = run_cli("profiles", "calibrate", "here", "--json", cwd=tmp_path, env=e, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    out = json.loads(r.stdout)
    assert out["slurm_job"] == "local" and out["ranks"] == 1 and out["written"] and out["file"] == str(path)
    cal = read_profile(path).calibration
    assert cal is not None and cal.slurm_job == "local" and min(cal.matmul_gflops.values()) > 0
    table = {k: v for k, v in out.items() if k not in ("file", "written")}
    assert path.read_text() == text + "\n" + calibration_file.render(table)


@pytest.mark.slow
@pytest.mark.slurm
def test_real_slurm_job_calibrates_a_copy_of_slurm_local(env, tmp_path):
    """One real 2-node job on the local cluster: the copy's table parses with positive figures from 2
    ranks and names a job accounting knows; the rest of the file is unchanged."""
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    d = tmp_path / "profiles"
    d.mkdir()
    text = (builtin_dir() / "slurm-local.toml").read_text().replace('"slurm-local"', '"slurm-local-cal"', 1)
    path = d / "slurm-local-cal.toml"
    path.write_text(text)
    try:
        r = run_cli(
            "profiles", "calibrate", "slurm-local-cal", "--json", "--timeout", str(int(deadline(240))),
            cwd=tmp_path, env=env | {"CLUSTERCTL_PROFILES": str(d)}, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        leftovers = cancel_slurm_jobs_under(tmp_path)
    assert leftovers == []
    out = json.loads(r.stdout)
    cal = read_profile(path).calibration
    assert cal is not None and cal.ranks == 2 and cal.slurm_job == out["slurm_job"]
    rates = [*cal.matmul_gflops.values(), cal.memory_gb_s, cal.allreduce_gb_s, cal.allreduce_latency_us]
    assert min(rates) > 0 and cal.op_overhead_us > 0 and cal.base_rss_mib > 0

    def accounted() -> str | None:  # slurmdbd lags the controller by a few seconds
        row = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", cal.slurm_job, "-o", "JobName,State,NNodes"],
            capture_output=True,
            text=True,
            timeout=deadline(30),
        ).stdout.split("\n")[0]
        return row if row.split("|")[1:2] == ["COMPLETED"] else None

    row = wait_until(accounted, 60, f"job {cal.slurm_job} COMPLETED in sacct")
    assert row == "calibrate-slurm-local-cal|COMPLETED|2"
    new = path.read_text()
    assert new.startswith(text) and tomllib.loads(new) | {"calibration": None} == tomllib.loads(text) | {
        "calibration": None
    }
    assert os.listdir(d) == ["slurm-local-cal.toml"]
