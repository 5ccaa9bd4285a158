"""Shared test helpers: run the installed console scripts in a subprocess; one time factor for every
deadline (VLTRAIN_TEST_TIME_FACTOR); a reaper that stops whatever a test started (training runs,
tmux servers, Slurm jobs) when the test ends, failed or not."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# --- deadlines -------------------------------------------------------------------------------------
# Every wall-clock deadline of the suite (a subprocess's timeout, a wait for a step, a screen or a
# state) is written as the seconds an idle machine needs with a margin, and goes through deadline():
# x VLTRAIN_TEST_TIME_FACTOR. A deadline is a safety net against a hang, never a performance
# assertion, so the default is for a busy machine: 3 covers about 3 runnable processes per core
# (the suite beside 4 busy processes on 2 cores). pytest-timeout's per-test limit scales the same way.

TIME_FACTOR_VAR = "VLTRAIN_TEST_TIME_FACTOR"
DEFAULT_TIME_FACTOR = 3.0


@functools.cache
def time_factor() -> float:
    """VLTRAIN_TEST_TIME_FACTOR (a positive number), or 3 when unset or empty."""
    raw = os.environ.get(TIME_FACTOR_VAR, "").strip()
    if not raw:
        return DEFAULT_TIME_FACTOR
    try:
        factor = float(raw)
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise pytest.UsageError(f"{TIME_FACTOR_VAR}={raw!r}: not a positive number; allowed: e.g. 1, 3 (default), 10")
    return factor


def deadline(seconds: float) -> float:
    """A wall-clock limit: `seconds` (enough on an idle machine, with a margin) x the time factor."""
    return seconds * time_factor()


T = TypeVar("T")


def wait_until(predicate: Callable[[], T], seconds: float, what: str | Callable[[], str], every: float = 0.5) -> T:
    """Call `predicate` every `every` s until it returns something truthy, and return that; fail the
    test after deadline(seconds). `what` (or what it returns) says what was awaited, in the failure.
    An assertion inside `predicate` fails at once (a run that died needs no waiting out)."""
    limit = deadline(seconds)
    end = time.monotonic() + limit
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() >= end:
            said = what() if callable(what) else what
            pytest.fail(f"{said}: not within {limit:g} s ({seconds:g} s x {TIME_FACTOR_VAR}={time_factor():g})")
        time.sleep(every)


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    prog: str = "clusterctl",
) -> subprocess.CompletedProcess:
    """Run an installed console script as a user would (a real subprocess, no in-process runner).
    `timeout` is an idle machine's seconds: it goes through deadline()."""
    full_env = os.environ | {"COLUMNS": "120", "NO_COLOR": "1"} | (env or {})
    return subprocess.run(
        [str(BIN / prog), *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=deadline(timeout),
    )


@pytest.fixture
def cli():
    return run_cli


def _rank_child(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import pickle
    import traceback

    import torch

    torch.set_num_threads(1)
    try:
        out.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """fn(rank, world, *args) on `world` spawned processes (fn at a module's top level, so spawn can
    import it; MASTER_ADDR/PORT set for torch.distributed), their results in rank order; the processes
    are killed when the test fails or a rank hangs."""
    import pickle
    import queue

    import torch.multiprocessing as mp

    from vltrain.distenv import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_child, args=(fn, r, world, port, args, out), daemon=True) for r in range(world)]
    results: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        limit = deadline(300)
        while len(results) < world:
            try:
                rank, ok, value = out.get(timeout=limit)
            except queue.Empty:
                raise AssertionError(f"ranks {sorted(set(range(world)) - results.keys())} gave no result") from None
            assert ok, f"rank {rank} failed:\n{value}"
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    return [results[r] for r in range(world)]


def run_without(module: str, tmp_path: Path, *args: str, prog: str = "vltrain") -> subprocess.CompletedProcess:
    """The CLI run with `module` failing to import (a shim of that name first on PYTHONPATH): what a
    user without the optional extra sees."""
    shim = tmp_path / "shim" / module
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"raise ImportError('No module named {module}')\n")
    return run_cli(*args, prog=prog, env={"PYTHONPATH": str(shim.parent)})


