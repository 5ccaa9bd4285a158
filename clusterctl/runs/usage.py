"""GPU-hours, energy and carbon per run, aggregated by run, profile, day, month or user (pure).

Inputs are plain records (registry rows, Slurm accounting, codecarbon CSV rows); the readers of the
run directory's energy files are the only I/O here. Every figure carries its source, so a report never mixes a measured kWh with
an estimate without saying so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vltrain.common import safe_read
from vltrain.common.errors import UserError
from vltrain.rundir import RunDir

ENERGY_MAX = 16 << 20  # bytes of one node-attempt's codecarbon CSV (a row per flush)
TIMELINE_MAX = 64 << 20  # bytes of one node-attempt's energy timeline (a point per interval)

BY = ("run", "profile", "day", "month", "user")

# CSV/JSON columns of `clusterctl report energy|gpu-hours` (documented in docs/reports.md).
COLUMNS = (
    "key",
    "runs",
    "gpu_hours",
    "gpu_hours_source",
    "energy_kwh",
    "co2_kg",
    "carbon_intensity_g_per_kwh",
    "pue",
    "estimated_kwh",
    "estimated_co2_kg",
    "energy_source",
)


@dataclass(frozen=True)
class EnergyReading:
    """The cumulative total of one codecarbon file: one node during one attempt of a run."""

    node: str
    attempt: str
    energy_kwh: float
    co2_kg: float
    duration_s: float
    pue: float
    country: str
    timestamp: str


@dataclass
class RunUsage:
    """What one run used, with where each figure came from."""

    run_id: str
    name: str
    profile: str
    user: str
    created_at: float
    gpus: int
    gpu_hours: float = 0.0
    gpu_hours_source: str = "none"  # sacct | registry | none
    energy_kwh: float = 0.0
    co2_kg: float = 0.0
    pue: float | None = None
    readings: list[EnergyReading] = field(default_factory=list)
    estimated_kwh: float | None = None
    estimated_co2_kg: float | None = None
    requeues: int = 0  # the scheduler's restarts of the run's job ids (runs.status: one definition)
    resumes: int = 0  # the trainer's resume events (events.jsonl)
    energy_files: int = 0  # node-attempt energy files measured (len(readings) when they were read here)

    @property
    def intensity(self) -> float | None:
        return 1000 * self.co2_kg / self.energy_kwh if self.energy_kwh > 0 else None


def parse_energy_csv(text: str, node: str, attempt: str) -> EnergyReading | None:
    """The last row of a codecarbon emissions CSV (rows are cumulative; 'update' mode keeps one)."""
    import csv  # on use: a report over settled summaries reads no CSV

    try:
        rows = list(csv.DictReader(text.splitlines()))
    except csv.Error:  # NUL bytes, a broken quote: not a codecarbon file
        return None
    if not rows:
        return None
    r = rows[-1]
    try:
        return EnergyReading(
            node=node,
            attempt=attempt,
            energy_kwh=float(r["energy_consumed"]),
            co2_kg=float(r["emissions"]),
            duration_s=float(r["duration"]),
            pue=float(r.get("pue") or 1.0),
            country=r.get("country_iso_code", ""),
            timestamp=r.get("timestamp", ""),
        )
    except (KeyError, ValueError, TypeError):
        return None


def read_energy(run_dir: Path) -> list[EnergyReading]:
    """Every node-attempt file of a run (edge: reads files)."""
    out = []
    for p in RunDir(run_dir).energy_files():
        node, _, attempt = p.stem.partition("-")
        try:
            text = safe_read.read_capped(p, ENERGY_MAX).decode("utf-8", errors="replace")
        except OSError:  # gone, or refused by safe_read (a FIFO, a device, too large): a note
            continue
        reading = parse_energy_csv(text, node, attempt)
        if reading is not None:
            out.append(reading)
    return out


def job_time(job: Any, gpus: int, now: float, accounting: bool = True) -> tuple[float, float, str]:
    """(elapsed seconds, GPU-seconds, source) of one job: the one definition status, watch and
    reports share.

    With scheduler accounting (Slurm) and an elapsed time from it, that time (every requeue of the
    job id summed; sacct, or squeue's current attempt when accounting is down) -> source "sacct".
    Else the registry's clock: started_at to ended_at, or to `now` while the job is not final (a job
    cancelled by `clusterctl cancel` ends when it was cancelled) -> "registry"; a local job that
    ended before anyone saw it start has only its elapsed time. GPUs: the scheduler's allocation,
    else the run's world size. A job with no times at all counts 0 -> "none"."""
    from clusterctl.specs import FINAL_STATES

    alloc = job.alloc_gpus or gpus
    if accounting and job.elapsed_s is not None:
        return job.elapsed_s, alloc * job.elapsed_s, "sacct"
    final = getattr(job, "state", None) in FINAL_STATES
    end = job.ended_at if job.ended_at is not None else (None if final else now)
    if job.started_at is not None and end is not None:
        e = max(0.0, end - job.started_at)
        return e, alloc * e, "registry"
    if job.elapsed_s is not None:
        return job.elapsed_s, alloc * job.elapsed_s, "registry"
    return 0.0, 0.0, "none"


