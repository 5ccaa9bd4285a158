"""Slurm's client commands, called at the edge: one subprocess per question, with a timeout.

Why the care: a real cluster's controller can hang (every client call then blocks ~10 s per try),
accounting can be disabled or lagging, and array / heterogeneous job ids look like 123_4 or 123+0.
Every call here is batched (one process for all job ids), killed with its whole process group on
time-out, and turned into one typed error: `SlurmUnavailable` / `AccountingUnavailable` for an
outage (the caller decides what to show), `UserError` for what the user asked that cannot be done.
The text they print is parsed by clusterctl.backends.slurm.parse.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal as _signal
import subprocess
from datetime import datetime

from clusterctl.backends.slurm.parse import (
    JOB_ID,
    SACCT_FIELDS,
    SQUEUE_FIELDS,
    AcctRow,
    QueueRow,
    error_line,
    parse_sacct,
    parse_scontrol_restarts,
    parse_squeue,
)
from vltrain.common.errors import ServiceUnavailable, UserError

TIMEOUT_ENV = "CLUSTERCTL_SLURM_TIMEOUT"
CLIENT_TOOLS = "allowed: a machine with Slurm's client tools"


class SlurmUnavailable(ServiceUnavailable):
    """The controller did not answer (time-out, down) or Slurm's client tools are missing."""


class AccountingUnavailable(ServiceUnavailable):
    """sacct cannot answer: accounting storage disabled, slurmdbd down or slow, no sacct binary."""


def slurm_timeout(default: float = 10.0) -> float:
    """Seconds to wait for slurmctld / slurmdbd: $CLUSTERCTL_SLURM_TIMEOUT, else 10."""
    try:
        return float(os.environ.get(TIMEOUT_ENV, default))
    except ValueError:
        raise UserError(
            f"{TIMEOUT_ENV}: {os.environ[TIMEOUT_ENV]!r} is not a number; allowed: seconds, e.g. 10"
        ) from None


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
    """The controller's view of `job_ids` (including recently finished ones), in one call."""
    ids = _check_ids(job_ids)
    if not ids:
        return {}
    fmt = ",".join(f"{f}:|" for f in SQUEUE_FIELDS)
    try:
        r = run(["squeue", "-h", "-a", "-r", "-t", "all", "-j", ",".join(ids), "-O", fmt], timeout)
    except FileNotFoundError:
        raise SlurmUnavailable("squeue: not found on PATH", hint=CLIENT_TOOLS) from None
    except TimeoutError:
        raise SlurmUnavailable(f"squeue: slurmctld did not answer within {timeout:g} s") from None
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:
            return {}  # every id has left the controller's memory: not an outage
        raise SlurmUnavailable(f"squeue: {error_line(r.stderr, 'squeue', last=True)}")
    return parse_squeue(r.stdout)


def sacct(job_ids: list[str], timeout: float = 10, since: float | None = None) -> dict[str, AcctRow]:
    """Accounting rows for `job_ids` (every attempt, -D), in one call.

    `since` (epoch; pass the earliest submission time) keeps out older jobs that had the same id:
    a test cluster whose state was wiped hands out ids from 1 again while slurmdbd remembers."""
    ids = _check_ids(job_ids)
    if not ids:
        return {}
    argv = ["sacct", "-X", "-D", "-P", "-n", f"--format={','.join(SACCT_FIELDS)}", "-j", ",".join(ids)]
    if since is not None:
        argv += ["-S", datetime.fromtimestamp(since).strftime("%Y-%m-%dT%H:%M:%S")]
    try:
        r = run(argv, timeout)
    except FileNotFoundError:
        raise AccountingUnavailable("sacct: not found on PATH") from None
    except TimeoutError:
        raise AccountingUnavailable(f"sacct: slurmdbd did not answer within {timeout:g} s") from None
    if r.returncode != 0:
        raise AccountingUnavailable(f"sacct: {error_line(r.stderr, 'sacct', last=True)}")
    return parse_sacct(r.stdout)


def scontrol_requeue_counts(job_ids: list[str], timeout: float = 10) -> dict[str, int]:
    """Slurm's restart count per job, from one `scontrol show job -o` call."""
    ids = _check_ids(job_ids)
    if not ids:
        return {}
    argv = ["scontrol", "show", "job", "-o"] + (ids if len(ids) == 1 else [])  # one id, or all and filter
    try:
        r = run(argv, timeout)
    except FileNotFoundError:
        raise SlurmUnavailable("scontrol: not found on PATH", hint=CLIENT_TOOLS) from None
    except TimeoutError:
        raise SlurmUnavailable(f"scontrol: slurmctld did not answer within {timeout:g} s") from None
    if r.returncode != 0 and "Invalid job id" not in r.stderr:
        raise SlurmUnavailable(f"scontrol: {error_line(r.stderr, 'scontrol')}")
    counts = parse_scontrol_restarts(r.stdout)
    return {j: counts[j] for j in ids if j in counts}


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
