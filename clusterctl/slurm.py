"""Slurm's client commands: calls at the edge (one subprocess per question, with a timeout), parsing pure.

Why the care: a real cluster's controller can hang (every client call then blocks ~10 s per try),
accounting can be disabled or lagging, states come with decorations ('CANCELLED by 0', 'CANCELLED+'),
and array / heterogeneous job ids look like 123_4 or 123+0. Every call here is batched (one process
for all job ids), killed with its whole process group on time-out, and turned into one typed error.
Parsers take the text Slurm printed and return plain rows, so they are tested on recorded output.

Formats: `squeue --json` in 22.05 ignores -j and -t (it dumps every job, ~3.5 KB each) and its
schema changes with each Slurm release, so we use `squeue -O Field:|,...` (no padding, '|' after each
field; checked on 22.05.8) and `sacct -P` (pipe-delimited by design). squeue's RestartCnt is the
requeue count (sacct 22.05 has no Restarts field); sacct -D lists every attempt of a requeued job.
JobArrayID (not JobID) gives array tasks as 123_4, the form submitit and sacct use.
"""

from __future__ import annotations

import os
import re
import signal as _signal
import subprocess
from dataclasses import dataclass
from datetime import datetime

from vltrain.errors import UserError

# The state vocabulary of clusterctl (Slurm's many states fold into these).
PENDING, RUNNING, REQUEUED, COMPLETING, SUSPENDED = "PENDING", "RUNNING", "REQUEUED", "COMPLETING", "SUSPENDED"
COMPLETED, FAILED, CANCELLED, TIMEOUT, PREEMPTED, NODE_FAIL = "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL"
UNKNOWN = "UNKNOWN"
ACTIVE = (PENDING, RUNNING, REQUEUED, COMPLETING, SUSPENDED)
FINAL = (COMPLETED, FAILED, CANCELLED, TIMEOUT, PREEMPTED, NODE_FAIL)
STATES = (*ACTIVE, *FINAL, UNKNOWN)

# Slurm's long and compact (squeue %t) names -> ours. Kept explicit: a new Slurm state shows up as
# UNKNOWN (still polled) instead of silently counting as finished.
_ALIASES = {
    "PENDING": PENDING, "PD": PENDING, "RESV_DEL_HOLD": PENDING, "RD": PENDING,
    "RUNNING": RUNNING, "R": RUNNING, "CONFIGURING": RUNNING, "CF": RUNNING, "RESIZING": RUNNING,
    "RS": RUNNING, "SIGNALING": RUNNING, "SI": RUNNING,
    "REQUEUED": REQUEUED, "RQ": REQUEUED, "REQUEUE_HOLD": REQUEUED, "RH": REQUEUED, "REQUEUE_FED": REQUEUED,
    "RF": REQUEUED,
    "COMPLETING": COMPLETING, "CG": COMPLETING, "STAGE_OUT": COMPLETING, "SO": COMPLETING,
    "SUSPENDED": SUSPENDED, "S": SUSPENDED, "STOPPED": SUSPENDED, "ST": SUSPENDED,
    "COMPLETED": COMPLETED, "CD": COMPLETED,
    "FAILED": FAILED, "F": FAILED, "OUT_OF_MEMORY": FAILED, "OOM": FAILED, "SPECIAL_EXIT": FAILED, "SE": FAILED,
    "CANCELLED": CANCELLED, "CA": CANCELLED, "REVOKED": CANCELLED, "RV": CANCELLED,
    "TIMEOUT": TIMEOUT, "TO": TIMEOUT, "DEADLINE": TIMEOUT, "DL": TIMEOUT,
    "PREEMPTED": PREEMPTED, "PR": PREEMPTED,
    "NODE_FAIL": NODE_FAIL, "NF": NODE_FAIL, "BOOT_FAIL": NODE_FAIL, "BF": NODE_FAIL,
}

SQUEUE_FIELDS = ("JobArrayID", "State", "TimeUsed", "StartTime", "NodeList", "tres-alloc", "RestartCnt", "Reason")
SACCT_FIELDS = ("JobID", "State", "Elapsed", "ElapsedRaw", "Start", "End", "AllocTRES", "NodeList", "ExitCode")
JOB_ID = re.compile(r"^\d+(?:_\d+)?(?:\+\d+)?$")


