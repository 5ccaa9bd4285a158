"""Issue 24, point 3 and the registry's cases: what resume, the automatic retry and `registry rebuild`
read back from a run directory is checked as submit checks it, and a file that is not clusterctl's
registry is refused (docs/reliability.md "Run directories and the registry read back").

A run directory is made the way submit makes it (tests.test_reliability_registry.fake_submit), then
forged or edited the way a cloned repository or another user could; every refusal is one line naming
the file and the field, and nothing is submitted.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tomllib
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clusterctl.runs.registry import Registry
from tests.conftest import run_cli, trainer_shards
from tests.test_reliability_registry import env_for, fake_submit, one_line_error, strict_json
from tests.test_status import shim
from vltrain.common.atomic import write_json, write_toml

PAYLOAD = "/tmp/payload-dir"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return trainer_shards(tmp_path_factory.mktemp("data"))


def make_run(tmp_path: Path, data: Path, name: str = "victim", profile: str = "local") -> tuple[dict, str, Path]:
    """A registry and one finished local run as submit makes them, its config pointing at real shards
    (so that submit's checks pass on it untouched); (env, run id, run dir)."""
    env = env_for(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "config"))
    reg = Registry(Path(env["CLUSTERCTL_REGISTRY"]))
    jobs: list[tuple[str, object]] = [("4242", ("success", None))] if profile == "local" else [("901", None)]
    run_id = fake_submit(reg, tmp_path / "runs", name, profile, jobs)
    reg.close()
    run_dir = tmp_path / "runs" / run_id
    edit_config(run_dir, lambda c: c["data"].update(shards=str(data / "shards"), tokenizer=str(data / "tok.model")))
    return env, run_id, run_dir


def edit_profile(run_dir: Path, change: Callable[[dict[str, Any]], object]) -> None:
    p = json.loads((run_dir / "profile.json").read_text())
    change(p)
    write_json(run_dir / "profile.json", p)


def edit_config(run_dir: Path, change: Callable[[dict[str, Any]], object]) -> None:
    c = tomllib.loads((run_dir / "config.toml").read_text())
    change(c)
    write_toml(run_dir / "config.toml", c)


def set_env(name: str, value: str = PAYLOAD) -> Callable[[Path], None]:
    return lambda d: edit_profile(d, lambda p: p["interconnect"]["env"].update({name: value}))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _raw(path_name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / path_name).write_bytes(data)


# (what is forged, how, the words the one-line refusal must hold)
TAMPERED: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("PYTHONPATH payload", set_env("PYTHONPATH"), ("profile.json", "interconnect.env", "PYTHONPATH", "--allow-env")),
    ("LD_PRELOAD", set_env("LD_PRELOAD", "/tmp/x.so"), ("profile.json", "interconnect.env", "LD_PRELOAD")),
    ("OPENSSL_CONF", set_env("OPENSSL_CONF", "/tmp/x.cnf"), ("profile.json", "interconnect.env", "OPENSSL_CONF")),
    ("env value injection", set_env("NCCL_DEBUG", "INFO\nexport X=1"), ("profile.json", "interconnect.env")),
    ("profile renamed", lambda d: edit_profile(d, lambda p: p.update(name="other")), ("profile.json", "name")),
    (
        "executor changed",
        lambda d: edit_profile(d, lambda p: p.update(executor="slurm")),
        ("profile.json", "executor"),
    ),
    (
        "negative world size",
        lambda d: edit_profile(d, lambda p: p["nodes"].update(count=-2)),
        ("profile.json", "nodes.count"),
    ),
    (
        "huge GPU count",
        lambda d: edit_profile(d, lambda p: p["nodes"].update(gpus_per_node=10**30)),
        ("profile.json", "nodes.gpus_per_node"),
    ),
    ("profile a FIFO", lambda d: _fifo(d / "profile.json"), ("profile.json", "not a regular file")),
    ("profile not UTF-8", _raw("profile.json", b'{"name": "\xff"}'), ("profile.json", "not UTF-8")),
    ("profile deeply nested", _raw("profile.json", nested(5000).encode()), ("profile.json", "nested deeper")),
    ("profile not a table", _raw("profile.json", b"[1, 2]"), ("profile.json", "not a table")),
    ("profile missing", lambda d: (d / "profile.json").unlink(), ("profile.json", "no such file")),
    (
        "config base escapes",
        lambda d: edit_config(d, lambda c: c.update(base="../../../etc/other.toml")),
        ("config.toml", "base"),
    ),
    ("config bad steps", lambda d: edit_config(d, lambda c: c.update(steps=-5)), ("config.toml", "steps")),
    (
        "config shards gone",
        lambda d: edit_config(d, lambda c: c["data"].update(shards="/nonexistent/shards")),
        ("config.toml", "data.shards"),
    ),
    ("config deeply nested", _raw("config.toml", f"a = {nested(3000)}\n".encode()), ("config.toml",)),
    ("config a FIFO", lambda d: _fifo(d / "config.toml"), ("config.toml", "not a regular file")),
]


