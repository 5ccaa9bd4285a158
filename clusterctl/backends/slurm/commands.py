"""Slurm's client commands, called at the edge: one subprocess per question, with a timeout.

Why the care: a real cluster's controller can hang (every client call then blocks ~10 s per try),
accounting can be disabled or lagging, and array / heterogeneous job ids look like 123_4 or 123+0.
Every call here is batched (one process for all job ids), killed with its whole process group on
time-out, and turned into one typed error: `SlurmUnavailable` / `AccountingUnavailable` for an
outage (the caller decides what to show), `UserError` for what the user asked that cannot be done.
The text they print is parsed by clusterctl.backends.slurm.parse.

Time budget: $CLUSTERCTL_SLURM_TIMEOUT (default 10 s) bounds a whole refresh, not each call.
`slurm_timeout()` opens a refresh's budget and returns what is left of it: the first refresh of a
process counts from the process's start (so `clusterctl status` with a hung controller answers
within the time-out, start-up included), later ones (watch, --wait, logs --follow) from when they
begin; a margin is kept back for the rest of the command. squeue may use SQUEUE_SHARE of what is
left; the sacct that follows it in the same refresh gets the rest, never more.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal as _signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime

from clusterctl.backends.slurm.parse import (
    JOB_ID,
    SACCT_FIELDS,
    SQUEUE_FIELDS,
    AcctRow,
    Partition,
    QueueRow,
    error_line,
    parse_partitions,
    parse_sacct,
    parse_squeue,
)
from vltrain.common.errors import ServiceUnavailable, UserError

TIMEOUT_ENV = "CLUSTERCTL_SLURM_TIMEOUT"
CLIENT_TOOLS = "allowed: a machine with Slurm's client tools"


class SlurmUnavailable(ServiceUnavailable):
    """The controller did not answer (time-out, down) or Slurm's client tools are missing."""


class AccountingUnavailable(ServiceUnavailable):
    """sacct cannot answer: accounting storage disabled, slurmdbd down or slow, no sacct binary."""


TIMEOUT_RANGE = (1.0, 3600.0)  # seconds allowed in $CLUSTERCTL_SLURM_TIMEOUT
MARGIN_S = 1.0  # kept back from the budget for what the command does after asking (at most 10% of it)
SQUEUE_SHARE = 2 / 3  # of what is left: the rest stays for sacct, which a failed squeue always brings
MIN_CALL_S = 0.05  # less than this left: the call is not made (it could not answer)
PAIR_GAP_S = 1.0  # a sacct this soon after squeue belongs to the same refresh