def gpu_hours(gpus: int, jobs: Iterable[Any], now: float, accounting: bool = True) -> tuple[float, str]:
    """GPU-hours of a run's jobs (job_time summed) and their sources joined ("sacct", "registry",
    "registry+sacct"; "none" when no job has a time). `accounting=False` (local executor): the
    registry's times, whatever fields are set."""
    total, sources = 0.0, set()
    for j in jobs:
        _, gpu_s, source = job_time(j, gpus, now, accounting)
        total += gpu_s / 3600
        if source != "none":
            sources.add(source)
    if not sources:
        return 0.0, "none"
    return total, "+".join(sorted(sources))


def usage_for(run: Any, jobs: list[Any], readings: list[EnergyReading], now: float, resumes: int = 0) -> RunUsage:
    """One run's usage; `resumes`: its trainer's resume events (runs.artifacts.count_events)."""
    from clusterctl.backends import get_backend

    hours, source = gpu_hours(run.gpus, jobs, now, accounting=get_backend(run.executor).has_accounting)
    u = RunUsage(
        run_id=run.run_id,
        name=run.name,
        profile=run.profile,
        user=run.user,
        created_at=run.created_at,
        gpus=run.gpus,
        gpu_hours=hours,
        gpu_hours_source=source,
        readings=readings,
        energy_kwh=sum(r.energy_kwh for r in readings),
        co2_kg=sum(r.co2_kg for r in readings),
        requeues=sum(getattr(j, "requeues", 0) or 0 for j in jobs),
        resumes=resumes,
        energy_files=len(readings),
    )
    if readings:
        u.pue = readings[-1].pue
    est = (run.plan or {}).get("estimate") or {}
    u.estimated_kwh = est.get("energy_kwh")
    u.estimated_co2_kg = est.get("co2_kg")
    return u


def from_summary(run: Any, s: Any) -> RunUsage:
    """One run's usage from its registry summary (runs.summaries: the same figures usage_for gives)."""
    return RunUsage(
        run_id=run.run_id,
        name=run.name,
        profile=run.profile,
        user=run.user,
        created_at=run.created_at,
        gpus=run.gpus,
        gpu_hours=s.gpu_hours,
        gpu_hours_source=s.gpu_hours_source,
        energy_kwh=s.energy_kwh,
        co2_kg=s.co2_kg,
        pue=s.pue,
        estimated_kwh=s.estimated_kwh,
        estimated_co2_kg=s.estimated_co2_kg,
        requeues=s.requeues,
        resumes=s.resumes,
        energy_files=s.energy_files,
    )


def group_key(u: RunUsage, by: str) -> str:
    if by not in BY:
        raise UserError(f"--by: {by!r} is not known; allowed: {', '.join(BY)}")
    if by in ("day", "month"):
        day = dt.datetime.fromtimestamp(u.created_at, dt.UTC)
        return day.strftime("%Y-%m-%d" if by == "day" else "%Y-%m")
    return {"run": u.run_id, "profile": u.profile, "user": u.user}[by]


