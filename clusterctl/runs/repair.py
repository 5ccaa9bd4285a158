"""Repairing the registry: `check` what SQLite finds wrong with the file, and `rebuild` it from the run
directories (and whatever rows of the old file can still be read), swapped in atomically with the
old file kept as a backup (`clusterctl registry check | rebuild`; docs/registry.md "When the file is
damaged").

The run-directory reader (`run_from_dir`) gives the registry rows a run directory implies: the run
from the files `runs.submit.create` wrote, one job per submitit folder. Job states the files cannot
tell are UNKNOWN (active), so the next `status` asks the scheduler; where no scheduler remembers a job
(a local process), its backend says what the files tell (`Backend.recover_job`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.planning.profiles import SLURM_NAME
from clusterctl.runs.artifacts import dumps_strict
from clusterctl.runs.dbfile import (
    FOREIGN_HINT,
    JOB_COLS,
    RUN_COLS,
    connect,
    connect_readonly,
    create_private,
    db_error,
    integrity_problems,
    job_from_row,
    run_from_row,
    schema_problem,
    shown,
    writable,
)
from clusterctl.runs.readback import MAX_DEPTH, depth, read_table, run_dir_plan, run_dir_profile
from clusterctl.runs.registry import SCHEMA_VERSION, migrate
from clusterctl.specs import FINAL_STATES, JobRecord, RunRecord, RunState
from vltrain.common.errors import UserError

if TYPE_CHECKING:
    from clusterctl.backends.api import Backend


def check(path: Path) -> dict[str, Any]:
    """Everything `clusterctl registry check` says about the file at `path` (read-only, never
    creates it): {"path", "problems", "schema_version", "runs", "jobs", "events"}. Problems are
    PRAGMA integrity_check's lines, foreign-key violations and a wrong schema version."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"registry {shown(str(path))}: no such file; allowed: the path of an existing registry (CLUSTERCTL_REGISTRY)"
        )
    out: dict[str, Any] = {"path": str(path), "problems": [], "schema_version": None}
    try:
        conn = connect_readonly(path)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as e:
            if not getattr(e, "sqlite_errorname", "").startswith("SQLITE_CANTOPEN"):
                raise
            conn.close()
            conn = connect_readonly(path, immutable=True)
    except sqlite3.DatabaseError as e:
        out["problems"].append(str(e))
        return out
    try:
        try:
            out["schema_version"] = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            out["problems"].append(str(e))
            return out
        try:
            foreign = schema_problem(conn, SCHEMA_VERSION)
        except sqlite3.DatabaseError:
            foreign = None  # damage: integrity_check says what
        if foreign:  # what every other command refuses first (Registry opens it neither way)
            out["problems"].append(foreign)
            out["foreign"] = True
            return out
        out["problems"] += integrity_problems(conn, "integrity_check")
        try:
            out["problems"] += [
                f"foreign key: {t} row {rowid} refers to a missing {parent} row"
                for t, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check").fetchall()
            ]
        except sqlite3.DatabaseError as e:
            out["problems"].append(f"foreign key check: {e}")
        if out["schema_version"] != SCHEMA_VERSION:
            out["problems"].append(
                f"schema version {out['schema_version']}, this clusterctl writes {SCHEMA_VERSION}"
                + (" (opening it read-write upgrades it)" if out["schema_version"] < SCHEMA_VERSION else "")
            )
        for table in ("runs", "jobs", "events"):
            try:
                out[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            except sqlite3.DatabaseError as e:
                out[table] = None
                if f"{table}: {e}" not in out["problems"]:
                    out["problems"].append(f"{table}: {e}")
        out["problems"] += [p for p in unreadable_rows(conn) if p not in out["problems"]]
    finally:
        conn.close()
    return out


def refuse_foreign(path: Path) -> None:
    """A one-line error when the file at `path` is another application's database: `rebuild` would
    rename a registry over it (the old file kept only as a backup)."""
    if not Path(path).is_file():
        return
    try:
        conn = connect_readonly(Path(path), immutable=True)
        try:
            problem = schema_problem(conn, SCHEMA_VERSION)
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return  # damaged or not a database at all: rebuilding it is what rebuild is for
    if problem:
        raise UserError(f"registry {shown(str(path))}: {problem}, not rebuilt; {FOREIGN_HINT}")


def unreadable_rows(conn: sqlite3.Connection, limit: int = 5) -> list[str]:
    """Rows the other commands would refuse as damage when they read them (Registry's `guarded`: a
    JSON column that does not parse, a missing column): `check` must not say ok for those. The first
    `limit` are named."""
    found: list[str] = []
    for table, cols, parse in (
        ("runs", ",".join(RUN_COLS), run_from_row),
        ("jobs", ",".join(JOB_COLS), job_from_row),
        ("events", "run_id, data", lambda row: json.loads(row[1])),
    ):
        try:
            cur = conn.execute(f"SELECT {cols} FROM {table}")
        except sqlite3.DatabaseError as e:
            found.append(f"{table}: {e}")
            continue
        try:
            for row in cur:
                try:
                    parse(row)
                except (ValueError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
                    why = "nested too deep" if isinstance(e, RecursionError) else str(e)
                    found.append(f"{table}: row {shown(str(row[0]))} cannot be read ({why})")
                    if len(found) >= limit:
                        return found
        except sqlite3.DatabaseError as e:
            found.append(f"{table}: {e}")
    return found


@dataclass
class Salvage:
    """What can still be read from a (possibly damaged) registry file, table by table, row by row."""

    runs: dict[str, RunRecord] = field(default_factory=dict)
    jobs: dict[str, list[JobRecord]] = field(default_factory=dict)
    events: dict[str, list[tuple[float, str, str]]] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)  # tables or rows that could not be read


def _rows(conn: sqlite3.Connection, table: str, cols: str, lost: list[str]) -> list[tuple]:
    """Every readable row of `table`: all at once, else one rowid at a time around damaged pages."""
    try:
        return conn.execute(f"SELECT {cols} FROM {table}").fetchall()
    except sqlite3.DatabaseError:
        pass
    try:
        top = conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0] or 0
    except sqlite3.DatabaseError as e:
        lost.append(f"{table}: {e}")
        return []
    rows, bad = [], 0
    for rowid in range(1, min(int(top), 1_000_000) + 1):
        try:
            rows += conn.execute(f"SELECT {cols} FROM {table} WHERE rowid = ?", (rowid,)).fetchall()
        except sqlite3.DatabaseError:
            bad += 1
    if bad:
        lost.append(f"{table}: {bad} row(s) unreadable")
    return rows