class SlurmUnavailable(UserError):
    """The controller did not answer (time-out, down) or Slurm's client tools are missing."""


class AccountingUnavailable(UserError):
    """sacct cannot answer: accounting storage disabled, slurmdbd down or slow, no sacct binary."""


@dataclass(frozen=True)
class QueueRow:
    """What the controller knows about a job right now (squeue)."""

    job_id: str
    state: str
    raw_state: str
    elapsed_s: float | None  # of the current attempt
    start: float | None
    node_list: str | None
    alloc_gpus: int | None
    restarts: int
    reason: str


@dataclass(frozen=True)
class AcctRow:
    """What accounting knows about a job (sacct -X -D: the latest attempt, totals over all)."""

    job_id: str
    state: str
    raw_state: str
    elapsed_s: float | None  # summed over every attempt of this job id
    start: float | None  # of the latest attempt
    end: float | None
    alloc_gpus: int | None
    node_list: str | None
    exit_code: str | None
    attempts: int  # rows with this id: one per start (a requeued, pending job has no row for the next)
    requeues: int  # attempts that ended in a requeue


# --- pure parsing -----------------------------------------------------------------------------

def normalize_state(raw: str) -> str:
    """'CANCELLED by 0' -> CANCELLED, 'CANCELLED+' -> CANCELLED, 'REQUEUE_HOLD' -> REQUEUED, ..."""
    token = raw.strip().split(" ", 1)[0].rstrip("+").upper() if raw.strip() else ""
    return _ALIASES.get(token, UNKNOWN)


def is_final(state: str) -> bool:
    return state in FINAL