@dataclass(slots=True)
class Totals:
    """One group's running totals: added to run by run (`add`), or from the registry's own SQL
    aggregate of settled summaries (`add_sql`, Registry.settled_totals), then made a row (`row`)."""

    runs: int = 0
    gpu_hours: float = 0.0
    sources: set[str] = field(default_factory=set)
    energy_kwh: float = 0.0
    co2_kg: float = 0.0
    estimated_kwh: float = 0.0
    n_estimated_kwh: int = 0
    estimated_co2_kg: float = 0.0
    n_estimated_co2_kg: int = 0
    pues: set[float] = field(default_factory=set)
    measured: bool = False
    requeues: int = 0
    resumes: int = 0

    def add(self, u: RunUsage) -> None:
        self.runs += 1
        self.gpu_hours += u.gpu_hours
        self.sources.update(u.gpu_hours_source.split("+"))
        self.energy_kwh += u.energy_kwh
        self.co2_kg += u.co2_kg
        if u.estimated_kwh is not None:
            self.estimated_kwh += u.estimated_kwh
            self.n_estimated_kwh += 1
        if u.estimated_co2_kg is not None:
            self.estimated_co2_kg += u.estimated_co2_kg
            self.n_estimated_co2_kg += 1
        if u.pue is not None:
            self.pues.add(u.pue)
        self.measured = self.measured or bool(u.energy_files or u.readings)
        self.requeues += u.requeues
        self.resumes += u.resumes

    def add_sql(self, row: tuple) -> None:
        """A row of Registry.settled_totals (after its key): count, sums, distinct sources, counts
        of estimates, min/max/count of distinct PUEs, any measurement."""
        n, hours, sources, kwh, co2, est, n_est, est_co2, n_est_co2, pue_lo, pue_hi, n_pue, measured, rq, rs = row
        self.runs += n
        self.gpu_hours += hours or 0.0
        for src in (sources or "").split(","):
            self.sources.update(src.split("+"))
        self.energy_kwh += kwh or 0
        self.co2_kg += co2 or 0
        self.estimated_kwh += est or 0
        self.n_estimated_kwh += n_est
        self.estimated_co2_kg += est_co2 or 0
        self.n_estimated_co2_kg += n_est_co2
        if n_pue:
            self.pues.update({pue_lo, pue_hi})
        self.measured = self.measured or bool(measured)
        self.requeues += rq or 0
        self.resumes += rs or 0

    def row(self, key: str) -> dict[str, Any]:
        return _row(key, self.runs, self.gpu_hours, self.sources, self.energy_kwh, self.co2_kg, self.pues,
                    self.estimated_kwh if self.n_estimated_kwh else None,
                    self.estimated_co2_kg if self.n_estimated_co2_kg else None,
                    self.measured, self.requeues, self.resumes)  # fmt: skip


_SOURCE_TEXT: dict[frozenset, str] = {}


def _row(key, runs, hours, sources, kwh, co2, pues, est, est_co2, measured, requeues, resumes) -> dict[str, Any]:
    """A report row (COLUMNS, then requeues and resumes) from a group's totals."""
    fs = frozenset(sources)
    src = _SOURCE_TEXT.get(fs)
    if src is None:
        src = _SOURCE_TEXT[fs] = "+".join(sorted(fs - {"none", ""})) or "none"
    pues = sorted(pues)
    return {
        "key": key,
        "runs": runs,
        "gpu_hours": round(hours, 6),
        "gpu_hours_source": src,
        "energy_kwh": round(kwh, 9),
        "co2_kg": round(co2, 9),
        "carbon_intensity_g_per_kwh": round(1000 * co2 / kwh, 3) if kwh > 0 else None,
        "pue": pues[0] if len(pues) == 1 else (None if not pues else "mixed"),
        "estimated_kwh": None if est is None else round(est, 6),
        "estimated_co2_kg": None if est_co2 is None else round(est_co2, 6),
        "energy_source": "codecarbon" if measured else "none",
        "requeues": requeues,
        "resumes": resumes,
    }


def sql_row(t: tuple) -> dict[str, Any]:
    """The report row of a group summed only by SQL (a Registry.settled_totals row, key first), as
    Totals.add_sql then row would make it, without the object (10,000 groups when grouped by run)."""
    key, n, hours, sources, kwh, co2, est, n_est, est_co2, n_est_co2, pue_lo, _pue_hi, n_pue, measured, rq, rs = t
    src = _SQL_SOURCES.get(sources) or _source_text(sources)
    kwh, co2 = 0.0 + (kwh or 0), 0.0 + (co2 or 0)
    return {
        "key": key,
        "runs": n,
        "gpu_hours": round(0.0 + (hours or 0), 6),
        "gpu_hours_source": src,
        "energy_kwh": round(kwh, 9),
        "co2_kg": round(co2, 9),
        "carbon_intensity_g_per_kwh": round(1000 * co2 / kwh, 3) if kwh > 0 else None,
        "pue": None if not n_pue else (pue_lo if n_pue == 1 else "mixed"),
        "estimated_kwh": round(0.0 + (est or 0), 6) if n_est else None,
        "estimated_co2_kg": round(0.0 + (est_co2 or 0), 6) if n_est_co2 else None,
        "energy_source": "codecarbon" if measured else "none",
        "requeues": rq or 0,
        "resumes": rs or 0,
    }


