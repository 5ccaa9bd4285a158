"""Notifications (issue 27 point 2): [notify] webhooks get a run's events exactly once, whoever observes
them (the job, a command, several at once), and a webhook that is down never touches the run.

The webhooks are a loopback http.server in a thread that records every JSON body it gets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clusterctl.planning.user_config import EVENTS, parse_notify, read_notify
from clusterctl.runs import notify
from clusterctl.runs.registry import Registry
from clusterctl.specs import JobRecord, RunRecord, RunState
from tests.conftest import REPO, run_cli, tiny_data
from vltrain.common.errors import UserError
from vltrain.rundir import RunDir

SECRET = "T000/B000/s3cr3t"  # the part of a Slack URL that is the credential: never printed or logged


class Hooks:
    """A loopback webhook server: every POST's path and JSON body, answered with `code`."""

    def __init__(self, code: int = 200) -> None:
        self.got: list[tuple[str, dict]] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hooks.got.append((self.path, body))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def texts(self, path: str) -> list[str]:
        return [b["text"] for p, b in self.got if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks():
    h = Hooks()
    yield h
    h.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return port


def write_config(path: Path, hooks: list[tuple[str, list[str] | None]], extra: str = "") -> Path:
    text = f"[notify]\ntimeout_s = 3\n{extra}"
    for url, events in hooks:
        text += f'\n[[notify.webhooks]]\nurl = "{url}"\n' + (f"events = {json.dumps(events)}\n" if events else "")
    path.write_text(text)
    return path


def a_run(
    tmp_path: Path, hooks: list[tuple[str, list[str] | None]], monkeypatch, name: str = "r1"
) -> tuple[Registry, RunRecord]:
    """A registered run whose directory holds the [notify] copy submit makes."""
    monkeypatch.setenv("CLUSTERCTL_CONFIG", str(write_config(tmp_path / "config.toml", hooks)))
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    notify.save_settings(run_dir)
    reg = Registry(tmp_path / "reg.db")
    run = RunRecord(name, "tiny", "local", "local", str(run_dir), time.time(), "u", 2, 10, RunState.RUNNING)
    reg.add_run(run)
    return reg, run


# --- config ------------------------------------------------------------------------------------


def test_two_webhooks_with_their_events_and_the_run_keeps_a_private_copy(tmp_path, monkeypatch, hooks):
    reg, run = a_run(
        tmp_path, [(f"{hooks.url}/a", None), (f"{hooks.url}/b/{SECRET}", ["failed", "completed"])], monkeypatch
    )
    copy = RunDir(run.run_dir).notify
    assert copy.stat().st_mode & 0o777 == 0o600  # the URLs are secrets
    conf = notify.settings(run.run_dir)
    assert conf is not None and [w.events for w in conf.webhooks] == [EVENTS, ("failed", "completed")]
    assert SECRET not in conf.describe() and "2 webhooks" in conf.describe()
    for event in EVENTS:
        notify.notify(reg, run, event, {"job_id": "7"})
    assert len(hooks.texts("/a")) == 5 and len(hooks.texts(f"/b/{SECRET}")) == 2
    assert [t.split(") ")[1].split(":")[0] for t in hooks.texts(f"/b/{SECRET}")] == ["failed", "completed"]
    assert all(t.startswith("clusterctl: run r1 (tiny, profile local) ") for t in hooks.texts("/a"))
    assert [n["ok"] for n in reg.notifications("r1")] == [1] * 5
    # the config changing later does not change what the run was submitted with
    write_config(tmp_path / "config.toml", [(f"{hooks.url}/c", None)])
    notify.notify(reg, run, "requeued", {"job_id": "7", "count": 1}, key="requeued:7:1")
    assert hooks.texts("/c") == [] and len(hooks.texts("/a")) == 6


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[notify]\ntimeout_s = 0\n", "notify.timeout_s = 0; allowed: seconds, > 0"),
        ("[notify]\ncolour = 1\n", "notify.colour is not known; allowed: timeout_s, events, webhooks"),
        ('[notify]\nevents = ["done"]\n', "notify.events: 'done' is not an event; allowed: started, requeued"),
        ("[[notify.webhooks]]\nevents = []\n", "notify.webhooks[0].url: missing or not text"),
        ('[[notify.webhooks]]\nurl = "ftp://h/x"\n', "notify.webhooks[0].url: ftp://h/… is not an http(s) URL"),
        ('[[notify.webhooks]]\nurl = "https://h/x"\nevents = "failed"\n', "notify.webhooks[0].events: must be a list"),
        ('[[notify.webhooks]]\nurl = "https://h/x"\nchannel = "#a"\n', "notify.webhooks[0].channel is not known"),
        ("[notify\n", "not valid TOML"),
        ("[other]\n", "unknown table or key 'other'; allowed: notify"),
    ],
)
def test_bad_notify_config_is_one_line_naming_file_and_field(tmp_path, monkeypatch, text, needle):
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("CLUSTERCTL_CONFIG", str(path))
    with pytest.raises(UserError) as e:
        read_notify()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and needle in msg, msg


