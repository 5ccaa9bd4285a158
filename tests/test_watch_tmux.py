"""`clusterctl watch` for real: under tmux (80x24) against a running local training job, then the
non-TTY output. Marked slow (it trains); skipped when tmux is missing."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time

import pytest

from tests.conftest import BIN, OWNER_VAR, deadline, owned_processes, run_cli, tiny_data, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    data, tok = tiny_data(root)
    cfg = root / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 200\nprecision = "fp32"\nlog_every = 1\n'
        f'checkpoint_every = 0\n[data]\nshards = "{data}"\ntokenizer = "{tok}"\n'
    )
    env = {"CLUSTERCTL_REGISTRY": str(root / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(root / "runs")}
    return {"root": root, "cfg": cfg, "env": env}


def _submit(world, name):
    r = run_cli(
        "submit", "--profile", "local", "--config", str(world["cfg"]), "--name", name, "--json", env=world["env"]
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["run_id"]


def _cancel_and_wait(world, run_id):
    """Cancel a local run and wait until what this test started is gone: the trainer checkpoints and
    exits on SIGTERM in its own time, and a test must not end with its run still going."""
    run_cli("cancel", run_id, env=world["env"])
    owner = os.environ[OWNER_VAR]
    wait_until(lambda: not owned_processes(owner), 60, f"run {run_id} to stop after cancel")


class Tmux:
    """A detached tmux session on a server of this test's own (-L): another user's or test's tmux
    server is never used (its sessions would get that server's environment) nor stopped. The
    server holds the test's VLTRAIN_TEST_OWNER: conftest's reaper stops it, should kill() not run."""

    def __init__(self, name: str, command: str, env: dict[str, str]):
        self.name = name
        self.tmux = ["tmux", "-L", f"vltrain-test-{name}"]
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # the pane stays a while after the command (its EXIT= and MODE= lines are read): long enough under load
        shell = f"export {exports} PATH={shlex.quote(str(BIN))}:$PATH TERM=xterm-256color; {command}; echo EXIT=$?; echo MODE=$(stty -a | tr ' ;' '\\n\\n' | grep -x -- '-\\?icanon'); sleep {deadline(60):.0f}"
        subprocess.run(
            [*self.tmux, "new-session", "-d", "-s", name, "-x", "80", "-y", "24", shell],
            check=True,
            timeout=deadline(10),
        )
        self.started = time.monotonic()

    def screen(self) -> str:
        return subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True, timeout=deadline(10)
        ).stdout

    def wait_for(self, *texts: str, timeout: float = 240) -> str:
        end = time.monotonic() + deadline(timeout)
        s = ""
        while time.monotonic() < end:
            r = subprocess.run(
                [*self.tmux, "capture-pane", "-p", "-t", self.name],
                capture_output=True,
                text=True,
                timeout=deadline(10),
            )
            if r.returncode:
                pytest.fail(f"the tmux session ended; last screen:\n{s}\n{r.stderr}")
            s = r.stdout
            if all(t in s for t in texts):
                return s
            time.sleep(0.5)
        pytest.fail(f"{texts} never appeared within {deadline(timeout):g} s; screen:\n{self.screen()}")

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", self.name, *keys], check=True, timeout=deadline(10))

    def kill(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True, timeout=deadline(10))


def test_watch_under_tmux_until_the_summary(world):
    run_id = _submit(world, "watched")
    t = Tmux(f"w{os.getpid()}", f"clusterctl watch {run_id} --interval 0.5", world["env"])
    try:
        live = t.wait_for("RUNNING", "/200", "loss", "samples/s", "q quits")
        assert all(len(line) <= 80 for line in live.splitlines())
        end = t.wait_for("run(s) finished", "EXIT=", timeout=300)
        assert "COMPLETED" in end and "final loss" in end and "EXIT=0" in end
        assert "GPU-h" in end and "Wh" in end and "CO2eq" in end  # energy in the unit that reads best
    finally:
        t.kill()
    # not a terminal: plain lines, ends by itself at once for a finished run
    r = run_cli("watch", run_id, env=world["env"])
    assert r.returncode == 0, r.stderr
    assert f"{run_id} COMPLETED step 200/200 loss" in r.stdout and "run(s) finished" in r.stdout


def test_q_quits_cleanly_and_leaves_the_run_going(world):
    run_id = _submit(world, "quitter")
    t = Tmux(f"q{os.getpid()}", f"clusterctl watch {run_id} --interval 0.5", world["env"])
    try:
        t.wait_for("RUNNING", "q quits")
        t.keys("q")
        screen = t.wait_for("EXIT=", timeout=30)
        assert "EXIT=0" in screen and "stopped watching" in screen
        assert "MODE=icanon" in t.wait_for("MODE=", timeout=10)  # the terminal is back in line mode
    finally:
        t.kill()
    r = run_cli("status", run_id, "--json", env=world["env"])
    assert json.loads(r.stdout)["runs"][0]["state"] in ("RUNNING", "COMPLETED")
    _cancel_and_wait(world, run_id)


def test_submit_watch_then_ctrl_c_leaves_the_terminal_sane_and_the_run_going(world):
    """`submit --watch` opens the same view; Ctrl-C (SIGINT to the terminal's foreground process group)
    stops watching only: the local run, started from that terminal, keeps training."""
    t = Tmux(
        f"c{os.getpid()}",
        f"clusterctl submit --profile local --config {shlex.quote(str(world['cfg']))} --name ctrlc --watch",
        world["env"],
    )
    try:
        t.wait_for("RUNNING", "/200", "q quits")
        t.keys("C-c")
        screen = t.wait_for("EXIT=", timeout=30)
        assert "EXIT=0" in screen and "stopped watching" in screen
        assert "MODE=icanon" in t.wait_for("MODE=", timeout=10)
    finally:
        t.kill()
    first, end = None, time.monotonic() + deadline(120)
    while True:  # the run goes on training after the watcher's Ctrl-C
        (row,) = json.loads(run_cli("status", "ctrlc", "--json", env=world["env"]).stdout)["runs"]
        assert row["state"] in ("RUNNING", "COMPLETED"), row
        if row["state"] == "COMPLETED" or (first is not None and (row["step"] or 0) > first):
            break
        first = row["step"] or 0 if first is None else first
        assert time.monotonic() < end, row
        time.sleep(1)
    _cancel_and_wait(world, row["run_id"])


def test_ctrl_c_during_submit_wait_stops_waiting_not_the_run(world):
    """Ctrl-C reaches the terminal's whole foreground process group: simulated with killpg."""
    import signal

    p = subprocess.Popen(
        [
            str(BIN / "clusterctl"),
            "submit",
            "--profile",
            "local",
            "--config",
            str(world["cfg"]),
            "--name",
            "waiter",
            "--wait",
        ],
        env=os.environ | world["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a shell's background job (`make test &`) ignores SIGINT, and children inherit that:
        # give clusterctl the default a terminal's foreground job has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        end = time.monotonic() + deadline(120)
        while True:  # until the trainer has logged a step
            r = run_cli("status", "waiter", "--json", env=world["env"])
            rows = json.loads(r.stdout)["runs"] if r.returncode == 0 else []
            if rows and (rows[0]["step"] or 0) >= 1:
                break
            assert p.poll() is None and time.monotonic() < end, (rows, p.poll())
            time.sleep(0.5)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=deadline(30))
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "stopped following" in err and "Traceback" not in err, err
    first = rows[0]["step"]
    end = time.monotonic() + deadline(120)
    while True:
        (row,) = json.loads(run_cli("status", "waiter", "--json", env=world["env"]).stdout)["runs"]
        assert row["state"] in ("RUNNING", "COMPLETED"), row
        if row["state"] == "COMPLETED" or (row["step"] or 0) > first:
            break
        assert time.monotonic() < end, row
        time.sleep(1)
    _cancel_and_wait(world, "waiter")