def configured_timeout(default: float = 10.0) -> float:
    """$CLUSTERCTL_SLURM_TIMEOUT in seconds (else `default`): a finite number in TIMEOUT_RANGE,
    else a one-line error naming the variable and the range."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    lo, hi = TIMEOUT_RANGE
    if not (math.isfinite(value) and lo <= value <= hi):
        shown = repr(raw) if raw.isprintable() else ascii(raw)
        raise UserError(
            f"{TIMEOUT_ENV}: {shown} is not a time-out; allowed: seconds from {lo:g} to {hi:g} "
            f"(the whole command's wait for Slurm), e.g. 10"
        )
    return value


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc), None where that cannot be read."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        start_ticks = int(stat.rsplit(b")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class _Budget:
    total: float  # the configured time-out (what messages name)
    deadline: float  # time.monotonic() by which the refresh's Slurm calls must be done
    ended: float | None = None  # when the squeue of this budget returned


_round: _Budget | None = None  # opened by slurm_timeout(), taken by the next squeue
_pair: _Budget | None = None  # left by squeue for the sacct that may follow it
_first_round = True


def slurm_timeout(default: float = 10.0) -> float:
    """Seconds the Slurm calls of one refresh may take: $CLUSTERCTL_SLURM_TIMEOUT (else 10) less
    a margin and, for the first refresh of a process, less the time since the process started
    (when that is shorter than the time-out: a long-lived process is not short-changed)."""
    global _round, _first_round
    total = configured_timeout(default)
    spent = 0.0
    if _first_round:
        _first_round = False
        age = process_age()
        if age is not None and age < total:
            spent = age
    left = total - spent - min(MARGIN_S, 0.1 * total)
    _round = _Budget(total, time.monotonic() + left)
    return max(0.0, left)


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a client command; on time-out kill its whole process group (a wrapper script's children
    would otherwise keep the pipes open and make us wait for them). Raises TimeoutError, FileNotFoundError."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=os.environ | {"SLURM_TIME_FORMAT": "standard"},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, _signal.SIGKILL)
        proc.communicate()
        raise TimeoutError(f"{argv[0]} did not answer within {timeout:g} s") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _check_ids(job_ids: list[str]) -> list[str]:
    bad = [j for j in job_ids if not JOB_ID.match(str(j))]
    if bad:
        raise UserError(f"job id: {bad[0]!r} is not a Slurm job id; allowed: digits, 123_4 (array), 123+0 (het)")
    return [str(j) for j in job_ids]


def squeue(job_ids: list[str], timeout: float = 10) -> dict[str, QueueRow]:
    """The controller's view of `job_ids` (including recently finished ones), in one call.
    `timeout`: the refresh's budget; squeue waits at most SQUEUE_SHARE of it, the rest is left
    for the sacct that may follow."""
    global _round, _pair
    ids = _check_ids(job_ids)
    if not ids:
        return {}
    now = time.monotonic()
    rnd, _round = _round, None
    budget = _Budget(
        rnd.total if rnd is not None else timeout,
        min(now + timeout, rnd.deadline) if rnd is not None else now + timeout,
    )
    _pair = budget
    wait = (budget.deadline - now) * SQUEUE_SHARE
    fmt = ",".join(f"{f}:|" for f in SQUEUE_FIELDS)
    try:
        if wait < MIN_CALL_S:
            raise SlurmUnavailable(f"squeue: no time left of the {budget.total:g} s time-out ({TIMEOUT_ENV})")
        try:
            r = run(["squeue", "-h", "-a", "-r", "-t", "all", "-j", ",".join(ids), "-O", fmt], wait)
        except FileNotFoundError:
            raise SlurmUnavailable("squeue: not found on PATH", hint=CLIENT_TOOLS) from None
        except TimeoutError:
            raise SlurmUnavailable(f"squeue: slurmctld did not answer within {budget.total:g} s") from None
    finally:
        budget.ended = time.monotonic()
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:
            return {}  # every id has left the controller's memory: not an outage
        raise SlurmUnavailable(f"squeue: {error_line(r.stderr, 'squeue', last=True)}")
    return parse_squeue(r.stdout)


def sacct(job_ids: list[str], timeout: float = 10, since: float | None = None) -> dict[str, AcctRow]:
    """Accounting rows for `job_ids` (every attempt, -D), in one call.

    `since` (epoch; pass the earliest submission time) keeps out older jobs that had the same id:
    a test cluster whose state was wiped hands out ids from 1 again while slurmdbd remembers.
    Right after a squeue (same refresh) it waits no longer than that refresh's budget allows."""
    global _pair
    ids = _check_ids(job_ids)
    if not ids:
        return {}
    pair, _pair = _pair, None
    now = time.monotonic()
    total = timeout
    if pair is not None and pair.ended is not None and now - pair.ended < PAIR_GAP_S:
        timeout, total = min(timeout, pair.deadline - now), pair.total
    if timeout < MIN_CALL_S:
        raise AccountingUnavailable(f"sacct: no time left of the {total:g} s time-out ({TIMEOUT_ENV})")
    argv = ["sacct", "-X", "-D", "-P", "-n", f"--format={','.join(SACCT_FIELDS)}", "-j", ",".join(ids)]
    if since is not None:
        argv += ["-S", datetime.fromtimestamp(since).strftime("%Y-%m-%dT%H:%M:%S")]
    try:
        r = run(argv, timeout)
    except FileNotFoundError:
        raise AccountingUnavailable("sacct: not found on PATH") from None
    except TimeoutError:
        raise AccountingUnavailable(f"sacct: slurmdbd did not answer within {total:g} s") from None
    if r.returncode != 0:
        raise AccountingUnavailable(f"sacct: {error_line(r.stderr, 'sacct', last=True)}")
    return parse_sacct(r.stdout)