def test_config_file_places(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CLUSTERCTL_CONFIG", raising=False)
    assert read_notify() is None  # no file: no notifications, no error
    (tmp_path / "xdg" / "clusterctl").mkdir(parents=True)
    write_config(tmp_path / "xdg" / "clusterctl" / "config.toml", [("https://hooks.example/x", ["failed"])])
    assert read_notify() == parse_notify(
        {"notify": {"timeout_s": 3, "webhooks": [{"url": "https://hooks.example/x", "events": ["failed"]}]}}, "x"
    )
    monkeypatch.setenv("CLUSTERCTL_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(UserError, match="CLUSTERCTL_CONFIG: .* does not exist"):
        read_notify()


def test_submit_dry_run_masks_the_urls_and_a_bad_config_is_one_line(tmp_path):
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
    env["CLUSTERCTL_CONFIG"] = str(
        write_config(tmp_path / "config.toml", [(f"https://hooks.slack.com/services/{SECRET}", None)])
    )
    r = run_cli("submit", "--profile", "local", "--config", str(REPO / "configs" / "tiny.toml"), "--dry-run", env=env)
    assert "notify: 1 webhook: https://hooks.slack.com/… (all events)" in r.stdout, r.stdout[-2000:]
    assert SECRET not in r.stdout + r.stderr
    d = json.loads(
        run_cli(
            "submit",
            "--profile",
            "local",
            "--config",
            str(REPO / "configs" / "tiny.toml"),
            "--dry-run",
            "--json",
            env=env,
        ).stdout
    )
    assert d["notify"] == "1 webhook: https://hooks.slack.com/… (all events)"
    (tmp_path / "config.toml").write_text("[notify]\ntimeout_s = -1\n")
    r = run_cli("submit", "--profile", "local", "--config", str(REPO / "configs" / "tiny.toml"), "--dry-run", env=env)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "config.toml: notify.timeout_s = -1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --- exactly once ------------------------------------------------------------------------------


def test_racing_observers_send_each_event_once(tmp_path, monkeypatch, hooks):
    """Threads and processes, each with its own registry connection, notify the same keys at once."""
    reg, run = a_run(tmp_path, [(f"{hooks.url}/a", None)], monkeypatch)
    start = threading.Barrier(6)

    def observer() -> None:
        own = Registry(reg.path)
        start.wait()
        for event in ("started", "completed"):
            notify.notify(own, run, event, {"job_id": "7"})
        notify.notify(own, run, "failed", {"job_id": "7", "reason": "x"}, key="failed:7")
        own.close()

    code = (
        "import sys, time; from clusterctl.runs import notify; from clusterctl.runs.registry import Registry;"
        "reg = Registry(sys.argv[1]); run = reg.get_run('r1'); time.sleep(float(sys.argv[2]) - time.time());"
        "[notify.notify(reg, run, e, {'job_id': '7'}) for e in ('started', 'completed')];"
        "notify.notify(reg, run, 'failed', {'job_id': '7'}, key='failed:7')"
    )
    at = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", code, str(reg.path), str(at)], cwd=REPO) for _ in range(3)]
    threads = [threading.Thread(target=observer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    kinds = sorted(t.split(") ")[1].split(":")[0] for t in hooks.texts("/a"))
    assert kinds == ["completed", "failed", "started"]
    assert sorted(n["key"] for n in reg.notifications("r1")) == ["completed", "failed:7", "started"]


def test_a_webhook_down_or_failing_is_a_miss_logged_once_and_not_resent(tmp_path, monkeypatch, hooks):
    failing = Hooks(code=500)
    try:
        down = f"http://127.0.0.1:{closed_port()}/{SECRET}"
        reg, run = a_run(
            tmp_path, [(f"{hooks.url}/ok", None), (f"{failing.url}/{SECRET}", None), (down, None)], monkeypatch
        )
        t0 = time.monotonic()
        notify.notify(reg, run, "failed", {"job_id": "8", "reason": "NCCL watchdog"}, key="failed:8")
        assert time.monotonic() - t0 < 10  # a short timeout: the observer is not held
        notify.notify(reg, run, "failed", {"job_id": "8"}, key="failed:8")  # the next observer does not resend
    finally:
        failing.close()
    assert len(hooks.texts("/ok")) == 1 and len(failing.texts(f"/{SECRET}")) == 1
    assert "job 8; NCCL watchdog" in hooks.texts("/ok")[0]
    (row,) = reg.notifications("r1")
    assert row["ok"] == 0 and "HTTP 500" in row["error"] and "refused" in row["error"].lower()
    log = RunDir(run.run_dir).notify_log.read_text()
    assert log.count("\n") == 1 and "failed [failed:8] not delivered" in log and "HTTP 500" in log
    assert SECRET not in log + row["error"]


def test_status_refresh_notifies_what_it_sees_with_the_jobs_keys(tmp_path, monkeypatch, hooks):
    """The job's requeue (Attempt.checkpoint, rank 0) and a status refresh that sees sacct's RestartCnt
    go up use the same key: one message. A refresh that sees a run newly RUNNING says started (once);
    a failure the retry policy will resubmit is not `failed` (the retry is lifecycle's to tell)."""
    from clusterctl.runs.attempt import Attempt

    reg, run = a_run(tmp_path, [(f"{hooks.url}/a", None)], monkeypatch)
    job = reg.add_job("r1", "77", "submit")
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    slurm |= {"SLURM_JOB_NODELIST": "a1", "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NUM_NODES": "1"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    RunDir(run.run_dir).events.write_text(json.dumps({"event": "timeout", "step": 3}) + "\n")
    Attempt(run.run_dir, "r1", str(reg.path)).checkpoint()
    assert hooks.texts("/a")[-1].endswith("requeued: time-out; job 77; requeue #1")
    j = JobRecord(job.job_id, "r1", 1, "submit", 0.0, RunState.PENDING, requeues=1)
    notify.observed(reg, [run], {"r1": [j]}, {"r1": RunState.REQUEUED}, [("r1", "77", 1)], time.time())
    notify.observed(reg, [run], {"r1": [j]}, {"r1": RunState.RUNNING}, [], time.time())
    notify.observed(reg, [run], {"r1": [j]}, {"r1": RunState.RUNNING}, [], time.time())
    texts = hooks.texts("/a")
    assert len(texts) == 2 and "started: job 77" in texts[1]
    run.plan = {"max_retries": 2}
    j = JobRecord("77", "r1", 1, "submit", 0.0, RunState.FAILED, exit_code="9:0")  # a cluster failure: retried
    notify.observed(reg, [run], {"r1": [j]}, {"r1": RunState.FAILED}, [], time.time())
    assert len(hooks.texts("/a")) == 2
    j.exit_code = "1:0"  # the user's: not retried, so failed
    notify.observed(reg, [run], {"r1": [j]}, {"r1": RunState.FAILED}, [], time.time())
    assert hooks.texts("/a")[-1].startswith("clusterctl: run r1 (tiny, profile local) failed: job 77; FAILED 1:0")
    j2 = JobRecord("78", "r1", 2, "submit", 0.0, RunState.TIMEOUT)  # a time-out not requeued: the run is over
    notify.observed(reg, [run], {"r1": [j, j2]}, {"r1": RunState.TIMEOUT}, [], time.time())
    assert "failed: job 78" in hooks.texts("/a")[-1]
    keys = {n["key"] for n in reg.notifications("r1")}
    assert keys == {"requeued:77:1", "started", "failed:77", "failed:78"}


def test_registry_migration_4_and_a_read_only_registry_of_schema_3(tmp_path):
    """An older registry gains the notifications table when opened read-write; one that is read-only at
    schema 3 (the previous release's) is still read, and has nothing sent."""
    from clusterctl.runs.dbfile import connect
    from clusterctl.runs.registry import SCHEMA_VERSION, migrate

    conn = connect(tmp_path / "old.db")
    migrate(conn, target=3)
    conn.close()
    ro = Registry(tmp_path / "old.db", readonly=True)
    assert ro.notified_keys(["x"]) == {"x": set()} and ro.notifications("x") == []
    assert ro.claim_notification("x", "started", "started") is False
    ro.close()
    reg = Registry(tmp_path / "old.db")
    assert reg._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    reg.add_run(RunRecord("x", "x", "local", "local", str(tmp_path), 0.0, "u", 1, 1, "RUNNING"))
    assert reg.claim_notification("x", "started", "started") and not reg.claim_notification("x", "started", "started")
    assert reg.notified_keys(["x", "y"]) == {"x": {"started"}, "y": set()}


def test_requeue_number_on_slurm_and_under_the_local_executor(tmp_path, monkeypatch):
    from clusterctl.runs.attempt import requeue_number

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    assert requeue_number(str(tmp_path)) == 1  # Slurm sets no count before the first requeue
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeue_number(str(tmp_path)) == 3
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    events = [{"event": e, "step": 0} for e in ("start", "checkpoint", "preempt", "resume", "timeout")]
    RunDir(tmp_path).events.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert requeue_number(str(tmp_path)) == 2  # the second attempt is being requeued


def test_read_only_registry_and_runs_without_settings_send_nothing(tmp_path, monkeypatch, hooks):
    reg, run = a_run(tmp_path, [(f"{hooks.url}/a", None)], monkeypatch)
    reg.close()
    ro = Registry(tmp_path / "reg.db", readonly=True)
    notify.notify(ro, run, "started", {})
    other = RunRecord("r2", "x", "local", "local", str(tmp_path / "nodir"), 0.0, "u", 1, 1, "RUNNING")
    notify.notify(Registry(tmp_path / "reg.db"), other, "started", {})
    assert hooks.got == []


# --- a real run ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_local_run_is_announced_once_and_a_dead_webhook_does_not_touch_it(tmp_path, hooks):
    """A tiny run on the `local` profile: started and completed reach the webhooks once each, completed
    with the eval figures of eval.json; the webhooks that answer 500 or are down are misses in the notify
    log and the registry, and the run completes all the same."""
    failing = Hooks(code=500)
    try:
        data, tok = tiny_data(tmp_path, n=400)
        cfg = tmp_path / "train.toml"
        cfg.write_text(
            f'model = "tiny"\nglobal_batch = 16\nsteps = 6\nprecision = "fp32"\nlog_every = 2\n'
            f'[data]\nshards = "{data}"\ntokenizer = "{tok}"\n'
        )
        hooks_conf = [(f"{hooks.url}/a", None), (f"{hooks.url}/b", ["failed", "completed"]), (f"{failing.url}/c", None)]
        hooks_conf.append((f"http://127.0.0.1:{closed_port()}/{SECRET}", ["completed"]))
        env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
        env["CLUSTERCTL_CONFIG"] = str(write_config(tmp_path / "config.toml", hooks_conf))
        r = run_cli(
            "submit", "--profile", "local", "--config", str(cfg), "--name", "hooked", "--wait", env=env, timeout=600
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert run_cli("status", "--all", env=env).returncode == 0  # one more observer: sends nothing again
    finally:
        failing.close()
    (run_dir,) = (tmp_path / "runs").iterdir()
    run_id = run_dir.name
    a = hooks.texts("/a")
    assert len(a) == 2 and a[0].startswith(f"clusterctl: run {run_id} (hooked, profile local) started"), a
    assert a[1].startswith(f"clusterctl: run {run_id} (hooked, profile local) completed: job ")
    ev = json.loads((run_dir / "eval.json").read_text())
    assert f"i2t R@1 {ev['i2t']['R@1']:.4g}" in a[1] and "step 6" in a[1] and "GPU-hours" in a[1], a[1]
    assert hooks.texts("/b") == a[1:]  # completed only
    assert [t.split(") ")[1].split(":")[0] for t in failing.texts("/c")] == ["started", "completed"]
    reg = Registry(tmp_path / "reg.db")
    rows = {n["key"]: n for n in reg.notifications(run_id)}
    assert set(rows) == {"started", "completed"} and rows["completed"]["ok"] == 0 and rows["started"]["ok"] == 0
    log = (run_dir / "notify.log").read_text()
    assert log.count("not delivered") == 2 and log.count("HTTP 500") == 2 and "refused" in log.lower()
    assert SECRET not in log and RunDir(run_dir).notify.stat().st_mode & 0o777 == 0o600
    assert os.environ.get("CLUSTERCTL_CONFIG") is None  # the test's config was the child's only


@pytest.mark.slow
@pytest.mark.slurm
def test_a_two_node_slurm_run_preempted_is_announced_once_per_event(tmp_path, hooks):
    """On the local Slurm cluster (2 nodes x 1 rank): started once (rank 0 only, not once per rank),
    a preemption (USR2) requeued once, keyed by the job and its requeue count, whether the job (submitit's
    checkpoint) or a status refresh (sacct's RestartCnt) saw it first, and completed once."""
    from tests.conftest import cancel_slurm_jobs_under, deadline, slurm_up, wait_until

    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    data, tok = tiny_data(tmp_path, n=400)
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 12\nprecision = "fp32"\nlog_every = 2\ncheckpoint_every = 2\n'
        f'[data]\nshards = "{data}"\ntokenizer = "{tok}"\n'
    )
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
    env["CLUSTERCTL_CONFIG"] = str(write_config(tmp_path / "config.toml", [(f"{hooks.url}/a", None)]))
    try:
        r = run_cli("submit", "--profile", "slurm-local", "--config", str(cfg), "--name", "hk2", "--json", env=env)
        assert r.returncode == 0, r.stderr
        sub = json.loads(r.stdout)
        run_dir = Path(sub["run_dir"])
        wait_until(lambda: list((run_dir / "checkpoints").glob("step_*")), 240, "a first checkpoint")
        subprocess.run(["scancel", "--signal=USR2", sub["job_id"]], check=True, timeout=deadline(30))

        def ended() -> bool:
            row = json.loads(run_cli("status", sub["run_id"], "--json", env=env).stdout)["runs"][0]
            assert row["state"] not in ("FAILED", "CANCELLED", "NODE_FAIL"), row
            return row["state"] == "COMPLETED"

        wait_until(ended, 400, "the run to complete", every=2)
    finally:
        cancel_slurm_jobs_under(tmp_path)
    kinds = [t.split(") ")[1].split(":")[0] for t in hooks.texts("/a")]
    assert kinds == ["started", "requeued", "completed"], hooks.texts("/a")
    started, requeued, completed = hooks.texts("/a")
    assert f"started: job {sub['job_id']}; on a" in started  # the job's nodes
    assert f"job {sub['job_id']}; requeue #1" in requeued and "preemption" in requeued
    assert "step 12" in completed
    keys = {n["key"] for n in Registry(tmp_path / "reg.db").notifications(sub["run_id"])}
    assert keys == {"started", f"requeued:{sub['job_id']}:1", "completed"}
