"""What Slurm's client commands print, parsed into plain rows (pure: tested on recorded output).

Formats: `squeue --json` in 22.05 ignores -j and -t (it dumps every job, ~3.5 KB each) and its
schema changes with each Slurm release, so we use `squeue -O Field:|,...` (no padding, '|' after each
field; checked on 22.05.8) and `sacct -P` (pipe-delimited by design). squeue's RestartCnt is the
requeue count (sacct 22.05 has no Restarts field); sacct -D lists every attempt of a requeued job.
JobArrayID (not JobID) gives array tasks as 123_4, the form submitit and sacct use. States come
with decorations ('CANCELLED by 0', 'CANCELLED+') and fold into clusterctl's RunState.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from clusterctl.specs import RunState as S
from vltrain.common.errors import UserError

# Slurm's long and compact (squeue %t) names -> ours. Kept explicit: a new Slurm state shows up as
# UNKNOWN (still polled) instead of silently counting as finished.
_ALIASES = {
    "PENDING": S.PENDING,
    "PD": S.PENDING,
    "RESV_DEL_HOLD": S.PENDING,
    "RD": S.PENDING,
    "RUNNING": S.RUNNING,
    "R": S.RUNNING,
    "CONFIGURING": S.RUNNING,
    "CF": S.RUNNING,
    "RESIZING": S.RUNNING,
    "RS": S.RUNNING,
    "SIGNALING": S.RUNNING,
    "SI": S.RUNNING,
    "REQUEUED": S.REQUEUED,
    "RQ": S.REQUEUED,
    "REQUEUE_HOLD": S.REQUEUED,
    "RH": S.REQUEUED,
    "REQUEUE_FED": S.REQUEUED,
    "RF": S.REQUEUED,
    "COMPLETING": S.COMPLETING,
    "CG": S.COMPLETING,
    "STAGE_OUT": S.COMPLETING,
    "SO": S.COMPLETING,
    "SUSPENDED": S.SUSPENDED,
    "S": S.SUSPENDED,
    "STOPPED": S.SUSPENDED,
    "ST": S.SUSPENDED,
    "COMPLETED": S.COMPLETED,
    "CD": S.COMPLETED,
    "FAILED": S.FAILED,
    "F": S.FAILED,
    "OUT_OF_MEMORY": S.FAILED,
    "OOM": S.FAILED,
    "SPECIAL_EXIT": S.FAILED,
    "SE": S.FAILED,
    "CANCELLED": S.CANCELLED,
    "CA": S.CANCELLED,
    "REVOKED": S.CANCELLED,
    "RV": S.CANCELLED,
    "TIMEOUT": S.TIMEOUT,
    "TO": S.TIMEOUT,
    "DEADLINE": S.TIMEOUT,
    "DL": S.TIMEOUT,
    "PREEMPTED": S.PREEMPTED,
    "PR": S.PREEMPTED,
    "NODE_FAIL": S.NODE_FAIL,
    "NF": S.NODE_FAIL,
    "BOOT_FAIL": S.NODE_FAIL,
    "BF": S.NODE_FAIL,
}

SQUEUE_FIELDS = ("JobArrayID", "State", "TimeUsed", "StartTime", "NodeList", "tres-alloc", "RestartCnt", "Reason")
SACCT_FIELDS = ("JobID", "State", "Elapsed", "ElapsedRaw", "Start", "End", "AllocTRES", "NodeList", "ExitCode")
JOB_ID = re.compile(r"^\d+(?:_\d+)?(?:\+\d+)?$")


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


def normalize_state(raw: str) -> str:
    """'CANCELLED by 0' -> CANCELLED, 'CANCELLED+' -> CANCELLED, 'REQUEUE_HOLD' -> REQUEUED, ..."""
    token = raw.strip().split(" ", 1)[0].rstrip("+").upper() if raw.strip() else ""
    return _ALIASES.get(token, S.UNKNOWN)


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
        rows[job_id] = QueueRow(
            job_id=job_id,
            state=normalize_state(state),
            raw_state=state,
            elapsed_s=parse_duration(used),
            start=parse_time(start),
            node_list=_none(nodes),
            alloc_gpus=tres_gpus(tres),
            restarts=_int(restarts) or 0,
            reason=reason,
        )
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
        _, state, _elapsed, _elapsed_raw, start, end, tres, nodes, exit_code = attempts[-1][: len(SACCT_FIELDS)]
        secs = [_int(a[3]) if _int(a[3]) is not None else parse_duration(a[2]) for a in attempts]
        known = [s for s in secs if s is not None]
        rows[job_id] = AcctRow(
            job_id=job_id,
            state=normalize_state(state),
            raw_state=state,
            elapsed_s=float(sum(known)) if known else None,
            start=parse_time(start),
            end=parse_time(end),
            alloc_gpus=tres_gpus(tres),
            node_list=_none(nodes),
            exit_code=_none(exit_code),
            attempts=len(attempts),
            requeues=max(len(attempts) - 1, sum(normalize_state(a[1]) == S.REQUEUED for a in attempts)),
        )
    return rows


@dataclass(frozen=True)
class Partition:
    """One partition as `scontrol show partition -o` prints it: what a job's request is checked against."""

    name: str
    state: str  # UP, DOWN, DRAIN, INACTIVE
    total_nodes: int | None
    max_nodes: int | None  # None: UNLIMITED
    default: bool

    @property
    def node_limit(self) -> int | None:
        """The most nodes one job may get here (its nodes, or MaxNodes when lower); None: not known."""
        known = [n for n in (self.total_nodes, self.max_nodes) if n is not None]
        return min(known) if known else None