_SQL_SOURCES: dict[str | None, str] = {}


def _source_text(sources: str | None) -> str:
    """A group's GPU-hour source from SQL's comma-joined distinct sources (each may be joined by +)."""
    parts = {x for one in (sources or "").split(",") for x in one.split("+")} - {"none", ""}
    src = _SQL_SOURCES[sources] = "+".join(sorted(parts)) or "none"
    return src


class _Rounded(dict):
    """round(x, digits) of each distinct value, computed once (round is ~0.3 us, six per row: most of
    a row's cost; a column over 10,000 runs repeats values: a plan's estimate, a site's grid
    intensity and PUE, whole GPU-hours). Zeros are never kept: -0.0 == 0.0, and each rounds to itself."""

    def __init__(self, digits: int) -> None:
        super().__init__()
        self.digits = digits

    def __missing__(self, x: float) -> float:
        r = round(x, self.digits)
        if x:
            self[x] = r
        return r


def run_rows(runs: Iterable[tuple]) -> list[dict[str, Any]]:
    """The report rows of single runs with a settled summary (Registry.settled_runs rows), each as
    sql_row makes the row of a group of that one run: the same keys, figures and rounding (of each
    distinct value once), written out for one run (no counts to read, one loop, no call per row)."""
    out: list[dict[str, Any]] = []
    append, sources = out.append, _SQL_SOURCES
    r3, r6, r9 = _Rounded(3), _Rounded(6), _Rounded(9)
    for key, hours, source, kwh, co2, pue, est, est_co2, measured, rq, rs in runs:
        src = sources.get(source) or _source_text(source)
        kwh, co2 = 0.0 + (kwh or 0), 0.0 + (co2 or 0)  # floats (no -0.0): as sql_row
        append(
            {
                "key": key,
                "runs": 1,
                "gpu_hours": r6[0.0 + (hours or 0)],
                "gpu_hours_source": src,
                "energy_kwh": r9[kwh],
                "co2_kg": r9[co2],
                "carbon_intensity_g_per_kwh": r3[1000 * co2 / kwh] if kwh > 0 else None,
                "pue": pue,
                "estimated_kwh": None if est is None else r6[0.0 + est],
                "estimated_co2_kg": None if est_co2 is None else r6[0.0 + est_co2],
                "energy_source": "codecarbon" if measured else "none",
                "requeues": rq or 0,
                "resumes": rs or 0,
            }
        )
    return out


def run_columns(runs: list[tuple], others: list[dict[str, Any]]) -> dict[str, list]:
    """run_rows(runs) and the rows `others` (runs not settled, made by Totals), sorted by key, as
    columns: name -> the values of every row, what the report's table reads. `runs` come sorted by
    run id (Registry.settled_runs); each column is made in one pass, and no row object at all
    (a table by run over 10,000 runs: a row dict each, then the table's own pass to take them
    apart, cost more than the rest of the report)."""
    r3, r6, r9 = _Rounded(3), _Rounded(6), _Rounded(9)
    key, hours, source, kwh, co2, pue, est, est_co2, measured, rq, rs = [list(c) for c in zip(*runs)] or [
        [] for _ in range(11)
    ]
    kwh = [0.0 + (v or 0) for v in kwh]  # floats (no -0.0): as sql_row
    co2 = [0.0 + (v or 0) for v in co2]
    src = {v: _SQL_SOURCES.get(v) or _source_text(v) for v in set(source)}
    cols: dict[str, list] = {
        "key": key,
        "runs": [1] * len(key),
        "gpu_hours": [r6[0.0 + (v or 0)] for v in hours],
        "gpu_hours_source": list(map(src.__getitem__, source)),
        "energy_kwh": list(map(r9.__getitem__, kwh)),
        "co2_kg": list(map(r9.__getitem__, co2)),
        "carbon_intensity_g_per_kwh": [r3[1000 * c / k] if k > 0 else None for k, c in zip(kwh, co2)],
        "pue": pue,
        "estimated_kwh": [None if v is None else r6[0.0 + v] for v in est],
        "estimated_co2_kg": [None if v is None else r6[0.0 + v] for v in est_co2],
        "energy_source": ["codecarbon" if v else "none" for v in measured],
        "requeues": [v or 0 for v in rq],
        "resumes": [v or 0 for v in rs],
    }
    if not others:
        return cols
    from bisect import bisect_left

    at = {k: i for k in {r["key"] for r in others} if (i := bisect_left(key, k)) < len(key) and key[i] == k}
    for r in others:  # a run both settled and not: not within one snapshot; as by group, the fresh row wins
        if r["key"] in at:
            for name, values in cols.items():
                values[at[r["key"]]] = r[name]
    new = sorted((r for r in others if r["key"] not in at), key=lambda r: r["key"])
    places = [bisect_left(key, r["key"]) for r in new]
    for name, values in cols.items():  # each column spliced once: the settled runs' values between the new ones
        out, last = [], 0
        for i, r in zip(places, new):
            out += values[last:i]
            out.append(r[name])
            last = i
        out += values[last:]
        cols[name] = out
    return cols