def tiny_data(root: Path, n: int = 1200, vocab: int = 1000) -> tuple[Path, Path]:
    """Synthetic shards and a tokenizer for end-to-end runs of the tiny preset, made with the real CLI."""
    data = root / "data"
    for args in (
        ("data", "synth", "--out", str(data), "--n", str(n), "--shards", "4", "--holdout", "64", "--image-size", "32"),
        ("tokenizer", "train", "--shards", str(data), "--vocab-size", str(vocab), "--out", str(data / "tok.model")),
    ):
        r = run_cli(*args, prog="vltrain", timeout=300)
        assert r.returncode == 0, r.stderr
    return data, data / "tok.model"


def trainer_shards(d: Path, holdout: int = 48) -> Path:
    """The trainer tests' data in `d`: 256 synthetic pairs in 4 shards (32 px, seed 0), `holdout` of
    them held out, and a 1,000-piece tokenizer `d/tok.model` (in-process: the library calls, not the CLI)."""
    from vltrain.data.synth import write_synthetic_shards
    from vltrain.tokenizer import train_tokenizer_from_shards

    write_synthetic_shards(d / "shards", n=256, shards=4, seed=0, image_size=32, holdout=holdout)
    train_tokenizer_from_shards(d / "shards", 1000, d / "tok.model")
    return d


@pytest.fixture(autouse=True)
def _no_launcher_variables_left_behind():
    """A test that builds a trainer session in the pytest process exports torch.distributed's variables
    (vltrain.distenv.export); left there, every later subprocess and job inherits them and runs as a
    one-rank torchrun (this broke 20 tests of one CI run). Fail the test that leaves them."""
    from clusterctl.backends.common import LAUNCHER_VARS

    before = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    after = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    assert after == before, f"this test left torch.distributed's variables in os.environ: {after}"


# --- what a test starts, it stops ------------------------------------------------------------------
# A local run is a process group in a session of its own (clusterctl/backends/local.py), made to
# outlive the command that submitted it: a test that fails half-way leaves it training. Every process
# the suite starts inherits VLTRAIN_TEST_OWNER from os.environ: "<session>/m<N>" while module N's
# fixtures start, "<session>/m<N>/t<K>" during its test K. When a test ends (passed, failed, errored),
# the processes of its owner still there 2 s later are stopped: their Slurm jobs scancelled, then
# SIGTERM, SIGKILL after 3 s; the same for a module's, and at the session's end nothing of the session
# may be left running. Processes are found in /proc/<pid>/environ: other people's runs on the machine,
# the local Slurm cluster's daemons and the pytest process's own multiprocessing helpers are never
# touched.

