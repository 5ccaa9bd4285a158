"""One summary per run, kept in the registry: what reports and `status --all` need of a run (GPU-hours
and their source, energy, CO2, the plan's estimate, requeues, resumes, the last metrics record, why it
ended), so a history of 10,000 runs is read from one table instead of 10,000 run directories.

When a summary is used as it is, and when it is computed again:

- **settled** (the run is final, every job final and no longer asked about, and the last job ended
  SETTLE_S ago when it was computed): used as it is. Nothing writes into a run directory then (every
  process of the run has exited), so its files are not even looked at.
- **not settled** (active, or just ended): computed again on each call from the refreshed jobs; the
  figures read from files (energy, metrics tail, resumes) are reused while the files' sizes and
  modification times (`files_key`) are those it was read from.
- **gone**: any change to the run's row or its jobs (a refresh from Slurm, cancel, resume, a retry)
  deletes the summary in the same transaction (SQLite triggers, registry migration 3), and a summary
  is stored only if the rows it was computed from are still those at commit time
  (Registry.put_summaries), so a summary never outlives what it summarises.

This module is the record and how one is computed (edge: reads a run directory; the figures are
usage.job_time/gpu_hours's, one definition); runs.history brings a whole history up to date.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from clusterctl.specs import FINAL_STATES, JobRecord, RunRecord, RunState
from vltrain.rundir import RunDir

# The version of the `status --json` row kept in status_json: bump it whenever runs.status.RunStatus
# changes (tests/test_reports_scale.py holds its keys), and stored rows of another version are made again.
STATUS_FORMAT = 6  # 2: pending_reason, pending_detail, expected_start (issue 25); 3: eval (issue 26);
# 4: commit, dirty, excluded_nodes (issue 27); 5: lineage (issue 28, submit --from); 6: startup (issue 29)
SETTLE_S = 300.0  # a run final for this long has stopped writing files (SACCT_LAG_S is 120)


@dataclass(slots=True)
class Summary:
    """What one run used and where it stands (one `summaries` row; columns in this order)."""

    run_id: str
    settled: bool
    files: str  # files_key of the run directory when its files were read
    computed_at: float
    gpu_hours: float
    gpu_hours_source: str  # sacct | registry | registry+sacct | none
    elapsed_s: float
    energy_kwh: float
    co2_kg: float
    pue: float | None
    energy_files: int  # node-attempt files read (0: no measurement)
    estimated_kwh: float | None
    estimated_co2_kg: float | None
    requeues: int
    resumes: int
    step: float | None  # the last metrics record's
    loss: float | None  # NaN and inf kept (stored as text): a diverged run must look diverged
    samples_per_s: float | None
    reason: str | None  # why a run that ended without completing did
    max_retries: int  # the plan's: a failed run with retries left keeps its plan in Registry.index
    job_id: str | None  # the latest job's
    job_ids: list[str] = field(default_factory=list)
    alloc_gpus: int | None = None
    node_list: str | None = None
    exit_code: str | None = None
    status_format: int = 0  # STATUS_FORMAT when status_json was made
    status_json: str | None = None  # a settled run's `status --json` row (runs.status.from_summary), as text


COLUMNS = tuple(Summary.__dataclass_fields__)[:-2]  # in field order; the status row has its own table


def to_row(s: Summary) -> tuple:
    row = [getattr(s, c) for c in COLUMNS]
    row[COLUMNS.index("settled")] = int(s.settled)
    row[COLUMNS.index("loss")] = None if s.loss is None else repr(float(s.loss))
    row[COLUMNS.index("job_ids")] = " ".join(s.job_ids)  # job ids hold no spaces (digits, _, +)
    return tuple(row)


def from_row(row: tuple | list) -> Summary:
    s = Summary(*row)  # no status row: it is only ever read as text (Registry.settled_status)
    s.settled = bool(s.settled)
    if s.loss is not None:
        s.loss = float(s.loss)
    ids: Any = s.job_ids  # the column's text until here: the ids joined by spaces (to_row)
    s.job_ids = ids.split(" ") if ids else []
    return s


def files_key(run_dir: str) -> str:
    """A digest of the names, sizes and modification times of the files a summary reads (metrics,
    events, energy CSVs): equal while none of them changed. zlib's CRC-32 and Adler-32 side by side
    (64 bits) rather than hashlib: nobody forges these stamps, and importing hashlib (OpenSSL) costs
    ~3 ms on every report and `status --all`, zlib a tenth of that."""
    import zlib

    rd = RunDir(run_dir)
    parts = []
    for p in (rd.metrics, rd.events):
        try:
            st = os.stat(p)
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            pass
    try:
        with os.scandir(rd.energy) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.name.startswith("node") and e.name.endswith(".csv"):
                    st = e.stat()
                    parts.append(f"{e.name}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:
        pass
    data = "|".join(parts).encode(errors="surrogateescape")
    return f"{len(parts)}-{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


def _ended(job: JobRecord) -> float:
    if job.ended_at is not None:
        return job.ended_at
    start = job.started_at if job.started_at is not None else job.submitted_at
    return start + (job.elapsed_s or 0.0)


def is_settled(run: RunRecord, jobs: list[JobRecord], now: float) -> bool:
    """Final, every job final and not polled any more, and the last ended SETTLE_S ago."""
    from clusterctl.backends import get_backend

    if run.state not in FINAL_STATES or any(j.state not in FINAL_STATES for j in jobs):
        return False
    backend = get_backend(run.executor)
    if any(backend.needs_poll(run, j, now) for j in jobs):
        return False
    last = max((_ended(j) for j in jobs), default=run.created_at)
    return now - last >= SETTLE_S


def compute(run: RunRecord, jobs: list[JobRecord], now: float, old: Summary | None = None) -> Summary:
    """The summary of a refreshed run (edge: reads its files unless `old` read the same files)."""
    from clusterctl.backends import get_backend
    from clusterctl.runs import artifacts
    from clusterctl.runs.usage import gpu_hours, job_time, read_energy

    accounting = get_backend(run.executor).has_accounting
    hours, source = gpu_hours(run.gpus, jobs, now, accounting)
    elapsed = sum((job_time(j, run.gpus, now, accounting)[0] for j in jobs), 0.0)
    key = files_key(run.run_dir)
    est = (run.plan or {}).get("estimate") or {}
    last = jobs[-1] if jobs else None
    s = Summary(
        run_id=run.run_id,
        settled=is_settled(run, jobs, now),
        files=key,
        computed_at=now,
        gpu_hours=hours,
        gpu_hours_source=source,
        elapsed_s=elapsed,
        energy_kwh=0.0,
        co2_kg=0.0,
        pue=None,
        energy_files=0,
        estimated_kwh=_number(est.get("energy_kwh")),
        estimated_co2_kg=_number(est.get("co2_kg")),
        requeues=sum(j.requeues or 0 for j in jobs),
        resumes=0,
        step=None,
        loss=None,
        samples_per_s=None,
        reason=None,
        max_retries=_int((run.plan or {}).get("max_retries")),
        job_id=last.job_id if last else None,
        job_ids=[j.job_id for j in jobs],
        alloc_gpus=last.alloc_gpus if last else None,
        node_list=last.node_list if last else None,
        exit_code=last.exit_code if last else None,
    )
    if old is not None and old.files == key:  # the files it read have not changed
        for k in ("energy_kwh", "co2_kg", "pue", "energy_files", "resumes", "step", "loss", "samples_per_s"):
            setattr(s, k, getattr(old, k))
    else:
        rd = RunDir(run.run_dir)
        readings = read_energy(rd.root)
        s.energy_kwh = sum(r.energy_kwh for r in readings)
        s.co2_kg = sum(r.co2_kg for r in readings)
        s.pue = readings[-1].pue if readings else None
        s.energy_files = len(readings)
        s.resumes = artifacts.count_events(rd.events, "resume")
        s.step, s.loss, s.samples_per_s = last_metrics(artifacts.tail_json(rd.metrics))
    if run.state in FINAL_STATES and run.state != RunState.COMPLETED and last is not None:
        s.reason = artifacts.failure_reason(run.run_dir, last.job_id)
    return s


def last_metrics(m: dict[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """(step, loss, samples/s) of a metrics record: finite numbers, but a NaN loss is kept. The keys
    are those the trainer writes (vltrain.loop, metrics.jsonl): `step`, `loss`, `samples_per_s`."""
    import math

    def num(v: Any, finite: bool = True) -> float | None:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return None
        return v if not finite or math.isfinite(v) else None

    m = m or {}
    return (
        num(m.get("step")),
        num(m.get("loss"), finite=False),  # NaN: diverged
        num(m.get("samples_per_s")),
    )


def _number(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