def group(usages: Iterable[RunUsage], by: str, groups: dict[str, Totals] | None = None) -> dict[str, Totals]:
    """Runs added to their group's totals (into `groups` when given)."""
    groups = {} if groups is None else groups
    days: dict[int, str] = {}  # one date per UTC day, not per run (10,000 runs span ~100 days)
    for u in usages:
        if by in ("day", "month"):
            n = int(u.created_at // 86400)
            key = days.get(n)
            if key is None:
                key = days[n] = group_key(u, by)
        else:
            key = group_key(u, by)
        t = groups.get(key)
        if t is None:
            t = groups[key] = Totals()
        t.add(u)
    return groups


def rows_of(groups: dict[str, Totals]) -> list[dict[str, Any]]:
    """One row per group, sorted by key, in COLUMNS order, then `requeues` and `resumes` (JSON and
    the table; not CSV columns); sources joined when a group mixes them."""
    return [groups[k].row(k) for k in sorted(groups)]


def aggregate(usages: Iterable[RunUsage], by: str) -> list[dict[str, Any]]:
    """One row per group (rows_of) of these runs."""
    if by not in BY:
        raise UserError(f"--by: {by!r} is not known; allowed: {', '.join(BY)}")
    return rows_of(group(usages, by))


def to_csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})
    return buf.getvalue()


def parse_day(text: str, flag: str) -> float:
    """--since/--until: YYYY-MM-DD (UTC midnight) or YYYY-MM-DDTHH:MM."""
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M"):
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC).timestamp()
        except ValueError:
            pass
    raise UserError(f"{flag}: {text!r} is not a date; allowed: YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)")


def parse_timeline(text: str) -> list[tuple[float, float, float]]:
    """(time, cumulative kWh, cumulative kg CO2) points of one node-attempt timeline file."""
    import json
    import math

    out = []
    for line in text.splitlines():
        try:
            d = json.loads(line)
            point = (float(d["time"]), float(d["energy_kwh"]), float(d["co2_kg"]))
        except (ValueError, KeyError, TypeError, IndexError, RecursionError, OverflowError):
            continue  # a line cut by a kill, or not a point
        if all(math.isfinite(x) for x in point):
            out.append(point)
    return out


def merge_timelines(files: list[list[tuple[float, float, float]]]) -> list[tuple[float, float, float]]:
    """Run totals over time from per-node, per-attempt cumulative series: at each point in time the
    run's total is the sum over files of each file's highest value so far (attempts add, never
    overwrite). A file is cumulative, so a point below its predecessor (lines out of time order, a
    tracker's restart appended to the same file) never lowers it: the total is monotone."""
    events = sorted((t, i, e, c) for i, pts in enumerate(files) for t, e, c in pts)
    latest: dict[int, tuple[float, float]] = {}
    out: list[tuple[float, float, float]] = []
    energy = co2 = 0.0
    for t, i, e, c in events:
        pe, pc = latest.get(i, (0.0, 0.0))
        ne, nc = max(pe, e), max(pc, c)
        latest[i] = (ne, nc)
        energy, co2 = energy + (ne - pe), co2 + (nc - pc)  # a non-negative step: rounding never lowers the sum
        if out and out[-1][0] == t:  # one point per instant: nodes that flushed together
            out[-1] = (t, energy, co2)
        else:
            out.append((t, energy, co2))
    return out


def read_timeline(run_dir: str | Path) -> list[tuple[float, float, float]]:
    """The run's cumulative energy over time (edge: reads the timeline files of every node-attempt)."""
    files = []
    for p in RunDir(run_dir).energy_timelines():
        try:
            files.append(parse_timeline(safe_read.read_capped(p, TIMELINE_MAX).decode("utf-8", errors="replace")))
        except OSError:
            continue
    return merge_timelines(files)