def parse_time(text: str) -> float | None:
    """Slurm's local ISO time ('2024-05-01T10:00:00') -> epoch seconds; 'Unknown', 'None', 'N/A' -> None."""
    text = text.strip()
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def parse_duration(text: str) -> float | None:
    """'1-02:03:04', '02:03:04', '03:04', '0:00' -> seconds; 'INVALID', 'UNLIMITED', '' -> None."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)(?:\.\d+)?", text.strip())
    if not m:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def parse_tres(text: str) -> dict[str, str]:
    """'billing=8,cpu=8,gres/gpu=16,node=2' -> {'billing': '8', ..., 'gres/gpu': '16'}."""
    out = {}
    for part in text.strip().split(","):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def tres_gpus(text: str) -> int | None:
    """GPUs in a TRES string: 'gres/gpu=N', else the sum of typed 'gres/gpu:a100=N'; None when absent."""
    tres = parse_tres(text)
    if "gres/gpu" in tres:
        return _int(tres["gres/gpu"])
    typed = [_int(v) for k, v in tres.items() if k.startswith("gres/gpu:")]
    return sum(v for v in typed if v is not None) if typed else None


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _none(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "None", "(null)", "None assigned", "N/A") else text


def parse_squeue(text: str) -> dict[str, QueueRow]:
    """Rows of `squeue -h -O <SQUEUE_FIELDS with '|' suffix>` keyed by job id (123, 123_4, 123+0)."""
    rows: dict[str, QueueRow] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < len(SQUEUE_FIELDS):
            continue  # a warning line or a truncated row: never guess
        job_id, state, used, start, nodes, tres, restarts, reason = parts[: len(SQUEUE_FIELDS)]
        rows[job_id] = QueueRow(job_id=job_id, state=normalize_state(state), raw_state=state,
                                elapsed_s=parse_duration(used), start=parse_time(start), node_list=_none(nodes),
                                alloc_gpus=tres_gpus(tres), restarts=_int(restarts) or 0, reason=reason)
    return rows


def parse_sacct(text: str) -> dict[str, AcctRow]:
    """Rows of `sacct -X -D -P -n --format=<SACCT_FIELDS>` keyed by job id.

    With -D a requeued job has one row per attempt (interleaved with other jobs' rows; recorded on
    22.05): ordered by start, the last is the current state, and the elapsed times add up to the
    time the job held its allocation. While it waits to restart, its last row reads REQUEUED.
    """
    grouped: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < len(SACCT_FIELDS) or "." in parts[0]:
            continue  # not a data row, or a job step (sacct without -X)
        grouped.setdefault(parts[0].strip(), []).append([p.strip() for p in parts])
    rows: dict[str, AcctRow] = {}
    for job_id, attempts in grouped.items():
        attempts.sort(key=lambda a: parse_time(a[4]) or float("inf"))  # stable; not started: last
        _, state, elapsed, elapsed_raw, start, end, tres, nodes, exit_code = attempts[-1][: len(SACCT_FIELDS)]
        secs = [_int(a[3]) if _int(a[3]) is not None else parse_duration(a[2]) for a in attempts]
        known = [s for s in secs if s is not None]
        rows[job_id] = AcctRow(job_id=job_id, state=normalize_state(state), raw_state=state,
                               elapsed_s=float(sum(known)) if known else None, start=parse_time(start),
                               end=parse_time(end), alloc_gpus=tres_gpus(tres), node_list=_none(nodes),
                               exit_code=_none(exit_code), attempts=len(attempts),
                               requeues=max(len(attempts) - 1, sum(normalize_state(a[1]) == REQUEUED for a in attempts)))
    return rows


def parse_scontrol_restarts(text: str) -> dict[str, int]:
    """`scontrol show job -o` (one job per line) -> {job id: Restarts}; array tasks as 123_4."""
    out = {}
    for line in text.splitlines():
        job = re.search(r"(?:^|\s)JobId=(\S+)", line)
        restarts = re.search(r"\sRequeue=\d+\s+Restarts=(\d+)", line)  # adjacent fields: a name can't fake it
        if not job or not restarts:
            continue
        array_job, array_task = re.search(r"\sArrayJobId=(\d+)", line), re.search(r"\sArrayTaskId=(\d+)\s", line)
        key = f"{array_job.group(1)}_{array_task.group(1)}" if array_job and array_task else job.group(1)
        out[key] = int(restarts.group(1))
    return out


def error_line(stderr: str, tool: str, last: bool = False) -> str:
    """Slurm's own error as one clean line: 'sbatch: error: X' lines, prefixes dropped, joined
    (or only the `last`, the most specific one when a client retries a connection)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [re.sub(rf"^{re.escape(tool)}:\s*(error:\s*)?", "", ln) for ln in lines if re.match(rf"^{re.escape(tool)}:", ln)]
    errors = [e for e in errors if e] or lines[-1:] or ["no error message"]
    if last:
        errors = errors[-1:]
    return " ".join(dict.fromkeys(" ".join(e.split()) for e in errors))


def sbatch_error_line(stderr: str) -> str:
    """'sbatch: error: Batch job submission failed: Invalid partition name specified' -> the reason."""
    return error_line(stderr, "sbatch")


# --- calls at the edge ------------------------------------------------------------------------

def slurm_timeout(default: float = 10.0) -> float:
    """Seconds to wait for slurmctld / slurmdbd: $CLUSTERCTL_SLURM_TIMEOUT, else 10."""
    try:
        return float(os.environ.get("CLUSTERCTL_SLURM_TIMEOUT", default))
    except ValueError:
        raise UserError(f"CLUSTERCTL_SLURM_TIMEOUT: {os.environ['CLUSTERCTL_SLURM_TIMEOUT']!r} is not a number; "
                        "allowed: seconds, e.g. 10") from None


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a client command; on time-out kill its whole process group (a wrapper script's children
    would otherwise keep the pipes open and make us wait for them). Raises TimeoutError, FileNotFoundError."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=os.environ | {"SLURM_TIME_FORMAT": "standard"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass
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
        raise SlurmUnavailable("squeue: not found on PATH; allowed: a machine with Slurm's client tools") from None
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
        raise SlurmUnavailable("scontrol: not found on PATH; allowed: a machine with Slurm's client tools") from None
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
        raise UserError("scancel: not found on PATH; allowed: a machine with Slurm's client tools") from None
    except TimeoutError:
        raise UserError(f"scancel: slurmctld did not answer within {timeout:g} s; allowed: retry when the controller is back") from None
    if r.returncode != 0:
        raise UserError(f"scancel {jid}: {error_line(r.stderr, 'scancel')}")