OWNER_VAR = "VLTRAIN_TEST_OWNER"
TERM_GRACE_S = 3.0  # SIGTERM lets a trainer or submitit's controller stop its children; then SIGKILL
# The local Slurm cluster's daemons: a test that runs `slurm-local.sh up` may (re)start one, which then
# carries its owner; it serves every later test and user, and is never stopped here.
DAEMONS = {"slurmctld", "slurmd", "slurmdbd", "slurmstepd", "munged", "mariadbd", "mysqld", "mysqld_safe"}
# multiprocessing's helpers of the pytest process itself (a test's spawn context starts them once)
PYTEST_HELPERS = (b"from multiprocessing.resource_tracker import", b"from multiprocessing.forkserver import")
ENDING_GRACE_S = 2.0  # what the test already stopped at its end (cancel, scancel) may still be ending
_reaped: list[tuple[str, list[str]]] = []  # (test or module, what was still running), for the summary
_session_owner = ""
_slurm_modules: set[str] = set()


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _ancestors() -> set[int]:
    """This process and its ancestors (a pytest run inside a test inherits its owner)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        pid = _parent(pid)
    return pids


def owned_processes(owner: str) -> dict[int, dict[str, str]]:
    """The live processes started under `owner` (or an owner below it): pid -> {"cmd", "slurm_job"}."""
    needle = f"{OWNER_VAR}={owner}".encode()
    mine = _ancestors()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()  # empty for a zombie: already stopped
            if needle not in environ or Path(entry.path, "comm").read_text().strip() in DAEMONS:
                continue
            env = dict(kv.split(b"=", 1) for kv in environ.split(b"\0") if b"=" in kv)
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").strip()
        except OSError:
            continue
        if any(h in cmd for h in PYTEST_HELPERS) and _parent(int(entry.name)) in mine:
            continue
        value = env.get(OWNER_VAR.encode(), b"").decode()
        if value == owner or value.startswith(owner + "/"):
            job = env.get(b"SLURM_JOB_ID", b"").decode()
            found[int(entry.name)] = {"cmd": cmd.decode(errors="replace")[:160], "slurm_job": job}
    return found


def stop_owned(owner: str) -> list[str]:
    """Stop every process started under `owner`: after ENDING_GRACE_S for what is ending by itself,
    scancel their Slurm jobs, SIGTERM, then SIGKILL what is left after TERM_GRACE_S (processes they
    start meanwhile included). Returns what was still running after the grace."""
    end = time.monotonic() + ENDING_GRACE_S
    while (seen := owned_processes(owner)) and time.monotonic() < end:
        time.sleep(0.1)
    if not seen:
        return []
    jobs = sorted({p["slurm_job"] for p in seen.values() if p["slurm_job"]})
    if jobs and shutil.which("scancel"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=deadline(30))
    for sig, wait in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, deadline(10))):
        end, sent = time.monotonic() + wait, set()
        while alive := owned_processes(owner):
            for pid, proc in alive.items():
                seen.setdefault(pid, proc)
                if pid not in sent:
                    sent.add(pid)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            if time.monotonic() > end:
                break
            time.sleep(0.1)
        else:
            break
    left = owned_processes(owner)
    return [f"{pid} {p['cmd']}" + (" (STILL RUNNING)" if pid in left else "") for pid, p in sorted(seen.items())]


def slurm_up() -> bool:
    """Whether the local Slurm cluster answers (scripts/slurm-local.sh up): the slurm tests skip without it."""
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=deadline(5)).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def sbatch_job(*args: str) -> str:
    """A plain job on the local cluster, its id; the caller cancels it."""
    r = subprocess.run(
        ["sbatch", "--parsable", "-o", "/dev/null", "-e", "/dev/null", *args],
        capture_output=True,
        text=True,
        timeout=deadline(30),
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def slurm_rank_processes(rank: int, **match: str) -> list[tuple[int, dict[str, str]]]:
    """(pid, environment) of the processes of Slurm rank `rank` on this machine (the local cluster's nodes
    are all here) whose environment has every `match` (e.g. SLURM_JOB_ID="12"): the trainer's ranks, which
    submitit starts (tests kill one to fake a node failure)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in raw if "=" in kv)
        if (
            env.get("SLURM_PROCID") == str(rank)
            and b"submitit" in cmd
            and all(env.get(k) == v for k, v in match.items())
        ):
            found.append((int(proc.name), env))
    return found


def slurm_jobs_under(root: Path) -> list[tuple[str, str]]:
    """(job id, batch script) of the Slurm jobs whose batch script lies under `root`, not yet ending."""
    if shutil.which("squeue") is None:
        return []
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%i|%t|%o"], capture_output=True, text=True, timeout=deadline(30))
    except (OSError, subprocess.SubprocessError):
        return []
    prefix = f"{root}/"
    jobs = [line.split("|", 2) for line in r.stdout.splitlines() if line.count("|") >= 2]
    # CG: ended, Slurm is cleaning up (a job that `sbatch --wait` has just returned from)
    return [(job, cmd) for job, state, cmd in jobs if state != "CG" and cmd.startswith(prefix)]


def cancel_slurm_jobs_under(root: Path) -> list[str]:
    """scancel the Slurm jobs whose batch script lies under `root` (a pending job has no process yet)."""
    ours = slurm_jobs_under(root)
    if ours:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", *[j for j, _ in ours]], capture_output=True, timeout=deadline(30))
    return [f"Slurm job {job} {cmd}" for job, cmd in ours]


def pytest_configure(config):
    global _session_owner
    time_factor()  # a malformed factor stops the run before any test
    parent = os.environ.get(OWNER_VAR)  # a pytest run by a test: its leftovers are the test's too
    _session_owner = f"{parent}/{uuid.uuid4().hex[:12]}" if parent else uuid.uuid4().hex[:12]
    os.environ[OWNER_VAR] = _session_owner
    with contextlib.suppress(ImportError):
        from hypothesis import settings

        # hypothesis' per-example deadline (200 ms) is a performance check: off; pytest-timeout is the net
        settings.register_profile("vltrain-tests", deadline=None)
        settings.load_profile("vltrain-tests")


def _scaled_test_timeout(config) -> float | None:
    """pyproject's pytest-timeout value x the factor, unless --timeout or PYTEST_TIMEOUT says otherwise."""
    if not config.pluginmanager.hasplugin("timeout") or os.environ.get("PYTEST_TIMEOUT"):
        return None
    if config.getoption("timeout", None) is not None:
        return None
    ini = config.getini("timeout")
    return deadline(float(ini)) if ini else None


