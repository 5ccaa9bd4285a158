"""The run registry: one SQLite file of runs, their Slurm jobs (every attempt) and events.

Why SQLite: many short-lived CLI processes (submit, status, a watcher, a trainer's requeue hook)
read and write at once. WAL lets readers run beside a writer; every write is one transaction opened
with BEGIN IMMEDIATE, so two writers queue on the busy timeout instead of failing half-way, and a
transaction is atomic (the SQLite equivalent of "temp name + rename"). The schema is versioned with
`PRAGMA user_version`; `_MIGRATIONS` brings any older file up to date inside one transaction.
Reads are one query per table, so `clusterctl status` stays fast with 10,000 runs.

What goes wrong with a file is one line naming it and what to do (`UserError`; a lock held too long
is `ServiceUnavailable`), never a traceback: a file that is not a database, truncated or with a
damaged page, or that cannot be opened or written (runs.dbfile). A registry whose file or directory
is not writable (or that is immutable) is opened read-only: `status` and reports read it, and say that
what they learnt from Slurm was not saved. New files are created 0600. The summaries' tables are
queried by runs.summary_tables; `check` and `rebuild` (the file damaged) are runs.repair's.
JSON columns are strict JSON: NaN and Infinity are stored as null (runs.artifacts.dumps_strict).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clusterctl.runs.artifacts import dumps_strict
from clusterctl.runs.dbfile import (
    DAMAGED_HINT,
    FOREIGN_HINT,
    JOB_COLS,
    RUN_COLS,
    connect,
    connect_readonly,
    create_private,
    db_error,
    default_path,
    guarded,
    integrity_problems,
    job_from_row,
    run_from_row,
    schema_problem,
    shown,
    sql_list,
    writable,
)
from clusterctl.runs.summary_tables import SummaryTables, plan_sweep
from clusterctl.specs import ACTIVE_STATES, JOB_KINDS, JobRecord, RunRecord, RunState
from vltrain.common.errors import UserError

# Migration N takes a file at version N-1 to version N. Never edit a shipped step: append a new one.
_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY, name TEXT NOT NULL, profile TEXT NOT NULL, executor TEXT NOT NULL,
        run_dir TEXT NOT NULL, created_at REAL NOT NULL, user TEXT NOT NULL, gpus INTEGER NOT NULL,
        total_steps INTEGER NOT NULL, state TEXT NOT NULL, config TEXT NOT NULL, plan TEXT NOT NULL);
    CREATE INDEX runs_name ON runs(name, created_at);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, run_id TEXT NOT NULL REFERENCES runs(run_id),
        attempt INTEGER NOT NULL, kind TEXT NOT NULL, submitted_at REAL NOT NULL, state TEXT NOT NULL,
        started_at REAL, ended_at REAL, elapsed_s REAL,
        UNIQUE (run_id, job_id), UNIQUE (run_id, attempt));
    CREATE INDEX jobs_job_id ON jobs(job_id);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY, run_id TEXT NOT NULL REFERENCES runs(run_id), ts REAL NOT NULL,
        kind TEXT NOT NULL, data TEXT NOT NULL);
    CREATE INDEX events_run ON events(run_id, ts);
    """,
    # 2: what Slurm accounting tells about each job (GPU-hours, requeues, where it ran, how it ended),
    #    and an index for status's "active runs plus the newest finished" query.
    2: """
    ALTER TABLE jobs ADD COLUMN alloc_gpus INTEGER;
    ALTER TABLE jobs ADD COLUMN requeues INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN node_list TEXT;
    ALTER TABLE jobs ADD COLUMN exit_code TEXT;
    CREATE INDEX runs_state ON runs(state, created_at);
    CREATE INDEX runs_created ON runs(created_at);
    """,
    # 3: one summary per run (runs.summaries: GPU-hours, energy, last metrics, reason...), so reports
    #    and `status --all` over a long history read one table instead of every run directory; and a
    #    settled run's `status --json` row as text (status_rows; format: the version of its keys). Any
    #    change to a run's row or its jobs deletes both (triggers): they are computed again. Figures
    #    have no declared type, so an int stays an int and a float a float (as the files had them).
    3: """
    CREATE TABLE summaries (
        run_id TEXT PRIMARY KEY, settled INTEGER NOT NULL, files TEXT NOT NULL, computed_at REAL NOT NULL,
        gpu_hours NOT NULL, gpu_hours_source TEXT NOT NULL, elapsed_s NOT NULL,
        energy_kwh NOT NULL, co2_kg NOT NULL, pue, energy_files INTEGER NOT NULL,
        estimated_kwh, estimated_co2_kg, requeues INTEGER NOT NULL, resumes INTEGER NOT NULL,
        step, loss TEXT, samples_per_s, reason TEXT, max_retries INTEGER NOT NULL,
        job_id TEXT, job_ids TEXT NOT NULL, alloc_gpus INTEGER, node_list TEXT, exit_code TEXT);
    CREATE TABLE status_rows (run_id TEXT PRIMARY KEY, format INTEGER NOT NULL, json TEXT NOT NULL);
    CREATE TRIGGER summaries_run_changed AFTER UPDATE ON runs BEGIN
        DELETE FROM summaries WHERE run_id IN (OLD.run_id, NEW.run_id);
        DELETE FROM status_rows WHERE run_id IN (OLD.run_id, NEW.run_id); END;
    CREATE TRIGGER summaries_run_deleted BEFORE DELETE ON runs BEGIN
        DELETE FROM summaries WHERE run_id = OLD.run_id; DELETE FROM status_rows WHERE run_id = OLD.run_id; END;
    CREATE TRIGGER summaries_job_added AFTER INSERT ON jobs BEGIN
        DELETE FROM summaries WHERE run_id = NEW.run_id; DELETE FROM status_rows WHERE run_id = NEW.run_id; END;
    CREATE TRIGGER summaries_job_changed AFTER UPDATE ON jobs BEGIN
        DELETE FROM summaries WHERE run_id IN (OLD.run_id, NEW.run_id);
        DELETE FROM status_rows WHERE run_id IN (OLD.run_id, NEW.run_id); END;
    CREATE TRIGGER summaries_job_deleted AFTER DELETE ON jobs BEGIN
        DELETE FROM summaries WHERE run_id = OLD.run_id; DELETE FROM status_rows WHERE run_id = OLD.run_id; END;
    """,
    # 4: the notifications of each run (runs.notify), one row per run and key: an observer claims one by
    #    inserting its row before it calls the webhooks (the inserter sends, every other observer skips),
    #    then records the outcome (sent_at, ok, error). A rebuilt registry starts with none (docs/reliability.md).
    4: """
    CREATE TABLE notifications (
        run_id TEXT NOT NULL, key TEXT NOT NULL, event TEXT NOT NULL, created_at REAL NOT NULL,
        sent_at REAL, ok INTEGER, error TEXT, PRIMARY KEY (run_id, key));
    """,
}
SCHEMA_VERSION = max(_MIGRATIONS)

