"""Parsing of recorded squeue / sacct output, odd states included (pure, no Slurm needed)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterctl.backends.slurm import commands, parse
from clusterctl.specs import ACTIVE_STATES, FINAL_STATES, RunState
from vltrain.common.errors import UserError

FIX = Path(__file__).parent / "fixtures" / "slurm"


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@pytest.mark.parametrize(
    "raw, want",
    [
        ("CANCELLED by 0", "CANCELLED"),
        ("CANCELLED+", "CANCELLED"),
        ("cancelled by 1000", "CANCELLED"),
        ("NODE_FAIL", "NODE_FAIL"),
        ("BOOT_FAIL", "NODE_FAIL"),
        ("PREEMPTED", "PREEMPTED"),
        ("REQUEUE_HOLD", "REQUEUED"),
        ("REQUEUE_FED", "REQUEUED"),
        ("REQUEUED", "REQUEUED"),
        ("COMPLETING", "COMPLETING"),
        ("CONFIGURING", "RUNNING"),
        ("OUT_OF_MEMORY", "FAILED"),
        ("DEADLINE", "TIMEOUT"),
        ("TIMEOUT", "TIMEOUT"),
        ("PD", "PENDING"),
        ("R", "RUNNING"),
        ("CG", "COMPLETING"),
        ("  COMPLETED  ", "COMPLETED"),
        ("", "UNKNOWN"),
        ("SOME_FUTURE_STATE", "UNKNOWN"),
        ("STOPPED", "SUSPENDED"),
    ],
)
def test_normalize_state(raw, want):
    assert parse.normalize_state(raw) == want


def test_state_sets_partition_the_vocabulary():
    assert ACTIVE_STATES.isdisjoint(FINAL_STATES)
    assert set(RunState) == ACTIVE_STATES | FINAL_STATES
    assert {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "PREEMPTED",
        "NODE_FAIL",
    } <= set(RunState)
    assert not RunState.UNKNOWN.is_final()  # an unknown state is polled again, never taken as finished
    assert not RunState.final("UNKNOWN") and RunState.final("COMPLETED") and not RunState.final("garbage")
    # every state Slurm's names fold into is in the vocabulary
    assert {parse.normalize_state(k) for k in parse._ALIASES} <= set(RunState)


@pytest.mark.parametrize(
    "text, want",
    [
        ("0:00", 0),
        ("05:07", 307),
        ("3:00:00", 10800),
        ("1-02:03:04", 93784),
        ("00:00:01.500", 1),
        ("INVALID", None),
        ("UNLIMITED", None),
        ("", None),
        ("Partition_Limit", None),
    ],
)
def test_parse_duration(text, want):
    assert parse.parse_duration(text) == want


@given(st.integers(min_value=0, max_value=400 * 86400))
def test_duration_round_trip(seconds):
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    text = (f"{d}-" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"
    assert parse.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["Unknown", "None", "N/A", "", "(null)"])
def test_parse_time_unknowns(text):
    assert parse.parse_time(text) is None


@pytest.mark.parametrize(
    "text, want",
    [
        ("billing=8,cpu=8,gres/gpu=16,node=2", 16),
        ("cpu=1,node=1,gres/gpu:a100=4,gres/gpu:h100=2", 6),
        ("cpu=4,mem=16000M,node=2,billing=4", None),
        ("", None),
        ("gres/gpu=2,gres/gpu:a100=2", 2),
    ],
)
def test_tres_gpus(text, want):
    assert parse.tres_gpus(text) == want


def test_parse_squeue_odd_states():
    rows = parse.parse_squeue((FIX / "squeue_odd.txt").read_text())
    assert "squeue: warning" not in " ".join(rows)  # a non-row line is skipped, not misread
    assert rows["101"].state == "PENDING" and rows["101"].start is None and rows["101"].node_list is None
    r = rows["102"]
    assert (r.state, r.elapsed_s, r.start, r.node_list, r.alloc_gpus) == (
        "RUNNING",
        93784,
        ts("2024-05-01T10:00:00"),
        "a[1-2]",
        2,
    )
    assert rows["103"].restarts == 2 and rows["103"].reason == "BeginTime"
    assert rows["104_3"].alloc_gpus == 6 and rows["104_3"].elapsed_s == 307
    assert rows["104_[4-9]"].state == "PENDING"
    assert rows["105"].state == "REQUEUED" and rows["105"].raw_state == "REQUEUE_HOLD" and rows["105"].start is None
    assert [rows[j].state for j in ("106", "107", "108", "109", "110+0", "111", "112", "113", "114")] == [
        "COMPLETING",
        "CANCELLED",
        "NODE_FAIL",
        "PREEMPTED",
        "RUNNING",
        "RUNNING",
        "SUSPENDED",
        "FAILED",
        "UNKNOWN",
    ]


def test_parse_sacct_duplicates_steps_and_odd_states():
    rows = parse.parse_sacct((FIX / "sacct_odd.txt").read_text())
    assert not any("." in j for j in rows)  # the .batch step is not a job
    r = rows["201"]  # requeued twice (-D): last attempt wins, elapsed adds up
    assert (r.state, r.attempts, r.requeues, r.elapsed_s, r.alloc_gpus) == ("COMPLETED", 3, 2, 220.0, 2)
    assert (r.start, r.end, r.exit_code) == (ts("2024-05-01T10:03:00"), ts("2024-05-01T10:05:00"), "0:0")
    assert rows["202"].state == "CANCELLED" and rows["202"].raw_state == "CANCELLED by 0"
    assert rows["203"].state == "CANCELLED" and rows["203"].start is None and rows["203"].node_list is None
    assert rows["204"].state == "FAILED" and rows["204"].exit_code == "1:0"
    assert rows["205"].state == "TIMEOUT" and rows["205"].elapsed_s == 86410 and rows["205"].alloc_gpus == 64
    assert rows["206"].state == "NODE_FAIL" and rows["206"].alloc_gpus == 8
    assert rows["207"].state == "PENDING" and rows["207"].start is None and rows["207"].end is None
    assert rows["208_1"].state == "COMPLETED" and rows["208_[2-5]"].state == "PENDING"
    assert rows["209+0"].elapsed_s == 30  # blank ElapsedRaw: falls back to Elapsed
    assert rows["209+1"].state == "RUNNING" and rows["209+1"].end is None
    assert [rows[j].state for j in ("210", "211", "212", "213")] == ["FAILED", "NODE_FAIL", "TIMEOUT", "REQUEUED"]
    assert rows["213"].requeues == 1 and rows["204"].requeues == 0


@pytest.mark.parametrize(
    "stderr, want",
    [
        (
            "sbatch: error: Batch job submission failed: Invalid partition name specified\n",
            "Batch job submission failed: Invalid partition name specified",
        ),
        (
            "sbatch: error: invalid partition specified: nope\nsbatch: error: Batch job submission failed: Invalid partition name specified\n",
            "invalid partition specified: nope Batch job submission failed: Invalid partition name specified",
        ),
        (
            "Traceback ...\nsomething\n  sbatch: error: Batch job submission failed: Requested node configuration is not available\n",
            "Batch job submission failed: Requested node configuration is not available",
        ),
        ("plain failure line\n", "plain failure line"),
        ("", "no error message"),
    ],
)
def test_sbatch_error_line(stderr, want):
    assert parse.sbatch_error_line(stderr) == want
    assert "\n" not in parse.sbatch_error_line(stderr)


@pytest.mark.parametrize("bad", ["12;rm -rf /", "-1", "--all", "12 13", "abc", ""])
def test_job_ids_are_checked_before_any_call(bad):
    with pytest.raises(UserError, match="job id"):
        commands.squeue([bad])
    with pytest.raises(UserError, match="job id"):
        commands.scancel(bad)


def test_bad_signal_name_refused():
    with pytest.raises(UserError, match="--signal"):
        commands.scancel("12", signal="USR2; reboot")


# --- recorded on the local cluster (Slurm 22.05.8): completed, failed (exit 3), cancelled while
# held, a 2-node GPU job requeued twice and now pending, a 3-task array, a time-out ---------------


def test_real_squeue_22_05():
    rows = parse.parse_squeue((FIX / "squeue_real_22.05.txt").read_text())
    assert {j: r.state for j, r in rows.items()} == {
        "1": "COMPLETED",
        "2": "FAILED",
        "3": "CANCELLED",
        "4": "PENDING",
        "5_1": "RUNNING",
        "5_2": "RUNNING",
        "5_3": "RUNNING",
        "8": "TIMEOUT",
    }
    r = rows["4"]
    assert (r.restarts, r.reason, r.alloc_gpus, r.node_list, r.elapsed_s) == (2, "BeginTime", 4, None, 0)
    assert rows["5_2"].elapsed_s == 131 and rows["5_2"].node_list == "c1" and rows["5_2"].alloc_gpus is None
    assert rows["8"].reason == "TimeLimit" and rows["8"].start == ts("2026-11-22T17:52:40")


def test_real_sacct_22_05():
    rows = parse.parse_sacct((FIX / "sacct_real_22.05.txt").read_text())
    assert {j: r.state for j, r in rows.items()} == {
        "1": "COMPLETED",
        "2": "FAILED",
        "3": "CANCELLED",
        "4": "REQUEUED",
        "5_1": "RUNNING",
        "5_2": "RUNNING",
        "5_3": "RUNNING",
        "8": "TIMEOUT",
    }
    r = rows["4"]  # two REQUEUED rows, interleaved with the array's rows
    assert (r.attempts, r.requeues, r.elapsed_s, r.alloc_gpus, r.start) == (2, 2, 86.0, 4, ts("2026-11-22T17:53:16"))
    assert rows["2"].exit_code == "3:0" and rows["3"].raw_state == "CANCELLED by 0" and rows["3"].node_list is None
    assert rows["5_1"].end is None and rows["8"].elapsed_s == 66


@pytest.mark.parametrize(
    "stderr, want",
    [  # recorded on 22.05.8
        (
            "sacct: error: slurm_persist_conn_open_without_init: failed to open persistent connection to host:localhost:16819: "
            "Connection refused\nsacct: error: Sending PersistInit msg: Connection refused\n"
            "sacct: error: Problem talking to the database: Connection refused\n",
            "Problem talking to the database: Connection refused",
        ),
        ("sacct: error: Slurm accounting storage is disabled\n", "Slurm accounting storage is disabled"),
    ],
)
def test_sacct_error_is_its_last_line(stderr, want):
    assert parse.error_line(stderr, "sacct", last=True) == want


def test_scancel_error_line():
    assert parse.error_line("scancel: error: Kill job error on job id 2: Invalid job id specified\n", "scancel") == (
        "Kill job error on job id 2: Invalid job id specified"
    )