def _ask(argv: list[str], timeout: float) -> str:
    """The stdout of a read-only Slurm query (scontrol show, sinfo); SlurmUnavailable, one line, when the
    tool is missing, the controller does not answer in `timeout`, or the tool fails."""
    tool = argv[0]
    try:
        r = run(argv, timeout)
    except FileNotFoundError:
        raise SlurmUnavailable(f"{tool}: not found on PATH", hint=CLIENT_TOOLS) from None
    except TimeoutError:
        raise SlurmUnavailable(f"{tool}: slurmctld did not answer within {timeout:g} s") from None
    if r.returncode != 0:
        raise SlurmUnavailable(f"{tool}: {error_line(r.stderr, tool, last=True)}")
    return r.stdout


def partitions(timeout: float) -> dict[str, Partition]:
    """The cluster's partitions (`scontrol show partition -o`, hidden ones included: -a), in one call.
    SlurmUnavailable when the client tools are missing or the controller does not answer in `timeout`."""
    return parse_partitions(_ask(["scontrol", "-a", "-o", "show", "partition"], timeout))


def node_states(nodes: str, timeout: float) -> str:
    """`sinfo -h -N -n NODES -o '%N|%T'`: one 'node|state' line per node of a hostlist ('a[1-2]'),
    parsed by failed_nodes.sick_nodes. SlurmUnavailable when sinfo is missing or does not answer."""
    return _ask(["sinfo", "-h", "-N", "-n", nodes, "-o", "%N|%T"], timeout)


def scancel(job_id: str, signal: str | None = None, timeout: float = 30) -> None:
    """Cancel a job, or only send it `signal` (e.g. USR2 to make submitit checkpoint and requeue)."""
    (jid,) = _check_ids([job_id])
    argv = ["scancel"]
    if signal is not None:
        if not re.fullmatch(r"(SIG)?[A-Z0-9]{1,8}", signal):
            raise UserError(f"--signal: {signal!r} is not a signal name; allowed: e.g. USR2, TERM, INT")
        argv.append(f"--signal={signal}")
    try:
        r = run([*argv, jid], timeout)
    except FileNotFoundError:
        raise UserError(f"scancel: not found on PATH; {CLIENT_TOOLS}") from None
    except TimeoutError:
        raise UserError(
            f"scancel: slurmctld did not answer within {timeout:g} s; allowed: retry when the controller is back"
        ) from None
    if r.returncode != 0:
        raise UserError(f"scancel {jid}: {error_line(r.stderr, 'scancel')}")


def set_dependency(job_id: str, dependency: str, timeout: float = 30) -> None:
    """Point a pending job's --dependency elsewhere (`scontrol update JobId=.. Dependency=..`): a run
    waiting for another (submit --after) follows that run's retry to its new job id."""
    (jid,) = _check_ids([job_id])
    if not re.fullmatch(r"after(ok|any|notok):\d+(,after(ok|any|notok):\d+)*", dependency):
        raise UserError(f"dependency: {dependency!r} is not one; allowed: afterok:ID, afterany:ID, comma-separated")
    try:
        r = run(["scontrol", "update", f"JobId={jid}", f"Dependency={dependency}"], timeout)
    except FileNotFoundError:
        raise UserError(f"scontrol: not found on PATH; {CLIENT_TOOLS}") from None
    except TimeoutError:
        raise UserError(f"scontrol: slurmctld did not answer within {timeout:g} s") from None
    if r.returncode != 0:
        raise UserError(f"scontrol update {jid}: {error_line(r.stderr, 'scontrol')}")