@pytest.mark.parametrize("how, forge, words", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_resume_refuses_a_forged_run_directory_in_one_line(tmp_path, data, how, forge, words):
    """`resume` re-checks profile.json, its job environment and config.toml as submit does: one line
    naming the file and field, exit 2, and no job (no new submitit folder, no new registry row)."""
    env, run_id, run_dir = make_run(tmp_path, data)
    forge(run_dir)
    r = run_cli("resume", run_id, env=env, timeout=120)
    one_line_error(r, *words)
    assert sorted(p.name for p in (run_dir / "submitit").iterdir()) == ["4242"]
    reg = Registry(Path(env["CLUSTERCTL_REGISTRY"]))
    assert [j.job_id for j in reg.jobs(run_id)] == ["4242"]


def test_the_checks_pass_an_untouched_run_directory_and_allow_env_lets_a_read_profile_through(tmp_path, data):
    """The control of the test above: the same run directory untouched passes every check, and
    --allow-env (the user read the profile) lets a code-loading variable through, as at submit."""
    from clusterctl.runs.readback import check_run_dir

    _, _, run_dir = make_run(tmp_path, data)
    profile, cfg = check_run_dir(run_dir, "local", "local", False)
    assert profile.name == "local" and cfg.data.shards == str(data / "shards")
    set_env("PYTHONPATH")(run_dir)
    assert check_run_dir(run_dir, "local", "local", True)[0].interconnect.env["PYTHONPATH"] == PAYLOAD


def test_the_same_variable_as_the_users_own_profile_needs_no_flag(tmp_path, data, monkeypatch):
    """A variable the user's own config directory sets (what submit takes without --allow-env) is taken
    back from the run directory too, with that value only."""
    from clusterctl.planning.profiles import builtin_dir
    from clusterctl.runs.readback import check_run_dir

    _, _, run_dir = make_run(tmp_path, data)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    own = tmp_path / "config" / "clusterctl" / "profiles"
    own.mkdir(parents=True)
    text = (builtin_dir() / "local.toml").read_text()
    (own / "local.toml").write_text(
        text.replace("[interconnect]", '[interconnect]\nenv = { LD_PRELOAD = "/opt/a.so" }')
    )
    set_env("LD_PRELOAD", "/opt/a.so")(run_dir)
    check_run_dir(run_dir, "local", "local", False)
    set_env("LD_PRELOAD", "/tmp/other.so")(run_dir)
    with pytest.raises(Exception, match="LD_PRELOAD"):
        check_run_dir(run_dir, "local", "local", False)


@pytest.mark.parametrize("how, forge, words", TAMPERED[:8], ids=[t[0] for t in TAMPERED[:8]])
def test_the_automatic_retry_refuses_a_forged_run_directory(tmp_path, data, monkeypatch, how, forge, words):
    """A run whose last job failed for a cluster reason is retried by the next status, after the same
    checks: a forged directory is a note naming file and field, nothing is submitted, it stays FAILED.
    Untouched, the same run is retried (the control)."""
    import clusterctl.runs.submit as submit_mod
    from clusterctl.runs.lifecycle import reconcile
    from clusterctl.specs import RunState

    env, run_id, run_dir = make_run(tmp_path, data)
    reg = Registry(Path(env["CLUSTERCTL_REGISTRY"]))
    reg.update_job("4242", run_id, state=RunState.FAILED, exit_code="137:0")
    reg.set_run_state(run_id, RunState.FAILED)
    submitted: list[str] = []
    monkeypatch.setattr(
        submit_mod, "submit_attempt", lambda reg, run, prof, kind, hold=False, **kw: submitted.append(kind) or "5"
    )
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    forge(run_dir)
    notes: list[str] = []
    assert reconcile(reg, reg.list_runs(), notes) == [] and submitted == []
    (note,) = notes
    assert note.startswith(f"{run_id}: not retried") and all(w in note for w in words if w != "--allow-env"), note
    assert reg.get_run(run_id).state == RunState.FAILED
    (tmp_path / "control").mkdir()
    run_dir2 = make_run(tmp_path / "control", data)[2]
    reg2 = Registry(Path(env_for(tmp_path / "control")["CLUSTERCTL_REGISTRY"]))
    rid2 = run_dir2.name
    reg2.update_job("4242", rid2, state=RunState.FAILED, exit_code="137:0")
    reg2.set_run_state(rid2, RunState.FAILED)
    assert reconcile(reg2, reg2.list_runs(), notes) == [(rid2, "5")] and submitted == ["retry"]


# --- rebuild ------------------------------------------------------------------------------------


def _plan(change: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def go(d: Path) -> None:
        p = json.loads((d / "plan.json").read_text())
        change(p)
        write_json(d / "plan.json", p)

    return go


# (what is wrong with a run directory under the runs directory, how, words of its `skipped:` line)
REBUILD_SKIPS: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("cloned (mode 755)", lambda d: d.chmod(0o755), ("mode 755", "chmod 700")),
    ("negative world size", lambda d: edit_profile(d, lambda p: p["nodes"].update(count=-2)), ("nodes.count",)),
    (
        "huge world size",
        lambda d: edit_profile(d, lambda p: p["nodes"].update(gpus_per_node=2**70)),
        ("nodes.gpus_per_node",),
    ),
    ("huge max_retries", _plan(lambda p: p.update(max_retries=10**30)), ("plan.json", "max_retries")),
    ("negative max_retries", _plan(lambda p: p.update(max_retries=-1)), ("plan.json", "max_retries")),
    ("huge steps", lambda d: edit_config(d, lambda c: c.update(steps=2**80)), ("config.toml", "steps")),
    ("plan deeply nested", _raw("plan.json", nested(100_000).encode()), ("plan.json", "nested deeper")),
    ("profile deeply nested", _raw("profile.json", nested(900).encode()), ("profile.json", "nested deeper")),
    ("profile a FIFO", lambda d: _fifo(d / "profile.json"), ("profile.json", "not a regular file")),
    ("profile not UTF-8", _raw("profile.json", b'{"name": "\xff\xfe"}'), ("profile.json", "not UTF-8")),
    ("plan int over the digit limit", _raw("plan.json", b'{"steps": ' + b"9" * 5000 + b"}"), ("plan.json",)),
]


@pytest.mark.parametrize("how, forge, words", REBUILD_SKIPS, ids=[t[0] for t in REBUILD_SKIPS])
def test_rebuild_skips_run_directories_it_cannot_trust_or_store(tmp_path, data, how, forge, words):
    """With the registry gone, `registry rebuild` imports the good run and skips the bad one with a
    line saying why; no traceback, and status afterwards shows no negative or absurd figure."""
    env, good, _ = make_run(tmp_path, data, "good")
    reg = Registry(Path(env["CLUSTERCTL_REGISTRY"]))
    bad = fake_submit(reg, tmp_path / "runs", "bad", "local", [("4343", ("success", None))])
    reg.close()
    forge(tmp_path / "runs" / bad)
    Path(env["CLUSTERCTL_REGISTRY"]).unlink()
    r = run_cli("registry", "rebuild", "--json", env=env, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    done = strict_json(r.stdout)
    assert done["from_dirs"] == [good], done
    (line,) = done["skipped"]
    assert bad in line and all(w in line for w in words), line
    rows = strict_json(run_cli("status", "--all", "--json", env=env).stdout)["runs"]
    assert [x["run_id"] for x in rows] == [good] and rows[0]["gpu_hours"] >= 0


def test_rebuild_skips_a_run_directory_with_a_name_that_is_not_utf8(tmp_path, data):
    env, _, run_dir = make_run(tmp_path, data, "good")
    odd = Path(os.fsdecode(bytes(tmp_path / "runs") + b"/bad-\xff"))
    os.rename(run_dir, odd)
    os.chmod(odd, 0o700)
    Path(env["CLUSTERCTL_REGISTRY"]).unlink()
    r = run_cli("registry", "rebuild", env=env, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "skipped: " in r.stdout and "not printable UTF-8" in r.stdout and "\\xff" in r.stdout


def test_rebuild_skips_a_symlinked_run_directory(tmp_path, data):
    env, good, run_dir = make_run(tmp_path, data, "good")
    elsewhere = tmp_path / "elsewhere"
    os.rename(run_dir, elsewhere)
    (tmp_path / "runs" / good).symlink_to(elsewhere)
    Path(env["CLUSTERCTL_REGISTRY"]).unlink()
    done = strict_json(run_cli("registry", "rebuild", "--json", env=env, timeout=120).stdout)
    assert done["from_dirs"] == [] and "symbolic link" in done["skipped"][0]


@pytest.mark.parametrize("where", ("outside", "parent", "dotdot"))
def test_rebuild_reads_only_the_runs_directory(tmp_path, where):
    env = env_for(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "clone" / "runs").mkdir(parents=True)
    arg = {"outside": tmp_path / "clone" / "runs", "parent": tmp_path, "dotdot": tmp_path / "runs" / ".." / "clone"}
    r = run_cli("registry", "rebuild", "--runs-dir", str(arg[where]), env=env)
    one_line_error(r, "--runs-dir", "outside the runs directory", str(tmp_path / "runs"))
    assert not Path(env["CLUSTERCTL_REGISTRY"]).exists()


def test_forged_run_directory_then_rebuild_then_resume_is_refused(tmp_path, data):
    """The issue's chain: a run directory with a PYTHONPATH payload (made 0700, as an archive can),
    `registry rebuild` imports it (it is a well-formed run), `resume` refuses it in one line."""
    env, run_id, run_dir = make_run(tmp_path, data, "forged")
    set_env("PYTHONPATH")(run_dir)
    Path(env["CLUSTERCTL_REGISTRY"]).unlink()
    done = strict_json(run_cli("registry", "rebuild", "--json", env=env, timeout=120).stdout)
    assert done["from_dirs"] == [run_id]
    one_line_error(run_cli("resume", run_id, env=env, timeout=120), "profile.json", "PYTHONPATH", "--allow-env")
    assert sorted(p.name for p in (run_dir / "submitit").iterdir()) == ["4242"]


# --- a registry file that is not clusterctl's ------------------------------------------------------


def _foreign(path: Path) -> None:
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    c.execute("INSERT INTO notes (body) VALUES ('keep me')")
    c.commit()
    c.close()


def _names_only(path: Path) -> None:  # clusterctl's table names, another schema, no version
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE runs (x)")
    c.commit()
    c.close()


def _versioned_foreign(path: Path) -> None:  # another application that uses user_version too
    _foreign(path)
    c = sqlite3.connect(path)
    c.execute("PRAGMA user_version = 3")
    c.close()


def _ours_plus_foreign(path: Path) -> None:
    Registry(path).close()
    _foreign(path)


FOREIGN = [
    ("other app", _foreign),
    ("names only", _names_only),
    ("versioned", _versioned_foreign),
    ("mixed", _ours_plus_foreign),
]
COMMANDS = [
    ("status",),
    ("status", "--all"),
    ("registry", "check"),
    ("registry", "rebuild"),
    ("resume", "x"),
    ("cancel", "x"),
]


@pytest.mark.parametrize("kind, make", FOREIGN, ids=[f[0] for f in FOREIGN])
@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a) for a in COMMANDS])
def test_another_applications_database_is_refused_and_left_untouched(tmp_path, kind, make, args):
    """CLUSTERCTL_REGISTRY naming another application's SQLite file: every command, `registry check`
    included, refuses it in the same line, and the file is byte for byte what it was (no tables, no
    journal mode, no backup-and-replace by rebuild)."""
    env = env_for(tmp_path)
    path = Path(env["CLUSTERCTL_REGISTRY"])
    make(path)
    before = path.read_bytes()
    shim(tmp_path / "bin", "squeue", "exit 0")
    one_line_error(run_cli(*args, env=env), "not clusterctl's" if kind != "names only" else "not a registry")
    assert path.read_bytes() == before
    assert not list(path.parent.glob("reg.db.bak*")) and not list(path.parent.glob(".reg.db.rebuild*"))


