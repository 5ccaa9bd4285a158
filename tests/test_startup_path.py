"""What a run's start-up path imports (issue 29 point 3, docs/performance.md "time to first step").

`clusterctl submit` pickles the job (runs.attempt.Attempt) and hands it to sbatch; it must not pay
for torch (1.4 s of a 1.9 s submit before it was imported lazily). The job unpickles the same class
on every rank before the trainer starts, so what it pulls in is paid once per process too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, deadline, run_cli, trainer_shards

HEAVY = ("torch", "deepspeed", "webdataset", "numpy", "codecarbon", "pandas")

# What submit does with the job: build the Attempt and pickle it as submitit does (cloudpickle).
PICKLE_ATTEMPT = """
import json, sys
import cloudpickle
from clusterctl.runs import submit
from clusterctl.backends import get_backend
from clusterctl.runs.attempt import Attempt
get_backend("slurm"), get_backend("local")
blob = cloudpickle.dumps(Attempt("/tmp/run", "run-1", "/tmp/registry.db"))
print(json.dumps({"bytes": len(blob), "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)

# What the job does before it calls the Attempt: unpickle it (submitit.core._submit).
UNPICKLE_ATTEMPT = """
import json, pickle, sys
import cloudpickle
from clusterctl.runs.attempt import Attempt
blob = cloudpickle.dumps(Attempt("/tmp/run", "run-1", "/tmp/registry.db"))
for m in [m for m in sys.modules if m.startswith(("clusterctl", "submitit"))]:
    del sys.modules[m]
job = pickle.loads(blob)
print(json.dumps({"type": type(job).__name__, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _probe(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=deadline(60))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_submit_pickles_the_job_without_torch():
    got = _probe(PICKLE_ATTEMPT)
    assert got["bytes"] > 0
    assert got["heavy"] == [], f"submit's path imported {got['heavy']}"


def test_the_job_unpickles_its_attempt_without_torch():
    got = _probe(UNPICKLE_ATTEMPT)
    assert got["type"] == "Attempt"
    assert got["heavy"] == [], f"unpickling the job imported {got['heavy']}"


# --- the startup event (vltrain.startup) -------------------------------------------------------------


def test_phases_count_from_the_process_and_from_each_mark():
    from vltrain.startup import phases

    marks = [("launch", 10.5), ("imports", 12.0), ("engine", 12.25)]
    assert phases(marks, 10.0) == {"launch": 0.5, "imports": 1.5, "engine": 0.25}
    assert phases(marks, None) == {"imports": 1.5, "engine": 0.25}  # no creation time: the first is unknown
    assert phases([], 10.0) == {}


def test_process_started_is_when_this_process_was_created(tmp_path):
    """A child reports its own creation time: after the parent launched it, before its first line ran."""
    code = "import time; t = time.time(); from vltrain.startup import process_started; print(process_started(), t)"
    before = time.time()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=deadline(60))
    assert r.returncode == 0, r.stderr
    started, first_line = map(float, r.stdout.split())
    tick = 0.02  # /proc counts in clock ticks (10 ms), and uptime in hundredths
    assert before - tick <= started <= first_line + tick
    from vltrain.startup import process_started

    assert process_started(tmp_path) is None  # no /proc there: unknown, not an error


def test_finish_reports_the_marks_once_and_logs_a_line():
    from vltrain import startup

    startup._MARKS.clear()  # another test's run in this process may have left marks
    startup.mark("imports")
    time.sleep(0.12)
    fields = startup.finish("engine")
    assert list(fields["phases"]) == ["imports", "engine"] and fields["phases"]["engine"] >= 0.1
    assert fields["total_s"] == round(sum(fields["phases"].values()), 3)
    assert "engine 0.1" in startup.log_line(fields)
    again = startup.finish("first_step")  # a second run in this process counts from the first's end
    assert list(again["phases"]) == ["first_step"] and again["phases"]["first_step"] < 0.1


# --- the energy tracker's set-up off the first step's path (vltrain.energy.StartingEnergy) ---------------


class _Tracker:
    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.gate, self.fail, self.calls = gate, fail, []

    def start(self) -> None:
        if self.gate is not None:
            assert self.gate.wait(deadline(30))
        if self.fail:
            raise RuntimeError("no tracker here")
        self.calls.append("start")

    def maybe_flush(self, force: bool = False) -> None:
        self.calls.append(f"flush{' forced' if force else ''}")

    def stop(self) -> None:
        self.calls.append("stop")


def test_starting_energy_skips_flushes_until_set_up_and_stop_waits():
    from vltrain.energy import StartingEnergy

    gate = threading.Event()
    tracker = _Tracker(gate)
    energy = StartingEnergy(lambda: tracker)  # type: ignore[arg-type,return-value]
    energy.maybe_flush()  # still setting up: skipped, not waited for
    assert tracker.calls == []
    gate.set()
    energy.stop()
    assert tracker.calls == ["start", "stop"]


def test_starting_energy_raises_a_failed_set_up_where_it_is_used():
    from vltrain.energy import StartingEnergy

    energy = StartingEnergy(lambda: _Tracker(fail=True))  # type: ignore[arg-type,return-value]
    with pytest.raises(RuntimeError, match="no tracker here"):
        energy.maybe_flush(force=True)
    energy.stop()  # raised once: stopping after it is quiet


def test_a_fork_waits_for_the_energy_set_up():
    """The data loader's workers fork: the child must not start while the set-up thread is importing."""
    from vltrain.energy import StartingEnergy

    gate = threading.Event()
    tracker = _Tracker(gate)
    energy = StartingEnergy(lambda: tracker)  # type: ignore[arg-type,return-value]
    threading.Timer(0.3, gate.set).start()
    pid = os.fork()
    if pid == 0:  # the child: nothing but exit
        os._exit(0)
    assert tracker.calls == ["start"], "forked before the set-up ended"
    os.waitpid(pid, 0)
    energy.stop()


# --- a real run ----------------------------------------------------------------------------------------

JOB_PHASES = ["launch", "attempt", "imports", "checks", "process_group", "checkpoint", "tokenizer", "engine"]
JOB_PHASES += ["loader", "start", "energy", "first_step"]


@pytest.mark.slow
def test_status_reads_the_latest_attempts_startup_and_nothing_it_cannot_trust(tmp_path):
    """artifacts.startup_headline: the newest `startup` event (a requeued run's second attempt, not its
    first); phases that are not finite numbers left out; an event without a total or with phases that
    are not a mapping is no start-up (None), not a traceback in status."""
    from clusterctl.render.status_table import startup_text
    from clusterctl.runs import artifacts

    events = tmp_path / "events.jsonl"
    lines = [
        {"event": "start", "step": 0, "attempt": 0},
        {"event": "startup", "step": 1, "attempt": 0, "total_s": 9.5, "phases": {"imports": 4.0}},
        {"event": "resume", "step": 4, "attempt": 1},
        {
            "event": "startup",
            "step": 5,
            "attempt": 1,
            "total_s": 6.25,
            "phases": {"imports": 3.0, "x": "NaN", "y": 0.05},
        },
    ]
    events.write_text("\n".join(map(json.dumps, lines)) + "\nnot json startup\n")
    got = artifacts.startup_headline(artifacts.events_of(events, "resume", "startup"))
    assert got == {"attempt": 1, "step": 5, "total_s": 6.25, "phases": {"imports": 3.0, "y": 0.05}}
    assert startup_text(got) == "first step 6.2 s after the process started (attempt 1): imports 3.0"
    assert artifacts.count_events(events, "resume") == 1
    for bad in ({"total_s": float("nan"), "phases": {}}, {"total_s": 1.0, "phases": [1]}, {"phases": {"a": 1.0}}):
        assert artifacts.startup_headline([{"event": "startup", **bad}]) is None, bad
    assert artifacts.startup_headline(artifacts.events_of(tmp_path / "missing.jsonl", "startup")) is None
    assert startup_text(None) is None


def test_a_submitted_run_writes_its_startup_event(tmp_path):
    """`submit --profile local` (submitit's local executor, the clusterctl wrapper around the trainer, the
    site's energy tracker): rank 0 writes one `startup` event after its first step, with every phase from
    the process's creation, and says it in the job's log; `status` shows it (--json and text)."""
    data, tok = trainer_shards(tmp_path / "data") / "shards", tmp_path / "data" / "tok.model"
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # not HOME: the comm op's build cache is under it
    args = ["--steps", "2", "--set", "log_every=1", "--set", "eval_every=0", "--set", "checkpoint_every=0"]
    args += ["--set", f"data.shards={data}", "--set", f"data.tokenizer={tok}", "--name", "startup"]
    r = run_cli("submit", "--profile", "local", *args, "--wait", "--json", env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run_dir = next((tmp_path / "runs").iterdir())
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names.count("startup") == 1 and names.index("start") < names.index("startup") < names.index("finish")
    got = events[names.index("startup")]
    assert got["step"] == 1 and list(got["phases"]) == JOB_PHASES
    assert all(v >= 0 for v in got["phases"].values())
    assert got["process_started"] + got["total_s"] == pytest.approx(got["time"], abs=0.05)
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert got["process_started"] < events[0]["time"] < got["time"] <= first["time"]
    log = "".join(p.read_text() for p in run_dir.glob("submitit/*/*_0_log.out"))
    assert log.count("vltrain: first step ") == 1 and "after the process started (" in log
    assert list((run_dir / "energy").glob("node000-*.csv")), "the energy tracker, set up on a thread, wrote nothing"
    # `status --json` carries it (the run's own row and, from the registry's summaries, --all's), the text one line
    want = {"attempt": got["attempt"], "step": 1, "total_s": got["total_s"], "phases": got["phases"]}
    (row,) = json.loads(run_cli("status", "startup", "--json", env=env).stdout)["runs"]
    assert row["startup"] == want
    assert json.loads(run_cli("status", "--all", "--json", env=env).stdout)["runs"][0]["startup"] == want
    text = run_cli("status", "startup", env=env | {"COLUMNS": "200"}).stdout
    assert f"first step {got['total_s']:.1f} s after the process started: " in text, text
    assert f"imports {got['phases']['imports']:.1f}" in text or got["phases"]["imports"] < 0.1, text


def test_the_freeze_reads_each_distributions_name_and_version_as_its_metadata_says():
    """submit's pip-freeze.txt reads only the metadata headers (runs.provenance.name_version): the same
    Name and Version as the full parse, for every distribution installed here."""
    from importlib import metadata

    from clusterctl.runs.provenance import name_version

    dists = list(metadata.distributions())
    assert len(dists) > 10
    assert [name_version(d) for d in dists] == [(d.metadata["Name"] or "", d.version) for d in dists]
