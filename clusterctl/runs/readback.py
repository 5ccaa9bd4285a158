"""What clusterctl reads back from a run directory, checked as submit checks what it writes there.

A run directory is not trusted: one can be forged in a cloned repository's ./runs and imported by
`registry rebuild`, and its files can be edited after submit. So `resume`, the automatic retry
(clusterctl.runs.lifecycle) and `rebuild` (clusterctl.runs.repair) read profile.json, config.toml
and plan.json through here: a regular file of bounded size (a FIFO or a link to /dev/zero is refused,
never waited on), UTF-8, nested at most MAX_DEPTH deep, then validated by the same parsers submit uses
(`parse_profile`, `parse_train_config`) and the same job-environment allow-list (`check_job_env`).
Each refusal is one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.planning.profiles import builtin_dir, check_job_env, parse_profile, read_profile, user_dir
from vltrain.common.errors import UserError

if TYPE_CHECKING:
    from clusterctl.planning.profiles import ClusterProfile
    from vltrain.config import TrainConfig

MAX_FILE_BYTES = 4 << 20  # profile.json, plan.json and config.toml are a few kB each
MAX_DEPTH = 32  # their deepest nesting is 4; json and tomllib recurse, and the registry stores them as JSON
MAX_RETRIES = 100  # submit --max-retries' upper bound (clusterctl.cli.cmd_submit)


def read_bytes(path: Path, allowed: str) -> bytes:
    """A run directory file's bytes: a regular file (opened without blocking, so a FIFO is refused,
    not waited on) of at most MAX_FILE_BYTES."""
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise UserError(f"{where}: no such file; allowed: {allowed}") from None
    except OSError as e:
        raise UserError(f"{where}: cannot be read ({e.strerror or e}); allowed: {allowed}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{where}: not a regular file (a device, FIFO or socket); allowed: {allowed}")
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise UserError(f"{where}: larger than {MAX_FILE_BYTES >> 20} MiB; allowed: {allowed}")
    return raw


def depth(value: Any) -> int:
    """How deep lists and tables nest in `value` (iterative: a deep value cannot exhaust the stack)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        v, d = todo.pop()
        deepest = max(deepest, d)
        if d <= MAX_DEPTH and isinstance(v, (dict, list)):
            todo += [(c, d + 1) for c in (v.values() if isinstance(v, dict) else v)]
    return deepest


def read_table(path: Path, allowed: str) -> dict[str, Any]:
    """A JSON (or, for .toml, TOML) file of the run directory as a table, bounded in size and depth."""
    raw = read_bytes(path, allowed)
    where = str(path)
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 (byte {e.start}); allowed: {allowed}") from None
    except RecursionError:
        raise UserError(f"{where}: nested deeper than {MAX_DEPTH}; allowed: {allowed}") from None
    except ValueError as e:  # JSONDecodeError, TOMLDecodeError, an integer over Python's digit limit
        raise UserError(f"{where}: cannot be parsed ({e}); allowed: {allowed}") from None
    if depth(data) > MAX_DEPTH:
        raise UserError(f"{where}: nested deeper than {MAX_DEPTH}; allowed: {allowed}")
    if not isinstance(data, dict):
        raise UserError(f"{where}: not a table; allowed: {allowed}")
    return data


def run_dir_profile(path: Path) -> ClusterProfile:
    """profile.json as submit wrote it (ClusterProfile.to_dict): parsed by `parse_profile`, its
    `derived` figures ignored (they are computed again from the profile)."""
    data = read_table(path, "the profile.json clusterctl submit wrote (a cluster profile as JSON)")
    data.pop("derived", None)
    return parse_profile(data, str(path))


def run_dir_config(path: Path) -> TrainConfig:
    """config.toml as submit wrote it: resolved (no `base` to follow out of the run directory), parsed
    by `parse_train_config`."""
    from vltrain.config import parse_train_config

    data = read_table(path, "the resolved config.toml clusterctl submit wrote")
    if "base" in data:
        raise UserError(
            f"{path}: base: a run directory's config is resolved and names no other file; allowed: no base key"
        )
    return parse_train_config(data, str(path))


def run_dir_plan(path: Path) -> dict[str, Any]:
    """plan.json, with max_retries (the only figure of it clusterctl acts on: retry.should_retry) in
    submit's range."""
    plan = read_table(path, "the plan.json clusterctl submit wrote")
    n = plan.get("max_retries", 0)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_RETRIES:
        raise UserError(f"{path}: max_retries: {str(n)[:40]!r} is out of range; allowed: 0 to {MAX_RETRIES}")
    return plan


def trusted_env(name: str) -> dict[str, str]:
    """The job environment of the profile named `name` in the user's own config directory, else the
    shipped one ({} when neither has it or it does not load): what load_profile takes without --allow-env."""
    for d in (user_dir(), builtin_dir()):
        p = d / f"{name}.toml"
        if p.is_file():
            try:
                return dict(read_profile(p).interconnect.env)
            except UserError:
                return {}
    return {}


def check_env(profile: ClusterProfile, path: Path, allow_env: bool) -> None:
    """Submit's job-environment check (`check_job_env`, the same allow-list) on a profile read back
    from a run directory, where anyone who can write the directory can edit it: a variable outside the
    allow-list is refused unless `allow_env`, or the profile of that name in the user's config
    directory (or the shipped one) sets it to the same value (what submit takes without --allow-env)."""
    trusted = trusted_env(profile.name)
    untrusted = {k: v for k, v in profile.interconnect.env.items() if trusted.get(k) != v}
    as_read = dataclasses.replace(profile, interconnect=dataclasses.replace(profile.interconnect, env=untrusted))
    check_job_env(as_read, str(path), "a run directory, which can be forged or edited after submit", allow_env)


def check_run_dir(
    run_dir: Path, profile_name: str, executor: str, allow_env: bool
) -> tuple[ClusterProfile, TrainConfig]:
    """Everything resume and retry read back from a run directory, checked as submit checks it: the
    profile (parsed, the registry's name and executor, the job environment) and the config (parsed,
    then the plan and the checks before sbatch). The first problem is one line naming file and field."""
    from clusterctl.planning.plan import plan_for_run
    from clusterctl.runs import preflight
    from vltrain.rundir import RunDir

    rd = RunDir(run_dir)
    profile = run_dir_profile(rd.profile)
    for field, saved, found in (("name", profile_name, profile.name), ("executor", executor, profile.executor)):
        if saved != found:
            raise UserError(
                f"{rd.profile}: {field}: {found!r} differs from the registry's {saved!r} (the file was changed after "
                f"submit); allowed: {saved!r}, or a new run (clusterctl submit)"
            )
    check_env(profile, rd.profile, allow_env)
    cfg = run_dir_config(rd.config)
    plan, resolved = plan_for_run(profile, cfg)
    checks = preflight.check(resolved, plan.to_dict() | {"steps": resolved.steps})
    if checks.problems:
        raise UserError(f"{rd.config}: {checks.problems[0]}")
    return profile, resolved
