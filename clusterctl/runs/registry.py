"""The run registry: one SQLite file of runs, their Slurm jobs (every attempt) and events.

Why SQLite: many short-lived CLI processes (submit, status, a watcher, a trainer's requeue hook)
read and write at once. WAL lets readers run beside a writer; every write is one transaction opened
with BEGIN IMMEDIATE, so two writers queue on the busy timeout instead of failing half-way, and a
transaction is atomic (the SQLite equivalent of "temp name + rename"). The schema is versioned with
`PRAGMA user_version`; `_MIGRATIONS` brings any older file up to date inside one transaction.
Reads are one query per table, so `clusterctl status` stays fast with 10,000 runs.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from clusterctl.specs import ACTIVE_STATES, JOB_KINDS, JobRecord, RunRecord, RunState
from vltrain.common.errors import UserError

BUSY_TIMEOUT_MS = 30_000

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
}
SCHEMA_VERSION = max(_MIGRATIONS)


_RUN_COLS = tuple(f.name for f in fields(RunRecord))
_JOB_COLS = tuple(f.name for f in fields(JobRecord))
_JOB_UPDATABLE = frozenset(_JOB_COLS) - {"job_id", "run_id", "attempt"}


def default_path() -> Path:
    """$CLUSTERCTL_REGISTRY, else the user data dir (platformdirs) / registry.db."""
    env = os.environ.get("CLUSTERCTL_REGISTRY")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("clusterctl")) / "registry.db"


def _run_from_row(row: sqlite3.Row) -> RunRecord:
    d = dict(zip(_RUN_COLS, row))
    d["config"] = json.loads(d["config"])
    d["plan"] = json.loads(d["plan"])
    return RunRecord(**d)


def _job_from_row(row: Iterable[Any]) -> JobRecord:
    return JobRecord(**dict(zip(_JOB_COLS, row)))


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
            for stmt in _MIGRATIONS[step].split(";"):  # executescript would COMMIT our transaction
                if stmt.strip():
                    conn.execute(stmt)
        conn.execute(f"PRAGMA user_version = {int(target)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def connect(path: Path) -> sqlite3.Connection:
    """Open `path` in autocommit mode with WAL and a busy timeout (transactions are explicit)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")  # persistent in the file: set once
    conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable enough, never corrupt
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Registry:
    """Runs, jobs and events of this user. Cheap to open; one instance per CLI process."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        self._conn = connect(self.path)
        migrate(self._conn)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before the first read so two writers never deadlock."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    # --- runs -------------------------------------------------------------------------------

    def new_run_id(self, name: str) -> str:
        """`<name>-YYYYMMDD-HHMMSS-<4 hex>`: sortable by time, readable, unique in practice."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        while True:
            run_id = f"{name}-{stamp}-{os.urandom(2).hex()}"
            if self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                return run_id

    def add_run(self, run: RunRecord) -> None:
        values = [getattr(run, c) for c in _RUN_COLS]
        values[_RUN_COLS.index("config")] = json.dumps(run.config, sort_keys=True, default=str)
        values[_RUN_COLS.index("plan")] = json.dumps(run.plan, sort_keys=True, default=str)
        with self._write() as c:
            try:
                c.execute(f"INSERT INTO runs ({','.join(_RUN_COLS)}) VALUES ({','.join('?' * len(_RUN_COLS))})", values)
            except sqlite3.IntegrityError:
                raise UserError(
                    f"registry: run id {run.run_id!r} exists already; allowed: a new id (Registry.new_run_id)"
                ) from None

    def set_run_state(self, run_id: str, state: str) -> None:
        self.set_run_states({run_id: state})

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

    def claim_run(self, run_id: str, from_state: str, to_state: str) -> bool:
        """Move a run from one state to another only if it is still in the first; True if this call did.
        Lets one of many concurrent CLI processes, and only one, act on a state (e.g. retry a failure)."""
        with self._write() as c:
            cur = c.execute("UPDATE runs SET state = ? WHERE run_id = ? AND state = ?", (to_state, run_id, from_state))
            return cur.rowcount == 1

    def delete_run(self, run_id: str) -> None:
        """Remove a run that never got submitted (submit's clean-up after a failure)."""
        with self._write() as c:
            c.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
            c.execute("DELETE FROM jobs WHERE run_id = ?", (run_id,))
            c.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    def get_run(self, ref: str) -> RunRecord:
        """A run by id, by name (the newest of that name) or by a unique id prefix."""
        q = f"SELECT {','.join(_RUN_COLS)} FROM runs"
        row = self._conn.execute(f"{q} WHERE run_id = ?", (ref,)).fetchone()
        row = row or self._conn.execute(f"{q} WHERE name = ? ORDER BY created_at DESC LIMIT 1", (ref,)).fetchone()
        if row is not None:
            return _run_from_row(row)
        # Prefix match as a range so the primary-key index answers it (LIKE would scan).
        hits = (
            self._conn.execute(
                f"{q} WHERE run_id >= ? AND run_id < ? ORDER BY run_id LIMIT 4", (ref, ref + "\U0010ffff")
            ).fetchall()
            if ref
            else []
        )
        if len(hits) == 1:
            return _run_from_row(hits[0])
        if not hits:
            raise UserError(
                f"RUN: no run matches {ref!r}; allowed: a run id, a unique id prefix or a run name "
                "(clusterctl status --all lists them)"
            )
        names = ", ".join(h[0] for h in hits[:3]) + (", ..." if len(hits) > 3 else "")
        raise UserError(f"RUN: {ref!r} matches several runs ({names}); allowed: a longer prefix or the full run id")

    def list_runs(self, include_finished: bool = True, limit: int | None = None) -> list[RunRecord]:
        """Runs, newest first; without `include_finished` only those in an active state."""
        where = "" if include_finished else f"WHERE state IN ({_in(ACTIVE_STATES)})"
        lim = "" if limit is None else f"LIMIT {int(limit)}"
        rows = self._conn.execute(f"SELECT {','.join(_RUN_COLS)} FROM runs {where} ORDER BY created_at DESC {lim}")
        return [_run_from_row(r) for r in rows]

    def active_and_recent(self, finished: int = 5) -> list[RunRecord]:
        """Every active run plus the `finished` newest finished ones, newest first, in one query."""
        active = _in(ACTIVE_STATES)
        rows = self._conn.execute(
            f"SELECT {','.join(_RUN_COLS)} FROM runs WHERE state IN ({active}) OR run_id IN "
            f"(SELECT run_id FROM runs WHERE state NOT IN ({active}) ORDER BY created_at DESC LIMIT ?) "
            "ORDER BY created_at DESC",
            (int(finished),),
        )
        return [_run_from_row(r) for r in rows]

    def count_runs(self) -> int:
        return self._conn.execute("SELECT count(*) FROM runs").fetchone()[0]

    # --- jobs -------------------------------------------------------------------------------

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
                f"INSERT INTO jobs ({','.join(_JOB_COLS)}) VALUES ({','.join('?' * len(_JOB_COLS))})",
                [getattr(job, k) for k in _JOB_COLS],
            )
        return job

    def update_job(self, job_id: str, run_id: str | None = None, **fields_: Any) -> None:
        """Set fields of a job; without `run_id`, of the newest job with that id (ids can repeat
        when a test cluster's state is wiped)."""
        self.update_jobs([(job_id, run_id, fields_)])

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

    def jobs_for(self, run_ids: Iterable[str]) -> dict[str, list[JobRecord]]:
        """Jobs of many runs in one query (ids passed as one JSON array: no variable limit)."""
        ids = list(run_ids)
        out: dict[str, list[JobRecord]] = {r: [] for r in ids}
        if not ids:
            return out
        rows = self._conn.execute(
            f"SELECT {','.join(_JOB_COLS)} FROM jobs WHERE run_id IN (SELECT value FROM json_each(?)) "
            "ORDER BY run_id, attempt",
            (json.dumps(ids),),
        )
        for row in rows:
            out[row[1]].append(_job_from_row(row))
        return out

    # --- events -----------------------------------------------------------------------------

    def add_event(self, run_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        with self._write() as c:
            c.execute(
                "INSERT INTO events (run_id, ts, kind, data) VALUES (?, ?, ?, ?)",
                (run_id, time.time(), kind, json.dumps(data or {}, sort_keys=True, default=str)),
            )

    def events(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT ts, kind, data FROM events WHERE run_id = ? ORDER BY id", (run_id,))
        return [{"ts": ts, "kind": kind, "data": json.loads(data)} for ts, kind, data in rows]


def _in(values: Iterable[str]) -> str:
    """A literal SQL list of fixed, trusted constants (the state names above)."""
    return ",".join(f"'{v}'" for v in sorted(values))