def pytest_collection_modifyitems(config, items):
    limit = _scaled_test_timeout(config)
    if limit:
        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(limit))


def pytest_report_header(config):
    limit = _scaled_test_timeout(config)
    per_test = f"; per-test timeout {limit:g} s" if limit else ""
    source = os.environ.get(TIME_FACTOR_VAR, "").strip() or "unset, default"
    return f"deadlines: x {time_factor():g} ({TIME_FACTOR_VAR}: {source}){per_test}; owner {_session_owner}"


@pytest.fixture(scope="session", autouse=True)
def _the_session_leaves_nothing_running(tmp_path_factory):
    yield
    os.environ[OWNER_VAR] = _session_owner
    left = stop_owned(_session_owner)
    if _slurm_modules:  # squeue only where Slurm was used: elsewhere a controller may not answer
        left += cancel_slurm_jobs_under(tmp_path_factory.getbasetemp())
    assert not left, "left running by the session (now stopped):\n  " + "\n  ".join(left)


@pytest.fixture(scope="module", autouse=True)
def _module_owner(request, _the_session_leaves_nothing_running, tmp_path_factory):
    """The owner of what this module's fixtures start; stopped when the module is done."""
    owner = f"{_session_owner}/m{uuid.uuid4().hex[:6]}"
    os.environ[OWNER_VAR] = owner
    yield owner
    os.environ[OWNER_VAR] = _session_owner
    left = stop_owned(owner)
    if request.node.nodeid in _slurm_modules:
        left += cancel_slurm_jobs_under(tmp_path_factory.getbasetemp())
    if left:
        _reaped.append((request.node.nodeid, left))


@pytest.fixture(autouse=True)
def _test_owner(request, _module_owner):
    """The owner of what this test starts; stopped when the test ends, however it ends."""
    module = request.node.getparent(pytest.Module)
    if request.node.get_closest_marker("slurm") is not None and module is not None:
        _slurm_modules.add(module.nodeid)  # its module's end also cancels its pending Slurm jobs
    owner = f"{_module_owner}/t{uuid.uuid4().hex[:6]}"
    os.environ[OWNER_VAR] = owner
    yield owner
    os.environ[OWNER_VAR] = _module_owner
    left = stop_owned(owner)
    if left:
        _reaped.append((request.node.nodeid, left))


def pytest_terminal_summary(terminalreporter):
    if _reaped:
        terminalreporter.section("still running when their test or module ended: stopped")
        for who, what in _reaped:
            terminalreporter.write_line(f"{who}: " + "; ".join(what))


def tar_that_ends_after_one_member(path):
    """A tar whose first header is sound (submit's cheap check reads only that) and whose next one is
    garbage: tarfile ends the archive there, so the shard holds a caption and no image, and only the
    trainer, indexing it, finds that the shards hold no sample."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("00000.txt")
        ti.size = 9
        tf.addfile(ti, io.BytesIO(b"a caption"))
    path.write_bytes(buf.getvalue()[:1024] + b"not a tar" * 2000)


# --- the CLI in a private registry, runs and config directory (the input-hardening tests) -------------
# A module's own `env` fixture (tests/test_runs.py, tests/test_recipes.py) takes precedence over this one.
@pytest.fixture
def env(tmp_path):
    return {
        "CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"),
        "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "HOME": str(tmp_path / "home"),
    }


def dry_run_exit(r) -> None:
    """`submit --dry-run` (text or --json) exits 2 when it lists a problem (submit would refuse), else 0."""
    import json

    out = r.stdout.lstrip()
    refused = bool(json.loads(out)["checks"]["problems"]) if out.startswith("{") else "submit would refuse" in out
    assert r.returncode == (2 if refused else 0), r.stdout[-1500:] + r.stderr[-1500:]


def no_scheduler(tmp_path: Path) -> dict[str, str]:
    """An environment where no Slurm controller answers (a slurm.conf that names none: scontrol fails at
    once), so `submit`'s partition check is skipped whether or not the local cluster is up."""
    conf = tmp_path / "no-controller.conf"
    conf.write_text("ClusterName=none\n")
    return {"SLURM_CONF": str(conf)}


def one_line_error(r, starts: str) -> None:
    assert r.returncode == 2, r.stdout[-500:] + r.stderr[-500:]
    assert r.stderr.startswith(starts) and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