def salvage(path: Path) -> Salvage:
    """The rows of the registry at `path` that can still be read (none when it is missing or not a
    database at all). Read with immutable=1: nothing is written, no -wal/-shm is made."""
    out = Salvage()
    if not Path(path).is_file():
        return out
    try:
        conn = connect_readonly(Path(path), immutable=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as e:
        out.lost.append(f"the whole file: {e}")
        return out
    try:
        for row in _rows(conn, "runs", ",".join(RUN_COLS), out.lost):
            try:
                run = run_from_row(row)
            except (ValueError, TypeError, RecursionError):
                out.lost.append(f"runs: row {shown(str(row[0]))} unreadable")
                continue
            if max(depth(run.config), depth(run.plan)) > MAX_DEPTH:  # clusterctl never nests them so deep
                out.lost.append(f"runs: row {shown(str(row[0]))} nested deeper than {MAX_DEPTH}")
                continue
            out.runs[run.run_id] = run
        try:
            jobs = _rows(conn, "jobs", ",".join(JOB_COLS), out.lost)
        except sqlite3.DatabaseError:
            jobs = []
        for row in jobs:
            try:
                job = job_from_row(row)
            except TypeError:
                continue
            out.jobs.setdefault(job.run_id, []).append(job)
        for row in _rows(conn, "events", "run_id, ts, kind, data", out.lost):
            out.events.setdefault(row[0], []).append((row[1], row[2], row[3]))
    finally:
        conn.close()
    return out


_STAMPED = re.compile(r"^(?P<name>.+)-(?P<stamp>\d{8}-\d{6})-[0-9a-f]{4}$")


MAX_STEPS = 10**12  # optimizer steps of one run: far above any real one, far below SQLite's int64


def _job_dirs(run_dir: Path) -> list[tuple[str, float]]:
    """(job id, submission time) of every job submitit made in a run directory, oldest first."""
    from vltrain.rundir import RunDir

    out = []
    try:
        entries = list(RunDir(run_dir).submitit.iterdir())
    except OSError:
        return []
    for d in entries:
        if not d.is_dir() or not re.fullmatch(r"\d+(?:_\d+)?(?:\+\d+)?", d.name):
            continue
        marker = d / f"{d.name}_submitted.pkl"
        try:
            t = (marker if marker.exists() else d).stat().st_mtime
        except OSError:
            continue
        out.append((d.name, t))
    return sorted(out, key=lambda x: (x[1], x[0]))


def run_from_dir(run_dir: Path, run_id: str | None = None) -> tuple[RunRecord, list[JobRecord]]:
    """The registry rows a run directory implies (what clusterctl.runs.submit.create and
    submit_attempt wrote there): the run from config.toml, plan.json, profile.json and launch.json,
    one job per submitit/<job>/ folder. Job states the files cannot tell are UNKNOWN (active), so
    the next `status` asks the scheduler (Slurm accounting) about them."""
    import pwd

    from clusterctl.backends import results
    from vltrain.rundir import RunDir

    rd = RunDir(run_dir)
    run_id = run_id or rd.root.name
    if not rd.plan.exists() or not rd.profile.exists():
        raise ValueError("no plan.json and profile.json: not a run directory of clusterctl")
    plan = run_dir_plan(rd.plan)  # bounded, max_retries in submit's range
    profile = run_dir_profile(rd.profile)  # submit's parser: world size and executor in range
    try:  # any config a release of clusterctl wrote: the rows keep it as it is (resume checks it)
        config = read_table(rd.config, "")
    except UserError:
        config = {}
    try:
        launch = read_table(rd.launch, "")
    except UserError:
        launch = {}
    gpus = profile.world_size
    m = _STAMPED.match(run_id)
    job_name = launch.get("job_name")
    name = job_name if isinstance(job_name, str) and re.fullmatch(SLURM_NAME, job_name) else None
    name = name or (m.group("name") if m else run_id)
    created = None
    try:
        plan_mtime = rd.plan.stat().st_mtime
    except OSError:
        plan_mtime = None
    if m:
        try:
            created = time.mktime(time.strptime(m.group("stamp"), "%Y%m%d-%H%M%S"))
        except (ValueError, OverflowError):
            created = None
    if created is None or (plan_mtime is not None and created <= plan_mtime < created + 120):
        created = plan_mtime if plan_mtime is not None else (created or 0.0)  # the file: sub-second
    try:
        user = pwd.getpwuid(rd.root.stat().st_uid).pw_name
    except (KeyError, OSError):
        user = "?"
    executor = profile.executor
    backend = _backend(executor)
    total = config.get("steps", plan.get("steps", 0))
    if not isinstance(total, int) or not 0 <= total <= MAX_STEPS:
        raise UserError(f"{rd.config}: steps: {str(total)[:40]!r} is out of range; allowed: 0 to {MAX_STEPS:,}")
    jobs: list[JobRecord] = []
    for n, (job_id, submitted) in enumerate(_job_dirs(rd.root), start=1):
        job = JobRecord(job_id, run_id, n, "submit" if n == 1 else "resume", submitted, RunState.UNKNOWN)
        if n > 1 and jobs[-1].state in (RunState.FAILED, RunState.NODE_FAIL):
            job.kind = "retry"  # a job after a failed one: clusterctl resubmitted it (or the user did)
        found = backend.recover_job(rd.root, job, int(gpus)) if backend is not None else None
        if found is None and results.submitit_outcome(str(rd.root), job_id)[0] == RunState.FAILED:
            found = {"state": RunState.FAILED}  # Slurm's accounting may still add times; status asks
        for k, v in (found or {}).items():
            setattr(job, k, v)
        jobs.append(job)
    states = [j.state for j in jobs]
    state = states[-1] if states and all(s in FINAL_STATES for s in states) else RunState.UNKNOWN
    run = RunRecord(
        run_id=run_id,
        name=str(name),
        profile=profile.name,
        executor=executor,
        run_dir=str(rd.root),
        created_at=float(created),
        user=user,
        gpus=int(gpus),
        total_steps=total,
        state=state,
        config=config,
        plan=plan,
    )
    return run, jobs


def _backend(executor: str) -> Backend | None:
    """The backend of a run directory's executor; None for a name this release has no backend for
    (its jobs get what the result pickles say, as a Slurm job's do)."""
    from clusterctl.backends import get_backend

    try:
        return get_backend(executor)
    except ValueError:
        return None


@dataclass
class Rebuilt:
    """What `rebuild` did."""

    path: str
    backup: str | None
    runs: int
    jobs: int
    events: int
    from_dirs: list[str] = field(default_factory=list)  # run ids rebuilt from their run directory
    from_old: list[str] = field(default_factory=list)  # run ids kept from the old file (no run directory)
    skipped: list[str] = field(default_factory=list)  # directories that are not runs, and why
    lost: list[str] = field(default_factory=list)  # what of the old file could not be read


def find_run_dirs(roots: Iterable[Path], skipped: list[str] | None = None) -> list[Path]:
    """Run directories under `roots` (each a directory of run directories, or one itself): those
    with a plan.json that clusterctl could have made (`not_made_here` says why not: the others go to
    `skipped`, one line each)."""
    from vltrain.rundir import RunDir

    out = []
    for root in roots:
        root = Path(root)
        try:
            found = [root] if RunDir(root).plan.is_file() else sorted(root.iterdir())
        except OSError:
            continue
        for d in found:
            if not (d.is_dir() and RunDir(d).plan.is_file()):
                continue
            why = not_made_here(d)
            if why is None:
                out.append(d)
            elif skipped is not None:
                skipped.append(f"{shown(str(d))}: {why}")
    return out


def not_made_here(d: Path) -> str | None:
    """Why directory `d` is not one `clusterctl submit` made for this user, or None: submit makes run
    directories 0700 (whatever the umask) under a UTF-8 name, owned by the user; a directory from a
    cloned repository or an archive is 0755, a link may point anywhere."""
    name = d.name
    if shown(name) != repr(name) or not name.isprintable():
        return "the name is not printable UTF-8; allowed: the <name>-<date>-<time>-<hex> names submit gives"
    try:
        st = d.lstat()
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link; allowed: the run directory itself"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not this user; allowed: your own run directories"
    if st.st_mode & 0o077:
        return (
            f"mode {stat.S_IMODE(st.st_mode):o} (submit makes them 700): not made by clusterctl submit, e.g. from a "
            "cloned repository; allowed: chmod 700 it if you made it and trust its files"
        )
    return None


def storable(run: RunRecord, jobs: list[JobRecord]) -> str | None:
    """The first value of the rows a run directory implies that SQLite cannot store, or None: an integer
    outside int64, a float that is not finite, a string that is not UTF-8."""
    for where, rec in [(f"run {run.run_id}", run), *((f"job {j.job_id}", j) for j in jobs)]:
        for k, v in vars(rec).items():
            if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
                continue
            bad = (
                (isinstance(v, int) and not -(2**63) <= v < 2**63)
                or (isinstance(v, float) and not math.isfinite(v))
                or (isinstance(v, str) and shown(v) != repr(v))
            )
            if bad:
                return f"{where}: {k}: {shown(str(v))[:60]} cannot be stored"
    return None


def rebuild(path: Path, roots: Iterable[Path], out: Path | None = None) -> Rebuilt:
    """A new registry from the run directories under `roots` and in the old file's rows that can
    still be read (their run_dir column), written to a new file and swapped in atomically.

    Rows of the old file that can be read win over what a directory implies (they hold Slurm's
    states, times and GPU counts); runs with no directory left keep their readable rows. The old
    file is hard-linked to `<name>.bak-<time>` before the new one is renamed over it (and its
    -wal/-shm renamed beside the backup), so the path always names a whole registry and the old
    bytes are never deleted. `out`: write the new registry there and leave `path` alone."""
    path = Path(path)
    target = Path(out) if out is not None else path
    if target.is_dir():
        raise UserError(f"--out: {shown(str(target))} is a directory; allowed: a file path")
    if target.exists() and not writable(target):
        raise UserError(
            f"registry {shown(str(target))}: read-only or immutable, so the rebuilt registry cannot replace it; "
            "allowed: make it and its directory writable, or --out FILE to write the rebuilt registry elsewhere"
        )
    refuse_foreign(path)
    old = salvage(path)
    dirs: dict[str, Path] = {}
    skipped: list[str] = []
    for run in old.runs.values():
        if Path(run.run_dir).is_dir():
            dirs[run.run_id] = Path(run.run_dir)
    for d in find_run_dirs(roots, skipped):
        dirs.setdefault(d.name, d)
    runs: dict[str, tuple[RunRecord, list[JobRecord]]] = {}
    from_dirs, from_old = [], []
    for run_id, d in sorted(dirs.items()):
        try:
            run, jobs = run_from_dir(d, run_id)
            if problem := storable(run, jobs):
                raise ValueError(problem)
        except (ValueError, OSError, UserError) as e:
            text = str(e)
            skipped.append(text if text.startswith(str(d)) else f"{shown(str(d))}: {text}")
            continue
        saved = old.runs.get(run_id)
        saved_jobs = {j.job_id: j for j in old.jobs.get(run_id, [])}
        if saved is not None:
            run = saved
        merged = {j.job_id: j for j in jobs} | saved_jobs  # a readable old row knows more
        order = sorted(merged.values(), key=lambda j: (j.submitted_at, j.attempt))
        for n, j in enumerate(order, start=1):
            j.attempt, j.run_id = n, run_id
        runs[run_id] = (run, order)
        from_dirs.append(run_id)
    for run_id, run in old.runs.items():
        if run_id not in runs:
            runs[run_id] = (run, sorted(old.jobs.get(run_id, []), key=lambda j: j.attempt))
            from_old.append(run_id)
    tmp = target.with_name(f".{target.name}.rebuild-{os.getpid()}")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    n_jobs = n_events = 0
    try:
        create_private(tmp)
        conn = connect(tmp)
        migrate(conn)
        conn.execute("BEGIN IMMEDIATE")
        for run_id, (run, jobs) in sorted(runs.items()):
            values = [getattr(run, c) for c in RUN_COLS]
            values[RUN_COLS.index("config")] = dumps_strict(run.config, sort_keys=True, default=str)
            values[RUN_COLS.index("plan")] = dumps_strict(run.plan, sort_keys=True, default=str)
            conn.execute(f"INSERT INTO runs ({','.join(RUN_COLS)}) VALUES ({','.join('?' * len(RUN_COLS))})", values)
            for j in jobs:
                conn.execute(
                    f"INSERT INTO jobs ({','.join(JOB_COLS)}) VALUES ({','.join('?' * len(JOB_COLS))})",
                    [getattr(j, k) for k in JOB_COLS],
                )
            n_jobs += len(jobs)
            events = old.events.get(run_id) or [
                (j.submitted_at, j.kind, dumps_strict({"job_id": j.job_id}, sort_keys=True)) for j in jobs
            ]
            conn.executemany(
                "INSERT INTO events (run_id, ts, kind, data) VALUES (?, ?, ?, ?)",
                [(run_id, ts, kind, data) for ts, kind, data in events],
            )
            n_events += len(events)
        conn.execute("COMMIT")
        conn.close()  # the last connection: its WAL is checkpointed into the file and removed
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        backup = _swap(tmp, target)
    except sqlite3.Error as e:
        raise db_error(tmp, e) from None
    except OSError as e:
        raise UserError(
            f"registry {shown(str(target))}: cannot write the rebuilt registry beside it ({e.strerror or e}); "
            "allowed: a writable directory, or --out FILE elsewhere"
        ) from None
    finally:
        for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            p.unlink(missing_ok=True)
    return Rebuilt(str(target), backup, len(runs), n_jobs, n_events, from_dirs, from_old, skipped, old.lost)


def _swap(new: Path, path: Path) -> str | None:
    """Rename `new` over `path` atomically; the file that was there stays, hard-linked as
    `<name>.bak-<time>` (with its -wal and -shm beside it). Returns the backup's path."""
    backup = None
    if path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = path.with_name(f"{path.name}.bak-{stamp}")
        n = 1
        while backup.exists():
            n += 1
            backup = path.with_name(f"{path.name}.bak-{stamp}-{n}")
        os.link(path, backup)
        for side in ("-wal", "-shm", "-journal"):
            s = Path(f"{path}{side}")
            if s.exists():  # they belong to the old file: left here, SQLite would replay them onto the new one
                os.replace(s, f"{backup}{side}")
    os.replace(new, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return str(backup) if backup else None