@pytest.mark.parametrize("how", ("new", "empty file"))
def test_a_new_or_empty_file_becomes_a_registry(tmp_path, how):
    env = env_for(tmp_path)
    if how == "empty file":
        Path(env["CLUSTERCTL_REGISTRY"]).touch()
    assert run_cli("status", env=env).returncode == 0
    assert run_cli("registry", "check", env=env).returncode == 0


@pytest.mark.parametrize("column", ("config", "plan"))
def test_registry_check_agrees_with_the_commands_that_read_every_run(tmp_path, column):
    """A JSON column that no longer parses: `status --all` refuses the registry as damaged, and
    `registry check` says so too (integrity_check alone said ok)."""
    from tests.test_reliability_registry import record

    env = env_for(tmp_path)
    path = Path(env["CLUSTERCTL_REGISTRY"])
    reg = Registry(path)
    reg.add_run(record("bad-20260101-000000-abcd", tmp_path / "x"))
    reg.close()
    c = sqlite3.connect(path)
    c.execute(f"UPDATE runs SET {column} = '{{not json'")
    c.commit()
    c.close()
    one_line_error(run_cli("status", "--all", env=env), "damaged")
    r = run_cli("registry", "check", env=env)
    one_line_error(r, "runs: row 'bad-20260101-000000-abcd' cannot be read")