_JOB_UPDATABLE = frozenset(JOB_COLS) - {"job_id", "run_id", "attempt"}


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the file up to `target` in one IMMEDIATE transaction; returns the version found.

    Safe when many processes open a new or old file at once: the version is re-read under the
    write lock, so exactly one of them applies each step.
    """
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise UserError(
            f"registry: schema version {found} is newer than this clusterctl knows ({SCHEMA_VERSION}); "
            "allowed: upgrade clusterctl, or point CLUSTERCTL_REGISTRY at another file"
        )
    if found >= target:
        return found
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in range(version + 1, target + 1):
            for stmt in _statements(_MIGRATIONS[step]):  # executescript would COMMIT our transaction
                conn.execute(stmt)
        conn.execute(f"PRAGMA user_version = {int(target)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, whole (a trigger's body holds `;` of its own)."""
    buf = ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n;"):
                yield buf
            buf = ""


class Registry(SummaryTables):
    """Runs, jobs and events of this user. Cheap to open; one instance per CLI process.

    `readonly`: None decides from the file (read-only when it or its directory cannot be written);
    True opens it read-only whatever (never creates it). `self.readonly` says which it is; every
    write of a read-only registry is a one-line error."""

    def __init__(self, path: Path | None = None, readonly: bool | None = None):
        self.path = Path(path) if path is not None else default_path()
        try:
            self._open(readonly)
        except UserError:
            raise
        except sqlite3.Error as e:
            raise db_error(self.path, e) from None

    def _open(self, readonly: bool | None) -> None:
        p = self.path
        if p.is_dir():
            raise UserError(f"registry {shown(str(p))}: is a directory; allowed: a file path (CLUSTERCTL_REGISTRY)")
        if readonly is None:
            readonly = p.exists() and not writable(p)
        self.readonly = readonly
        if readonly:
            if not p.exists():
                raise UserError(f"registry {shown(str(p))}: no such file; allowed: an existing registry file")
            self._conn = connect_readonly(p)
            try:
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError as e:
                if getattr(e, "sqlite_errorname", "").startswith("SQLITE_CANTOPEN"):  # no -shm can be made here
                    self._conn.close()
                    self._conn = connect_readonly(p, immutable=True)
                    version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                else:
                    raise
            if problem := schema_problem(self._conn, SCHEMA_VERSION):
                raise UserError(f"registry {shown(str(p))}: {problem}; {FOREIGN_HINT}")
            self.has_summaries = version >= 3
            self.has_notifications = version >= 4  # older: nothing was sent (and nothing is from read-only)
            if version not in (2, 3, SCHEMA_VERSION):  # 2: readable, summaries computed, not kept
                migrate_hint = (
                    "allowed: make it writable once (clusterctl upgrades it in place)"
                    if version < SCHEMA_VERSION
                    else "allowed: upgrade clusterctl, or point CLUSTERCTL_REGISTRY at another file"
                )
                raise UserError(
                    f"registry {shown(str(p))}: read-only and at schema version {version} (this clusterctl reads "
                    f"{SCHEMA_VERSION}); {migrate_hint}"
                )
            return
        try:
            if not p.exists():
                create_private(p)
        except OSError as e:
            raise UserError(
                f"registry {shown(str(p))}: cannot be created ({e.strerror or e}); allowed: a writable directory, "
                "or set CLUSTERCTL_REGISTRY to a file in one"
            ) from None
        self._conn = connect(p, known=SCHEMA_VERSION)
        migrate(self._conn)
        self.has_summaries = self.has_notifications = True

    def close(self) -> None:
        self._conn.close()

    @guarded
    def quick_check(self) -> list[str]:
        """SQLite's quick_check over every page (a few ms for 10,000 runs): the problems found, []
        when none. A damaged page raises inside SQLite; that is a problem too."""
        return integrity_problems(self._conn, "quick_check")

    def verify(self) -> None:
        """One line naming the file and what to do when quick_check finds damage (commands that
        read every run call it: a damaged page they never read must not pass as a clean answer)."""
        problems = self.quick_check()
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(
                f"registry {shown(str(self.path))}: the file is damaged ({problems[0]}{more}); {DAMAGED_HINT}"
            )

    def require_writable(self) -> None:
        """A one-line error when this registry was opened read-only (before acting on a run: a
        cancel that could not be recorded must not happen)."""
        if self.readonly:
            raise UserError(
                f"registry {shown(str(self.path))}: read-only (the file or its directory cannot be written); "
                "allowed: make both writable, or set CLUSTERCTL_REGISTRY to a writable file"
            )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before the first read so two writers never deadlock."""
        self.require_writable()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    # --- runs -------------------------------------------------------------------------------

    @guarded
    def new_run_id(self, name: str) -> str:
        """`<name>-YYYYMMDD-HHMMSS-<4 hex>`: sortable by time, readable, unique in practice."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        while True:
            run_id = f"{name}-{stamp}-{os.urandom(2).hex()}"
            if self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                return run_id

    @guarded
    def add_run(self, run: RunRecord) -> None:
        values = [getattr(run, c) for c in RUN_COLS]
        values[RUN_COLS.index("config")] = dumps_strict(run.config, sort_keys=True, default=str)
        values[RUN_COLS.index("plan")] = dumps_strict(run.plan, sort_keys=True, default=str)
        with self._write() as c:
            try:
                c.execute(f"INSERT INTO runs ({','.join(RUN_COLS)}) VALUES ({','.join('?' * len(RUN_COLS))})", values)
            except sqlite3.IntegrityError:
                raise UserError(
                    f"registry: run id {run.run_id!r} exists already; allowed: a new id (Registry.new_run_id)"
                ) from None

    def set_run_steps(self, run_id: str, config: dict[str, Any], total_steps: int) -> None:
        """A run's config and total steps after `resume --steps` extended it (runs.lifecycle.extend)."""
        with self._write() as c:
            c.execute(
                "UPDATE runs SET config = ?, total_steps = ? WHERE run_id = ?",
                (dumps_strict(config, sort_keys=True, default=str), total_steps, run_id),
            )

    def set_run_state(self, run_id: str, state: str) -> None:
        self.set_run_states({run_id: state})

    @guarded
    def set_run_states(self, states: dict[str, str], if_states: dict[str, str] | None = None) -> None:
        """Several runs' states in one transaction; with `if_states`, only runs still in that state."""
        if not states:
            return
        with self._write() as c:
            if if_states is None:
                c.executemany("UPDATE runs SET state = ? WHERE run_id = ?", [(s, r) for r, s in states.items()])
            else:
                c.executemany(
                    "UPDATE runs SET state = ? WHERE run_id = ? AND state = ?",
                    [(s, r, if_states[r]) for r, s in states.items()],
                )

    @guarded
    def claim_run(self, run_id: str, from_state: str, to_state: str) -> bool:
        """Move a run from one state to another only if it is still in the first; True if this call did.
        Lets one of many concurrent CLI processes, and only one, act on a state (e.g. retry a failure)."""
        with self._write() as c:
            cur = c.execute("UPDATE runs SET state = ? WHERE run_id = ? AND state = ?", (to_state, run_id, from_state))
            return cur.rowcount == 1

    @guarded
    def delete_run(self, run_id: str) -> None:
        """Remove a run that never got submitted (submit's clean-up after a failure)."""
        with self._write() as c:
            c.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
            if self.has_notifications:
                c.execute("DELETE FROM notifications WHERE run_id = ?", (run_id,))
            c.execute("DELETE FROM jobs WHERE run_id = ?", (run_id,))
            c.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    @guarded
    def get_run(self, ref: str) -> RunRecord:
        """A run by id, by name (the newest of that name) or by a unique id prefix."""
        try:
            ref.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(
                f"RUN: {shown(ref)} is not UTF-8 text, so no run has it; allowed: a run id, a unique id prefix "
                "or a run name (clusterctl status --all lists them)"
            ) from None
        q = f"SELECT {','.join(RUN_COLS)} FROM runs"
        row = self._conn.execute(f"{q} WHERE run_id = ?", (ref,)).fetchone()
        row = row or self._conn.execute(f"{q} WHERE name = ? ORDER BY created_at DESC LIMIT 1", (ref,)).fetchone()
        if row is not None:
            return run_from_row(row)
        # Prefix match as a range so the primary-key index answers it (LIKE would scan).
        hits = (
            self._conn.execute(
                f"{q} WHERE run_id >= ? AND run_id < ? ORDER BY run_id LIMIT 4", (ref, ref + "\U0010ffff")
            ).fetchall()
            if ref
            else []
        )
        if len(hits) == 1:
            return run_from_row(hits[0])
        if not hits:
            raise UserError(
                f"RUN: no run matches {shown(ref)}; allowed: a run id, a unique id prefix or a run name "
                "(clusterctl status --all lists them)"
            )
        names = ", ".join(h[0] for h in hits[:3]) + (", ..." if len(hits) > 3 else "")
        raise UserError(
            f"RUN: {shown(ref)} matches several runs ({names}); allowed: a longer prefix or the full run id"
        )

    @guarded
    def list_runs(self, include_finished: bool = True, limit: int | None = None) -> list[RunRecord]:
        """Runs, newest first; without `include_finished` only those in an active state."""
        where = "" if include_finished else f"WHERE state IN ({sql_list(ACTIVE_STATES)})"
        lim = "" if limit is None else f"LIMIT {int(limit)}"
        rows = self._conn.execute(
            f"SELECT {','.join(RUN_COLS)} FROM runs {where} ORDER BY created_at DESC {lim}"
        ).fetchall()
        return [run_from_row(r) for r in rows]

    @guarded
    def sweep_runs(self, sweep_id: str) -> list[RunRecord]:
        """The runs of sweep `sweep_id` (plan["sweep"]["id"]: runs.sweep) in point order, read from
        the stored plans by SQLite's JSON functions: no run's JSON is decoded here to find them."""
        rows = self._conn.execute(
            f"SELECT {','.join(RUN_COLS)} FROM runs WHERE {plan_sweep('id')} = ? ORDER BY {plan_sweep('index')}",
            (sweep_id,),
        ).fetchall()
        return [run_from_row(r) for r in rows]

    @guarded
    def active_and_recent(self, finished: int = 5) -> list[RunRecord]:
        """Every active run plus the `finished` newest finished ones, newest first, in one query."""
        active = sql_list(ACTIVE_STATES)
        rows = self._conn.execute(
            f"SELECT {','.join(RUN_COLS)} FROM runs WHERE state IN ({active}) OR run_id IN "
            f"(SELECT run_id FROM runs WHERE state NOT IN ({active}) ORDER BY created_at DESC LIMIT ?) "
            "ORDER BY created_at DESC",
            (int(finished),),
        ).fetchall()
        return [run_from_row(r) for r in rows]

    @guarded
    def count_runs(self) -> int:
        return self._conn.execute("SELECT count(*) FROM runs").fetchone()[0]

    @guarded
    def runs_by_ids(self, run_ids: Iterable[str]) -> dict[str, RunRecord]:
        """Whole run records (config and plan decoded) of these ids, in one query."""
        rows = self._conn.execute(
            f"SELECT {','.join(RUN_COLS)} FROM runs WHERE run_id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(run_ids)),),
        ).fetchall()
        return {r[0]: run_from_row(r) for r in rows}

    @guarded
    def insert_runs(self, items: Iterable[tuple[RunRecord, list[JobRecord]]]) -> None:
        """Many runs with their jobs in one transaction, as they are (tests, benchmarks, imports)."""
        run_sql = f"INSERT INTO runs ({','.join(RUN_COLS)}) VALUES ({','.join('?' * len(RUN_COLS))})"
        job_sql = f"INSERT INTO jobs ({','.join(JOB_COLS)}) VALUES ({','.join('?' * len(JOB_COLS))})"
        ci, pi = RUN_COLS.index("config"), RUN_COLS.index("plan")
        with self._write() as c:
            for run, jobs in items:
                values = [getattr(run, k) for k in RUN_COLS]
                values[ci] = dumps_strict(run.config, sort_keys=True, default=str)
                values[pi] = dumps_strict(run.plan, sort_keys=True, default=str)
                c.execute(run_sql, values)
                c.executemany(job_sql, [[getattr(j, k) for k in JOB_COLS] for j in jobs])

    # --- jobs -------------------------------------------------------------------------------

    @guarded
    def add_job(self, run_id: str, job_id: str, kind: str, submitted_at: float | None = None) -> JobRecord:
        """Record a new Slurm job (or local process) of `run_id`; attempts are numbered 1, 2, ..."""
        if kind not in JOB_KINDS:  # a programming error, not the user's
            raise ValueError(f"registry: job kind {kind!r} is not known; allowed: {', '.join(JOB_KINDS)}")
        with self._write() as c:
            if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                raise ValueError(f"registry: no run {run_id!r} to add job {job_id} to; allowed: a registered run id")
            attempt = c.execute(
                "SELECT coalesce(max(attempt), 0) + 1 FROM jobs WHERE run_id = ?", (run_id,)
            ).fetchone()[0]
            job = JobRecord(
                job_id=str(job_id),
                run_id=run_id,
                attempt=attempt,
                kind=kind,
                submitted_at=time.time() if submitted_at is None else submitted_at,
                state=RunState.SUBMITTED,
            )
            c.execute(
                f"INSERT INTO jobs ({','.join(JOB_COLS)}) VALUES ({','.join('?' * len(JOB_COLS))})",
                [getattr(job, k) for k in JOB_COLS],
            )
        return job

    def update_job(self, job_id: str, run_id: str | None = None, **fields_: Any) -> None:
        """Set fields of a job; without `run_id`, of the newest job with that id (ids can repeat
        when a test cluster's state is wiped)."""
        self.update_jobs([(job_id, run_id, fields_)])

    @guarded
    def update_jobs(self, updates: Iterable[tuple]) -> None:
        """Many `(job_id, run_id or None, fields[, if_state])` updates in one transaction.

        With `if_state`, the row changes only if its state is still that one: a status refresh
        computed from an older read never undoes a newer write (a cancel, a retry)."""
        stmts = []
        for job_id, run_id, f, *guard in updates:
            bad = set(f) - _JOB_UPDATABLE
            if bad:
                raise ValueError(f"registry: job fields {sorted(bad)} cannot be set; allowed: {sorted(_JOB_UPDATABLE)}")
            if not f:
                continue
            sets = ", ".join(f"{k} = ?" for k in f)
            cond, args = ("state = ? AND ", [guard[0]]) if guard else ("", [])
            if run_id is None:
                stmts.append(
                    (
                        f"UPDATE jobs SET {sets} WHERE {cond}id = (SELECT max(id) FROM jobs WHERE job_id = ?)",
                        [*f.values(), *args, str(job_id)],
                    )
                )
            else:
                stmts.append(
                    (
                        f"UPDATE jobs SET {sets} WHERE {cond}run_id = ? AND job_id = ?",
                        [*f.values(), *args, run_id, str(job_id)],
                    )
                )
        if stmts:
            with self._write() as c:
                for sql, args in stmts:
                    c.execute(sql, args)

    def jobs(self, run_id: str) -> list[JobRecord]:
        return self.jobs_for([run_id]).get(run_id, [])

    @guarded
    def jobs_for(self, run_ids: Iterable[str]) -> dict[str, list[JobRecord]]:
        """Jobs of many runs in one query (ids passed as one JSON array: no variable limit)."""
        ids = list(run_ids)
        out: dict[str, list[JobRecord]] = {r: [] for r in ids}
        if not ids:
            return out
        rows = self._conn.execute(
            f"SELECT {','.join(JOB_COLS)} FROM jobs WHERE run_id IN (SELECT value FROM json_each(?)) "
            "ORDER BY run_id, attempt",
            (json.dumps(ids),),
        ).fetchall()
        for row in rows:
            out[row[1]].append(job_from_row(row))
        return out

    # --- events -----------------------------------------------------------------------------

    @guarded
    def add_event(self, run_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        with self._write() as c:
            c.execute(
                "INSERT INTO events (run_id, ts, kind, data) VALUES (?, ?, ?, ?)",
                (run_id, time.time(), kind, dumps_strict(data or {}, sort_keys=True, default=str)),
            )

    @guarded
    def events(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT ts, kind, data FROM events WHERE run_id = ? ORDER BY id", (run_id,)
        ).fetchall()
        return [{"ts": ts, "kind": kind, "data": json.loads(data)} for ts, kind, data in rows]

    @guarded
    def latest_events(self, run_ids: Iterable[str], kind: str) -> dict[str, dict[str, Any]]:
        """The data of each run's newest event of `kind`, for the runs that have one (one query; status
        shows the newest retry's excluded nodes)."""
        rows = self._conn.execute(
            "SELECT run_id, data FROM events WHERE kind = ? AND run_id IN (SELECT value FROM json_each(?)) ORDER BY id",
            (kind, json.dumps(list(run_ids))),
        ).fetchall()
        return {run_id: json.loads(data) for run_id, data in rows}  # the newest last: it wins

    # --- notifications (runs.notify) ----------------------------------------------------------

    @guarded
    def claim_notification(self, run_id: str, key: str, event: str) -> bool:
        """Insert the row of notification `key` of `run_id`; True if this call did (it sends it), False
        when another observer claimed it first (or the registry is read-only: nothing is sent then)."""
        if self.readonly:
            return False
        with self._write() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO notifications (run_id, key, event, created_at) VALUES (?, ?, ?, ?)",
                (run_id, key, event, time.time()),
            )
            return cur.rowcount == 1

    @guarded
    def record_notification(self, run_id: str, key: str, ok: bool, error: str | None = None) -> None:
        """The outcome of a claimed notification: delivered to every webhook (ok) or not (the error)."""
        with self._write() as c:
            c.execute(
                "UPDATE notifications SET sent_at = ?, ok = ?, error = ? WHERE run_id = ? AND key = ?",
                (time.time(), int(ok), error, run_id, key),
            )

    @guarded
    def notified_keys(self, run_ids: Iterable[str]) -> dict[str, set[str]]:
        """The notification keys claimed for each of these runs, in one query (status over many runs)."""
        ids = list(run_ids)
        out: dict[str, set[str]] = {r: set() for r in ids}
        if not ids or not self.has_notifications:
            return out
        rows = self._conn.execute(
            "SELECT run_id, key FROM notifications WHERE run_id IN (SELECT value FROM json_each(?))",
            (json.dumps(ids),),
        ).fetchall()
        for run_id, key in rows:
            out[run_id].add(key)
        return out

    @guarded
    def notifications(self, run_id: str) -> list[dict[str, Any]]:
        """The notifications of one run, oldest first (tests, `status` of one run)."""
        if not self.has_notifications:
            return []
        rows = self._conn.execute(
            "SELECT key, event, created_at, sent_at, ok, error FROM notifications WHERE run_id = ? ORDER BY created_at",
            (run_id,),
        ).fetchall()
        cols = ("key", "event", "created_at", "sent_at", "ok", "error")
        return [dict(zip(cols, r)) for r in rows]