def parse_partitions(text: str) -> dict[str, Partition]:
    """`scontrol show partition -o` (one `Key=Value ...` line per partition; 'No partitions in the
    system' when there are none) -> partitions by name. A line without PartitionName is not guessed at."""
    out: dict[str, Partition] = {}
    for line in text.splitlines():
        kv = {k: v for k, sep, v in (part.partition("=") for part in line.split()) if sep}
        name = kv.get("PartitionName")
        if not name:
            continue
        max_nodes = kv.get("MaxNodes", "UNLIMITED")
        out[name] = Partition(
            name=name,
            state=kv.get("State", "UNKNOWN"),
            total_nodes=_int(kv.get("TotalNodes", "")),
            max_nodes=None if max_nodes == "UNLIMITED" else _int(max_nodes),
            default=kv.get("Default") == "YES",
        )
    return out


# squeue's pending Reasons users meet most, in words (`man squeue`, JOB REASON CODES); others are shown as
# Slurm prints them. {job} is the job id.
PENDING_REASONS = {
    "Priority": "jobs of higher priority are ahead of it",
    "Resources": "waiting for nodes to become free",
    "JobHeldUser": "held by its user: scontrol release {job}",
    "JobHeldAdmin": "held by an administrator",
    "BeginTime": "not before its begin time",
    "Dependency": "waiting for a job it depends on",
    "DependencyNeverSatisfied": "a job it depends on failed: it will never start (scancel {job})",
    "PartitionNodeLimit": "asks for more nodes than the partition allows: it will not start (scancel {job})",
    "PartitionTimeLimit": "asks for more time than the partition allows: it will not start (scancel {job})",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "ReqNodeNotAvail": "a node it needs is unavailable (down, drained or reserved)",
    "QOSMaxJobsPerUserLimit": "the QOS's limit of running jobs per user is reached",
    "AssocGrpGRES": "the account's GPU limit is reached",
    "Reservation": "waiting for its reservation to start",
    "launch failed requeued held": "its launch failed; requeued and held: scontrol release {job}",
}


def pending_words(reason: str, job_id: str) -> str | None:
    """What squeue's pending Reason means, in words (None for a code not in PENDING_REASONS)."""
    words = PENDING_REASONS.get(reason) or PENDING_REASONS.get(reason.split(",")[0])
    return words.format(job=job_id) if words else None


def error_line(stderr: str, tool: str, last: bool = False) -> str:
    """Slurm's own error as one clean line: 'sbatch: error: X' lines, prefixes dropped, joined
    (or only the `last`, the most specific one when a client retries a connection)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [
        re.sub(rf"^{re.escape(tool)}:\s*(error:\s*)?", "", ln) for ln in lines if re.match(rf"^{re.escape(tool)}:", ln)
    ]
    errors = [e for e in errors if e] or lines[-1:] or ["no error message"]
    if last:
        errors = errors[-1:]
    return " ".join(dict.fromkeys(" ".join(e.split()) for e in errors))


def sbatch_error_line(stderr: str) -> str:
    """'sbatch: error: Batch job submission failed: Invalid partition name specified' -> the reason."""
    return error_line(stderr, "sbatch")


_SUBMITTED = re.compile(r"^Submitted batch job (\d+)(?: on cluster \S+)?$", re.M)


def sbatch_job_id(stdout: str) -> str:
    """The id in sbatch's 'Submitted batch job N', or a one-line UserError: another output (a wrapper
    on PATH, --parsable, two ids) is not guessed at: the job may exist, and the error says so."""
    ids = sorted(set(_SUBMITTED.findall(stdout)))
    if len(ids) == 1:
        return ids[0]
    shown = " ".join(stdout.split())
    shown = repr(shown[:160] + ("..." if len(shown) > 160 else ""))
    raise UserError(
        f"sbatch: printed {'no job id' if not ids else f'{len(ids)} job ids'} ({shown}); it may have queued a "
        "job: check `squeue --me`; allowed: sbatch's own 'Submitted batch job N' (is `sbatch` on PATH a "
        "wrapper that prints something else?)"
    )
