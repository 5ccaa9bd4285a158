"""One vocabulary of run states: `watch`, `logs --follow` and `submit --wait` agree on what has ended.

UNKNOWN (no scheduler source knows the job right now) is active: all three keep polling it until a
final state arrives. Before the redesign `watch` took UNKNOWN as final, stopped and exited 1, while
`logs --follow` and `submit --wait` kept polling the same run. A scripted backend reports UNKNOWN
for a few polls and then COMPLETED; every consumer must end on COMPLETED.
"""

from __future__ import annotations

import time
from typing import ClassVar

import pytest

from clusterctl import backends
from clusterctl.backends.api import Backend, Poll
from clusterctl.runs.registry import Registry
from clusterctl.specs import ACTIVE_STATES, FINAL_STATES, RunRecord, RunState


class ScriptedBackend(Backend):
    """Reports each job's states from a script, one per poll; the last one sticks."""

    name = "slurm"
    initial_state = RunState.PENDING
    has_accounting = True
    script: ClassVar[list[RunState]] = [
        RunState.RUNNING,
        RunState.UNKNOWN,
        RunState.UNKNOWN,
        RunState.UNKNOWN,
        RunState.COMPLETED,
    ]

    def __init__(self) -> None:
        self.polls = 0

    def poll(self, pairs, now, timeout):
        state = self.script[min(self.polls, len(self.script) - 1)]
        self.polls += 1
        return Poll([{"state": state} if job.state != state else {} for _, job in pairs], source="script")


@pytest.fixture
def scripted(tmp_path, monkeypatch):
    """A registry with one Slurm run whose backend is the script above."""
    fake = ScriptedBackend()
    monkeypatch.setattr(backends, "get_backend", lambda executor: fake)
    import clusterctl.runs.status as status_mod

    monkeypatch.setattr(status_mod, "get_backend", lambda executor: fake)
    monkeypatch.setenv("CLUSTERCTL_REGISTRY", str(tmp_path / "reg.db"))
    reg = Registry()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    reg.add_run(
        RunRecord(
            "r1", "r1", "p", "slurm", str(run_dir), time.time(), "u", 1, 10, RunState.PENDING, plan={"global_batch": 8}
        )
    )
    reg.add_job("r1", "42", "submit")
    return reg, fake


def test_unknown_is_active_and_every_state_is_one_or_the_other():
    assert RunState.UNKNOWN in ACTIVE_STATES and not RunState.UNKNOWN.is_final()
    assert set(RunState) == ACTIVE_STATES | FINAL_STATES and not ACTIVE_STATES & FINAL_STATES


def test_watch_keeps_watching_an_unknown_run_until_it_ends(scripted, capsys):
    from clusterctl.cli.live import watch_runs

    _reg, fake = scripted
    code = watch_runs(["r1"], interval=0.01)
    out = capsys.readouterr().out
    assert "r1 UNKNOWN" in out  # it was shown ...
    assert code == 0 and "r1: COMPLETED" in out  # ... and waited on, not taken as an ending
    assert fake.polls >= len(fake.script)


def test_follow_and_wait_keep_polling_an_unknown_run_until_it_ends(scripted):
    from clusterctl.runs.lifecycle import follow_log

    reg, fake = scripted
    final = follow_log(reg, reg.get_run("r1"), rank=0, stderr=False, poll_s=0.01, write=lambda chunk: None)
    assert final == RunState.COMPLETED and fake.polls >= len(fake.script)
    assert reg.get_run("r1").state == RunState.COMPLETED
