"""The suite's own guard (tests/conftest.py): whatever a test starts is stopped when it ends, failed
or not. An inner pytest runs a probe that starts runs the way the local backend does (a session of
their own, never waited for; these ignore SIGTERM), from its module's import, a module fixture, the
test and a shell that exits at once, then fails. After it, none of them is left; without the conftest
they all outlive pytest, so the guard is what stops them. The slow case does it to a real
`clusterctl submit --profile local` run, stopped while it trains."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, deadline, wait_until

SLEEPER = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"

PROBE = textwrap.dedent(
    f"""
    import os, subprocess, sys
    from pathlib import Path

    import pytest

    SLEEPER = {SLEEPER!r}


    def detached():  # as clusterctl/backends/local.py starts a run: a session of its own
        return subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)


    AT_IMPORT = detached()  # the session's: only its end can stop it


    @pytest.fixture(scope="module")
    def module_run():
        return detached()


    def test_starts_runs_then_fails(module_run):
        detached()
        subprocess.run(["sh", "-c", f"{{sys.executable}} -c '{{SLEEPER}}' >/dev/null 2>&1 &"], check=True)
        assert False, "the probe fails with its runs going"
    """
)

REAL_PROBE = textwrap.dedent(
    """
    import json
    import os
    from pathlib import Path

    from tests.conftest import run_cli, tiny_data, wait_until


    def test_submits_a_local_run_then_fails(tmp_path):
        data, tok = tiny_data(tmp_path, n=300)
        cfg = tmp_path / "train.toml"
        cfg.write_text(
            f'model = "tiny"\\nglobal_batch = 16\\nsteps = 100000\\nprecision = "fp32"\\nlog_every = 1\\n'
            f'checkpoint_every = 0\\n[data]\\nshards = "{data}"\\ntokenizer = "{tok}"\\n'
        )
        env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
        r = run_cli("submit", "--profile", "local", "--config", str(cfg), "--name", "leak", "--json", env=env)
        assert r.returncode == 0, r.stderr
        Path(os.environ["PROBE_OUT"], "controller").write_text(json.loads(r.stdout)["job_id"])

        def trained():
            (row,) = json.loads(run_cli("status", "leak", "--json", env=env).stdout)["runs"]
            assert row["state"] == "RUNNING", row
            return (row["step"] or 0) >= 1

        wait_until(trained, 240, "step 1 of the local run")
        assert False, "the probe fails with its run training"
    """
)


def _tagged(tag: str) -> dict[int, str]:
    """The live processes that carry PROBE_TAG=tag (what the inner pytest started), pid -> command."""
    needle = f"PROBE_TAG={tag}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if needle + b"\0" in Path(entry.path, "environ").read_bytes():
                found[int(entry.name)] = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def _inner_pytest(tmp_path: Path, probe: str, guarded: bool, seconds: float):
    """Run `probe` in a pytest of its own, with the suite's conftest as a plugin or without it."""
    tag = uuid.uuid4().hex
    (tmp_path / "probe").mkdir()
    path = tmp_path / "probe" / "test_probe.py"
    path.write_text(probe)
    plugin = ["-p", "tests.conftest"] if guarded else []
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *plugin, "-c", str(REPO / "pyproject.toml")]
    argv += ["--rootdir", str(tmp_path / "probe"), "--basetemp", str(tmp_path / "base"), "-rA", str(path)]
    r = subprocess.run(
        argv,
        cwd=REPO,
        env=os.environ | {"PROBE_TAG": tag, "PROBE_OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=deadline(seconds),
    )
    return r, tag


def _kill(tag: str) -> dict[int, str]:
    """SIGKILL what the inner pytest left (by pid), wait until it is gone; returns what was left."""
    left = _tagged(tag)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _tagged(tag), 10, "the probe's processes gone after SIGKILL", every=0.05)
    return left


def test_a_failing_test_leaves_none_of_its_runs_running(tmp_path):
    r, tag = _inner_pytest(tmp_path, PROBE, guarded=True, seconds=120)
    left = _kill(tag)
    out = r.stdout + r.stderr
    assert not left, f"left running: {left}\n{out[-3000:]}"
    assert r.returncode == 1 and "1 failed, 1 error" in out, out[-3000:]
    assert "the probe fails with its runs going" in out
    # the test's two (its child, the shell's orphan) and its module's one, each stopped at its end...
    assert "still running when their test or module ended: stopped" in out, out[-3000:]
    # ...and the one of the session, which fails the run: something outlived every test and module
    assert "left running by the session (now stopped)" in out, out[-3000:]


def test_without_the_guard_the_same_runs_outlive_pytest(tmp_path):
    """The control: the probe's four processes, in sessions of their own, survive a plain pytest."""
    r, tag = _inner_pytest(tmp_path, PROBE, guarded=False, seconds=120)
    left = _kill(tag)
    assert "the probe fails with its runs going" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(left) == 4, left


@pytest.mark.slow
def test_a_failing_test_stops_its_real_local_run(tmp_path):
    """clusterctl submit --profile local: submitit's controller in a session of its own, the trainer
    under it. The probe fails once the run has trained a step; then neither is left."""
    r, tag = _inner_pytest(tmp_path, REAL_PROBE, guarded=True, seconds=400)
    left = _kill(tag)
    out = r.stdout + r.stderr
    assert not left, f"left running: {left}\n{out[-3000:]}"
    assert r.returncode == 1 and "the probe fails with its run training" in out, out[-3000:]
    stopped = out.split("still running when their test or module ended: stopped", 1)[-1]
    controller = (tmp_path / "controller").read_text()  # the local job's id: its controller's pid
    assert f"{controller} " in stopped and "submitit" in stopped, out[-3000:]
