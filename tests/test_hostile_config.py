"""Hostile and unlucky input, issue 24 point 6 and what was accepted then refused later: every unbounded
config input has a bound its error states ([[stages]], nesting, `base` chains), a [slurm] table that
would make the job loop or run elsewhere is refused at load, and sbatch is bounded in time and read
strictly. Each case failed on the code before: a 35-108 s `plan`, a RecursionError or RuntimeError
traceback, a profile accepted, a submit that hung for ever or ended in FailedSubmissionError."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import REPO, one_line_error, run_cli
from vltrain.common.errors import UserError
from vltrain.common.schema import MAX_DEPTH
from vltrain.config import MAX_BASE_CHAIN, load_train_config, parse_overrides, parse_train_config


def _stages(n: int, steps: int = 1) -> str:
    return f"steps = {n * steps}\n" + "[[stages]]\nsteps = 1\n" * n


# --- 1. [[stages]], nesting depth and `base` chains have stated bounds -----------------------------------
@pytest.mark.parametrize(
    "text, starts",
    [
        (_stages(40_000), "stages: 40,000 entries are too many; allowed: at most 64 entries"),
        ("x = " + "[" * 3000 + "]" * 3000 + "\n", "nesting: too deep for the TOML parser; allowed: tables and lists"),
        ("[data]\nshards = " + "{a = " * 600 + "1" + "}" * 600 + "\n", "nesting: too deep for the TOML parser"),
        ("[" + ".".join(["a"] * 3000) + "]\nx = 1\n", f"nesting: tables and lists nested more than {MAX_DEPTH} deep"),
        ("x = " + "[" * 20 + "]" * 20 + "\n", f"nesting: tables and lists nested more than {MAX_DEPTH} deep"),
    ],
    ids=["40000-stages", "3000-brackets", "600-inline-tables", "3000-dotted-tables", "20-brackets"],
)
def test_unbounded_config_shapes_are_one_line_with_their_bound(env, tmp_path, text, starts):
    cfg = tmp_path / "hostile.toml"
    cfg.write_text(text)
    one_line_error(run_cli("plan", "--profile", "a100x64", "--config", str(cfg), env=env), f"error: {cfg}: {starts}")


def test_the_stage_bound_is_checked_before_any_stage_is():
    """40,000 stages that are not even tables: the bound speaks first (validating them one by one is
    the 35-108 s the issue measured)."""
    with pytest.raises(UserError, match=r"^x: stages: 40,000 entries are too many; allowed: at most 64 entries$"):
        parse_train_config({"steps": 40_000, "stages": ["not a table"] * 40_000}, "x")


@pytest.mark.parametrize("n, ok", [(64, True), (65, False)])
def test_sixty_four_stages_load_and_sixty_five_do_not(tmp_path, n, ok):
    cfg = tmp_path / "c.toml"
    cfg.write_text(_stages(n))
    if ok:
        assert len(load_train_config(cfg).stages) == 64
    else:
        with pytest.raises(UserError, match="stages: 65 entries are too many; allowed: at most 64"):
            load_train_config(cfg)


def _chain(d: Path, n: int) -> Path:
    """n configs, each naming the next in `base`; the last sets steps."""
    d.mkdir()
    for i in range(n):
        (d / f"c{i}.toml").write_text(f'base = "c{i + 1}.toml"\n' if i < n - 1 else "steps = 7\n")
    return d / "c0.toml"


@pytest.mark.parametrize("n", [MAX_BASE_CHAIN, MAX_BASE_CHAIN + 1, 3000])
def test_base_chains_are_bounded(tmp_path, n):
    top = _chain(tmp_path / "chain", n)
    if n <= MAX_BASE_CHAIN:
        assert load_train_config(top).steps == 7
        return
    with pytest.raises(UserError) as e:
        load_train_config(top)
    assert str(e.value).startswith(f"{top}: base: the chain of configs is longer than {MAX_BASE_CHAIN}"), e.value


def test_a_3000_deep_base_chain_is_one_line_at_the_cli(env, tmp_path):
    top = _chain(tmp_path / "chain", 3000)
    one_line_error(
        run_cli("plan", "--profile", "a100x64", "--config", str(top), env=env),
        f"error: {top}: base: the chain of configs is longer than {MAX_BASE_CHAIN}",
    )


@pytest.mark.parametrize("target", ["loop-a.toml", "top.toml"], ids=["symlink-loop", "itself"])
def test_a_base_that_loops_is_one_line(env, tmp_path, target):
    (tmp_path / "loop-a.toml").symlink_to("loop-b.toml")
    (tmp_path / "loop-b.toml").symlink_to("loop-a.toml")
    top = tmp_path / "top.toml"
    top.write_text(f'base = "{target}"\n')
    r = run_cli("plan", "--profile", "a100x64", "--config", str(top), env=env)
    one_line_error(r, f"error: {top}: base: '{target}' ")
    assert ("symbolic-link loop" if target == "loop-a.toml" else "includes itself") in r.stderr


@pytest.mark.parametrize(
    "item, starts",
    [
        ("data.shards=" + "[" * 3000 + "]" * 3000, "--set data.shards: nesting: too deep for the TOML parser"),
        (
            "data.shards=" + "[" * 17 + "]" * 17,
            f"--set data.shards: nesting: tables and lists nested more than {MAX_DEPTH}",
        ),
    ],
    ids=["3000", "17"],
)
def test_deep_set_values_are_refused(item, starts):
    with pytest.raises(UserError) as e:
        parse_overrides([item])
    assert str(e.value).startswith(starts), e.value


# --- 2. [slurm] values accepted then refused (or looping) later ------------------------------------------
def _profile(tmp_path: Path, time_limit: str | None = None, delay: int | None = None, extra: str | None = None) -> Path:
    src = (REPO / "cluster_profiles" / "slurm-local.toml").read_text()
    if time_limit is not None:
        src = re.sub(r"(?m)^time_limit = .*$", f'time_limit = "{time_limit}"', src)
    if delay is not None:
        src = re.sub(r"(?m)^signal_delay_s = .*$", f"signal_delay_s = {delay}", src)
    if extra is not None:
        src = src.replace("[slurm]\n", f"[slurm]\nextra = {{ {extra} }}\n")
    path = tmp_path / "slurm-local.toml"
    path.write_text(src)
    return path


@pytest.mark.parametrize(
    "time_limit, delay, allowed",
    [
        (
            "00:30:00",
            1800,
            "allowed: at most 840 s, or a time_limit of at least 62 minutes",
        ),  # the whole limit: USR2 at the start, requeue, again
        ("00:30:00", 3600, "allowed: at most 840 s"),  # longer than the limit
        ("00:30:00", 900, "allowed: at most 840 s"),  # too close: Slurm may signal 60 s early
        ("2", 10, "allowed: a time_limit of at least 3 minutes"),
    ],
)
def test_a_signal_delay_that_leaves_no_time_to_train_is_refused_at_load(tmp_path, time_limit, delay, allowed):
    path = _profile(tmp_path, time_limit, delay)
    r = run_cli("profiles", "validate", str(path))
    one_line_error(r, f"error: {path}: slurm.signal_delay_s: {delay} s leaves too little of time_limit '{time_limit}'")
    assert allowed in r.stderr


@pytest.mark.parametrize(
    "tail, says",
    [
        ("x = " + "[" * 3000 + "]" * 3000, "nesting: too deep for the TOML parser"),
        (
            "[" + ".".join("abcdefghijklmnopq") + "]\nz = 1",
            f"nesting: tables and lists nested more than {MAX_DEPTH} deep",
        ),
    ],
    ids=["3000-brackets", "17-tables"],
)
def test_a_profile_nested_too_deep_is_one_line(tmp_path, tail, says):
    path = tmp_path / "slurm-local.toml"
    path.write_text((REPO / "cluster_profiles" / "slurm-local.toml").read_text() + "\n" + tail + "\n")
    one_line_error(run_cli("profiles", "validate", str(path)), f"error: {path}: {says}")


def test_the_largest_signal_delay_allowed_loads(tmp_path):
    r = run_cli("profiles", "validate", str(_profile(tmp_path, "00:30:00", 840)))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "option, says",
    [
        ("uid", "runs the job as another user"),
        ("gid", "runs the job as another group"),
        ("container", "runs the job in a container image"),
        ("container-id", "runs the job in a container"),
        ("get-user-env", "replaces the job's environment"),
        ("chdir", "is set by clusterctl from the profile"),
        ("parsable", "changes what sbatch prints"),
        ("test-only", "submits nothing"),
        ("wait", "makes sbatch wait until the job ends"),
        ("clusters", "sends the job to another cluster"),
        ("mem-per-cpu", "conflicts with --mem"),
        ("ui", "is a prefix sbatch may read as --uid, and --uid runs the job as another user"),
        ("ch", "is a prefix sbatch may read as --chdir"),
        ("conta", "is a prefix sbatch may read as --container"),
        ("tim", "is a prefix sbatch may read as --time, and --time is set by clusterctl"),
    ],
)
def test_slurm_extra_refuses_what_changes_who_or_where_the_job_runs(tmp_path, option, says):
    path = _profile(tmp_path, extra=f'"{option}" = "1"')
    r = run_cli("profiles", "validate", str(path))
    one_line_error(r, f"error: {path}: slurm.extra: '{option}' {says}")


def test_slurm_extra_has_a_stated_bound(tmp_path):
    path = _profile(tmp_path, extra=", ".join(f'"comment{i}" = "x"' for i in range(33)))
    one_line_error(
        run_cli("profiles", "validate", str(path)),
        f"error: {path}: slurm.extra: 33 keys are too many; allowed: at most 32 keys",
    )


# --- 3. sbatch: a time-out, strict output, and no warning before a refusal -------------------------------
def _parse(stdout):
    from clusterctl.backends.slurm.parse import sbatch_job_id

    return sbatch_job_id(stdout)


@pytest.mark.parametrize(
    "stdout, job_id",
    [
        ("Submitted batch job 123\n", "123"),
        ("Submitted batch job 77 on cluster alpha\n", "77"),
        ("site notice: fair share low\nSubmitted batch job 9\n", "9"),
        ("", None),
        ("Submitted batch", None),
        ("job 12 failed to queue", None),  # submitit's own regex reads 12
        ("123\n", None),  # --parsable
        ("Submitted batch job 1\nSubmitted batch job 2\n", None),
    ],
)
def test_sbatch_output_is_read_strictly(stdout, job_id):
    if job_id is not None:
        assert _parse(stdout) == job_id
        return
    with pytest.raises(UserError) as e:
        _parse(stdout)
    assert str(e.value).startswith("sbatch: printed ") and "\n" not in str(e.value), e.value


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.conftest import trainer_shards

    return trainer_shards(tmp_path_factory.mktemp("hostile-config-data"))


SHIMS = {
    "hangs": 'echo $$ > "$SHIM_PID"\nexec sleep 300',
    "garbage": "echo 'Submitted batch'",
    "two-ids": "echo 'Submitted batch job 5'; echo 'Submitted batch job 6'",
    "refuses": "echo 'sbatch: error: Batch job submission failed: Invalid account specified' >&2; exit 1",
}


def _submit_with_shim(env, tmp_path, data, behaviour: str, cwd: Path | None = None):
    """`submit --profile slurm-local` with `sbatch` (and `srun`, which submitit looks for) replaced
    by shell scripts first on PATH; the config is the trainer tests' tiny data."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in (("sbatch", SHIMS[behaviour]), ("srun", "exit 0")):
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        'model = "tiny"\nglobal_batch = 16\nsteps = 4\nprecision = "fp32"\n'
        f'[data]\nshards = "{data / "shards"}"\ntokenizer = "{data / "tok.model"}"\n'
    )
    extra = {"PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "SHIM_PID": str(tmp_path / "sbatch.pid")}
    return run_cli("submit", "--profile", "slurm-local", "--config", str(cfg), cwd=cwd or tmp_path, env=env | extra)


def test_a_hung_sbatch_ends_in_one_line_after_the_stated_time(env, tmp_path, data):
    pidfile = tmp_path / "sbatch.pid"
    try:
        r = _submit_with_shim(env | {"CLUSTERCTL_SLURM_TIMEOUT": "2"}, tmp_path, data, "hangs")
        one_line_error(r, "error: sbatch: did not answer within 2 s ($CLUSTERCTL_SLURM_TIMEOUT, default 60)")
        assert "squeue --me" in r.stderr
        pid = int(pidfile.read_text())
        with pytest.raises(ProcessLookupError):  # the time-out ended sbatch, not only stopped waiting
            os.kill(pid, 0)
        assert not list((tmp_path / "runs").glob("*")), "a refused submit leaves no run directory"
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


@pytest.mark.parametrize(
    "behaviour, starts",
    [
        ("garbage", "error: sbatch: printed no job id ('Submitted batch'); it may have queued a job"),
        ("two-ids", "error: sbatch: printed 2 job ids ('Submitted batch job 5 Submitted batch job 6')"),
    ],
)
def test_unparsable_sbatch_output_is_one_line(env, tmp_path, data, behaviour, starts):
    one_line_error(_submit_with_shim(env, tmp_path, data, behaviour), starts)


def test_a_refusal_prints_no_warning_before_its_error_line(env, tmp_path, data):
    """A ./cluster_profiles/slurm-local.toml shadows the shipped profile: a warning. sbatch then
    refuses the job: its error is the only line (the warning printed first, before)."""
    clone = tmp_path / "clone"
    (clone / "cluster_profiles").mkdir(parents=True)
    (clone / "cluster_profiles" / "slurm-local.toml").write_text(
        (REPO / "cluster_profiles" / "slurm-local.toml").read_text()
    )
    r = _submit_with_shim(env, tmp_path, data, "refuses", cwd=clone)
    one_line_error(r, "error: sbatch: Batch job submission failed: Invalid account specified")