@pytest.mark.parametrize("levels", (900, 100_000))
def test_a_deeply_nested_json_column_is_damage_everywhere(tmp_path, levels):
    """A registry row whose JSON column is not what clusterctl writes (900 nested lists: json parses
    them, then status called .get on a list and rebuild's writing back recursed; 100,000: json itself
    recursed): status refuses the file as damaged in one line, check names the row, and rebuild
    leaves the row out with a line; no traceback."""
    from tests.test_reliability_registry import record

    env = env_for(tmp_path)
    path = Path(env["CLUSTERCTL_REGISTRY"])
    reg = Registry(path)
    reg.add_run(record("deep-20260101-000000-abcd", tmp_path / "x"))
    reg.add_run(record("fine-20260101-000000-abcd", tmp_path / "y"))
    reg.close()
    c = sqlite3.connect(path)
    c.execute("UPDATE runs SET config = ? WHERE run_id LIKE 'deep%'", (nested(levels),))
    c.commit()
    c.close()
    one_line_error(run_cli("status", "--all", "--json", env=env), "damaged")
    why = "nested too deep" if levels > 1000 else "not a JSON object"
    one_line_error(run_cli("registry", "check", env=env), "deep-20260101-000000-abcd", why)
    (tmp_path / "runs").mkdir()
    r = run_cli("registry", "rebuild", "--json", env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    done = strict_json(r.stdout)
    assert done["from_old"] == ["fine-20260101-000000-abcd"] and any("deep-" in x for x in done["lost"]), done


# --- resume names the checkpoint it resumes from ------------------------------------------------------


def checkpoint(run_dir: Path, step: int, damage: str = "") -> None:
    """A complete checkpoint as vltrain.checkpoint writes it (meta.json with its manifest, COMPLETE
    recording meta.json's size and CRC-32), then damaged as asked."""
    d = run_dir / "checkpoints" / f"step_{step:07d}"
    (d / "ds").mkdir(parents=True)
    blob = os.urandom(4096)
    (d / "ds" / "model.pt").write_bytes(blob)
    files = {"ds/model.pt": {"size": len(blob), "crc32": f"{zlib.crc32(blob):08x}", "rank": 0}}
    meta = json.dumps({"step": step, "schema": 1, "files": files}).encode()
    (d / "meta.json").write_bytes(meta)
    (d / "COMPLETE").write_text(f"{step} meta.json {len(meta)} {zlib.crc32(meta):08x}\n")
    if damage == "truncated":
        (d / "ds" / "model.pt").write_bytes(blob[:100])
    elif damage == "meta":
        (d / "meta.json").write_bytes(meta.replace(b'"schema": 1', b'"schema": 2'))
    elif damage == "missing":
        (d / "ds" / "model.pt").unlink()


@pytest.mark.parametrize("damage", ("truncated", "meta", "missing"))
def test_resume_names_the_checkpoint_it_resumes_from_not_the_damaged_one(tmp_path, data, monkeypatch, damage):
    import clusterctl.runs.lifecycle as lifecycle
    import clusterctl.runs.submit as submit_mod

    env, run_id, run_dir = make_run(tmp_path, data)
    checkpoint(run_dir, 10)
    checkpoint(run_dir, 20, damage)
    monkeypatch.setattr(submit_mod, "submit_attempt", lambda reg, run, prof, kind, hold=False, **kw: "77")
    monkeypatch.setattr(lifecycle, "current_state", lambda reg, run: "COMPLETED")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    reg = Registry(Path(env["CLUSTERCTL_REGISTRY"]))
    job, ckpt, skipped = lifecycle.resume(reg, reg.get_run(run_id))
    assert (job, ckpt) == ("77", "step_0000010")
    (line,) = skipped
    assert line.startswith("step_0000020: ")
    checkpoint(run_dir, 30)  # a sound newer one wins again
    assert lifecycle.resume_point(run_dir) == ("step_0000030", [])
