"""The run registry: one SQLite file of runs, their Slurm jobs (every attempt) and events.

Why SQLite: many short-lived CLI processes (submit, status, a watcher, a trainer's requeue hook)
read and write at once. WAL lets readers run beside a writer; every write is one transaction opened
with BEGIN IMMEDIATE, so two writers queue on the busy timeout instead of failing half-way, and a
transaction is atomic (the SQLite equivalent of "temp name + rename"). The schema is versioned with
`PRAGMA user_version`; `_MIGRATIONS` brings any older file up to date inside one transaction.
Reads are one query per table, so `clusterctl status` stays fast with 10,000 runs.

What goes wrong with a file is one line naming it and what to do (`UserError`; a lock held too long
is `ServiceUnavailable`), never a traceback: a file that is not a database, truncated or with a
damaged page, or that cannot be opened or written. A registry whose file or directory is not
writable (or that is immutable) is opened read-only: `status` and reports read it, and say that what
they learnt from Slurm was not saved. New files are created 0600. `check` runs SQLite's own
integrity check; `rebuild` makes a new registry from the run directories (and whatever rows of the
old file can still be read), then swaps it in atomically, keeping the old file as a backup.
JSON columns are strict JSON: NaN and Infinity are stored as null (runs.artifacts.dumps_strict).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote

from clusterctl.runs.artifacts import dumps_strict
from clusterctl.specs import ACTIVE_STATES, FAILURE_STATES, FINAL_STATES, JOB_KINDS, JobRecord, RunRecord, RunState
from vltrain.common.errors import ServiceUnavailable, UserError

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


def shown(text: str) -> str:
    """A user's string quoted for a one-line message: control characters and bidi overrides
    escaped (repr), bytes that are not UTF-8 (a surrogate-escaped argv or path) as \\xNN."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return repr(os.fsencode(text))[1:]
    return repr(text)


DAMAGED_HINT = (
    "allowed: `clusterctl registry check` lists the damage; `clusterctl registry rebuild` rebuilds it from "
    "the run directories and keeps this file as a backup"
)


def db_error(path: Path, e: sqlite3.Error) -> Exception:
    """The one-line error for an SQLite failure on the registry at `path` (what it means, what to do)."""
    name = getattr(e, "sqlite_errorname", "") or ""
    where = f"registry {shown(str(path))}"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in str(e) or "not a database" in str(e):
        return UserError(f"{where}: the file is damaged ({e}); {DAMAGED_HINT}")
    if name.startswith("SQLITE_READONLY"):
        return UserError(
            f"{where}: cannot be written ({e}); allowed: make the file and its directory writable, or set "
            "CLUSTERCTL_REGISTRY to a writable file (status and report can read a read-only registry)"
        )
    if name.startswith("SQLITE_CANTOPEN"):
        return UserError(
            f"{where}: cannot be opened ({e}); allowed: a readable file in an existing directory (CLUSTERCTL_REGISTRY)"
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return ServiceUnavailable(
            f"{where}: locked by another clusterctl process for over {BUSY_TIMEOUT_MS // 1000} s",
            hint="allowed: retry when it is done",
        )
    if name.startswith("SQLITE_FULL"):
        return UserError(f"{where}: the disk is full ({e}); allowed: free space on its filesystem, then retry")
    if name.startswith("SQLITE_IOERR"):
        return UserError(
            f"{where}: input/output error ({e}); allowed: check the disk and the file (it may have been deleted "
            "or moved while in use), then `clusterctl registry check`"
        )
    if name.startswith(("SQLITE_PERM", "SQLITE_AUTH")):
        return UserError(f"{where}: permission denied ({e}); allowed: a file this user may read")
    return UserError(f"{where}: {e}; {DAMAGED_HINT}")


def _guarded(method):
    """Registry methods turn SQLite's failures into one-line errors (db_error). Misuse of the
    sqlite3 API or a broken constraint (ProgrammingError, InterfaceError, IntegrityError) is a bug
    and stays a traceback."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError, sqlite3.IntegrityError):
            raise  # the caller broke a rule of the schema or the API: a bug, not the file
        except sqlite3.Error as e:
            raise db_error(self.path, e) from None
        except json.JSONDecodeError as e:  # a JSON column clusterctl wrote no longer parses: damage
            raise UserError(
                f"registry {shown(str(self.path))}: the file is damaged (a JSON column: {e}); {DAMAGED_HINT}"
            ) from None

    return wrapper


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


def create_private(path: Path) -> None:
    """Create `path` empty with mode 0600 (an empty file is a new SQLite database), its directory
    0700; nothing happens when it exists already (another process won the race)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
    finally:
        os.close(fd)


def writable(path: Path) -> bool:
    """Can this process write the registry file and create files beside it (WAL, shm)? False
    for a read-only file, directory or filesystem, and for an immutable file (even as root)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)


def connect(path: Path) -> sqlite3.Connection:
    """Open `path` read-write in autocommit mode with WAL and a busy timeout (transactions are
    explicit); a new file is created 0600."""
    if not path.exists():
        create_private(path)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")  # persistent in the file: set once
    conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable enough, never corrupt
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def connect_readonly(path: Path, immutable: bool = False) -> sqlite3.Connection:
    """Open `path` read-only. A WAL file needs its -shm index: where that cannot be made (a read-only
    directory) `immutable=True` reads the file as it is (nothing can be writing it then)."""
    uri = f"file:{quote(str(path.absolute()))}?mode=ro" + ("&immutable=1" if immutable else "")
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


class Registry:
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
            self.has_summaries = version >= 3
            if version != SCHEMA_VERSION and version != 2:  # 2: readable, summaries computed, not kept
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
        self._conn = connect(p)
        migrate(self._conn)
        self.has_summaries = True

    def close(self) -> None:
        self._conn.close()

    @_guarded
    def quick_check(self) -> list[str]:
        """SQLite's quick_check over every page (a few ms for 10,000 runs): the problems found, []
        when none. A damaged page raises inside SQLite; that is a problem too."""
        return _check(self._conn, "quick_check")

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

    @_guarded
    def new_run_id(self, name: str) -> str:
        """`<name>-YYYYMMDD-HHMMSS-<4 hex>`: sortable by time, readable, unique in practice."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        while True:
            run_id = f"{name}-{stamp}-{os.urandom(2).hex()}"
            if self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                return run_id

    @_guarded
    def add_run(self, run: RunRecord) -> None:
        values = [getattr(run, c) for c in _RUN_COLS]
        values[_RUN_COLS.index("config")] = dumps_strict(run.config, sort_keys=True, default=str)
        values[_RUN_COLS.index("plan")] = dumps_strict(run.plan, sort_keys=True, default=str)
        with self._write() as c:
            try:
                c.execute(f"INSERT INTO runs ({','.join(_RUN_COLS)}) VALUES ({','.join('?' * len(_RUN_COLS))})", values)
            except sqlite3.IntegrityError:
                raise UserError(
                    f"registry: run id {run.run_id!r} exists already; allowed: a new id (Registry.new_run_id)"
                ) from None

    def set_run_state(self, run_id: str, state: str) -> None:
        self.set_run_states({run_id: state})

    @_guarded
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

    @_guarded
    def claim_run(self, run_id: str, from_state: str, to_state: str) -> bool:
        """Move a run from one state to another only if it is still in the first; True if this call did.
        Lets one of many concurrent CLI processes, and only one, act on a state (e.g. retry a failure)."""
        with self._write() as c:
            cur = c.execute("UPDATE runs SET state = ? WHERE run_id = ? AND state = ?", (to_state, run_id, from_state))
            return cur.rowcount == 1

    @_guarded
    def delete_run(self, run_id: str) -> None:
        """Remove a run that never got submitted (submit's clean-up after a failure)."""
        with self._write() as c:
            c.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
            c.execute("DELETE FROM jobs WHERE run_id = ?", (run_id,))
            c.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    @_guarded
    def get_run(self, ref: str) -> RunRecord:
        """A run by id, by name (the newest of that name) or by a unique id prefix."""
        try:
            ref.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(
                f"RUN: {shown(ref)} is not UTF-8 text, so no run has it; allowed: a run id, a unique id prefix "
                "or a run name (clusterctl status --all lists them)"
            ) from None
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
                f"RUN: no run matches {shown(ref)}; allowed: a run id, a unique id prefix or a run name "
                "(clusterctl status --all lists them)"
            )
        names = ", ".join(h[0] for h in hits[:3]) + (", ..." if len(hits) > 3 else "")
        raise UserError(
            f"RUN: {shown(ref)} matches several runs ({names}); allowed: a longer prefix or the full run id"
        )

    @_guarded
    def list_runs(self, include_finished: bool = True, limit: int | None = None) -> list[RunRecord]:
        """Runs, newest first; without `include_finished` only those in an active state."""
        where = "" if include_finished else f"WHERE state IN ({_in(ACTIVE_STATES)})"
        lim = "" if limit is None else f"LIMIT {int(limit)}"
        rows = self._conn.execute(
            f"SELECT {','.join(_RUN_COLS)} FROM runs {where} ORDER BY created_at DESC {lim}"
        ).fetchall()
        return [_run_from_row(r) for r in rows]

    @_guarded
    def active_and_recent(self, finished: int = 5) -> list[RunRecord]:
        """Every active run plus the `finished` newest finished ones, newest first, in one query."""
        active = _in(ACTIVE_STATES)
        rows = self._conn.execute(
            f"SELECT {','.join(_RUN_COLS)} FROM runs WHERE state IN ({active}) OR run_id IN "
            f"(SELECT run_id FROM runs WHERE state NOT IN ({active}) ORDER BY created_at DESC LIMIT ?) "
            "ORDER BY created_at DESC",
            (int(finished),),
        ).fetchall()
        return [_run_from_row(r) for r in rows]

    @_guarded
    def count_runs(self) -> int:
        return self._conn.execute("SELECT count(*) FROM runs").fetchone()[0]

    @_guarded
    def runs_by_ids(self, run_ids: Iterable[str]) -> dict[str, RunRecord]:
        """Whole run records (config and plan decoded) of these ids, in one query."""
        rows = self._conn.execute(
            f"SELECT {','.join(_RUN_COLS)} FROM runs WHERE run_id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(run_ids)),),
        ).fetchall()
        return {r[0]: _run_from_row(r) for r in rows}

    # --- summaries (runs.summaries) ---------------------------------------------------------

    @staticmethod
    def _filters(**given: Any) -> tuple[str, list[Any]]:
        """A WHERE clause over `runs r` for the filters given (None: not filtered)."""
        ops = {"run_id": "r.run_id =", "profile": "r.profile =", "user": "r.user =", "since": "r.created_at >=",
               "until": "r.created_at <"}  # fmt: skip
        conds = [(f"{ops[k]} ?", v) for k, v in given.items() if v is not None]
        return (f"WHERE {' AND '.join(c for c, _ in conds)}" if conds else "", [v for _, v in conds])

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one state of the file (one read transaction)."""
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    @_guarded
    def index(
        self,
        run_id: str | None = None,
        profile: str | None = None,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
        stale_only: bool = False,
        status_rows: bool = False,
    ) -> list[tuple[RunRecord, Any]]:
        """Runs matching every filter given (in SQL: submitted in [since, until)), newest first, each
        with its stored summary (runs.summaries.Summary) or None; `stale_only`: only those without a
        settled summary (`status_rows`: or without its status row of this format). A run whose
        summary is settled comes without its config and plan ({}: a long history's JSON is never
        decoded), unless it failed and its plan allows retries."""
        from clusterctl.runs.summaries import COLUMNS, from_row

        where, args = self._filters(run_id=run_id, profile=profile, user=user, since=since, until=until)
        light = [f"r.{c}" for c in _RUN_COLS if c not in ("config", "plan")]
        if self.has_summaries:
            settled = _settled(status_rows)
            keep = f"NOT ({settled}) OR (r.state IN ({_in(FAILURE_STATES)}) AND s.max_retries > 0)"
            cols = [*light, f"iif({keep}, r.config, NULL)", f"iif({keep}, r.plan, NULL)"]
            cols += [f"s.{c}" for c in COLUMNS]
            join = "LEFT JOIN summaries s ON s.run_id = r.run_id"
            if status_rows:
                join += " LEFT JOIN status_rows j ON j.run_id = r.run_id"
            if stale_only:
                stale = f"(s.run_id IS NULL OR NOT ({settled}))"
                where = f"{where} AND {stale}" if where else f"WHERE {stale}"
        else:  # a read-only registry of schema 2: summaries are computed, not stored
            cols, join = [*light, "r.config", "r.plan", *(["NULL"] * len(COLUMNS))], ""
        rows = self._conn.execute(
            f"SELECT {','.join(cols)} FROM runs r {join} {where} ORDER BY r.created_at DESC", args
        ).fetchall()
        n = len(_RUN_COLS)
        loads = json.loads
        out = []
        for row in rows:
            run = RunRecord(*row[: n - 2])
            if row[n - 2] is not None:
                run.config, run.plan = loads(row[n - 2]), loads(row[n - 1])
            out.append((run, from_row(row[n:]) if row[n] is not None else None))
        return out

    @_guarded
    def settled_totals(
        self,
        by: str,
        run_id: str | None = None,
        profile: str | None = None,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[tuple]:
        """Report totals of the runs with a settled summary, grouped in SQL by `by` (usage.BY): one
        row per group, (key, *what usage.Totals.add_sql takes). [] without stored summaries."""
        if not self.has_summaries:
            return []
        key = {
            "run": "r.run_id",
            "profile": "r.profile",
            "user": "r.user",
            "day": "strftime('%Y-%m-%d', CAST(r.created_at AS INTEGER), 'unixepoch')",  # whole seconds: as
            "month": "strftime('%Y-%m', CAST(r.created_at AS INTEGER), 'unixepoch')",  # Python's day
        }[by]
        where, args = self._filters(run_id=run_id, profile=profile, user=user, since=since, until=until)
        where = f"{where} AND {_settled()}" if where else f"WHERE {_settled()}"  # status rows not needed
        if by == "run":  # a group per run: its own figures, no GROUP BY
            return self._conn.execute(
                "SELECT r.run_id, 1, s.gpu_hours, s.gpu_hours_source, s.energy_kwh, s.co2_kg, s.estimated_kwh, "
                "s.estimated_kwh IS NOT NULL, s.estimated_co2_kg, s.estimated_co2_kg IS NOT NULL, s.pue, s.pue, "
                "s.pue IS NOT NULL, s.energy_files > 0, s.requeues, s.resumes "
                f"FROM runs r JOIN summaries s ON s.run_id = r.run_id {where}",
                args,
            ).fetchall()
        return self._conn.execute(
            f"SELECT {key} AS k, count(*), sum(s.gpu_hours), group_concat(DISTINCT s.gpu_hours_source), "
            "sum(s.energy_kwh), sum(s.co2_kg), sum(s.estimated_kwh), count(s.estimated_kwh), "
            "sum(s.estimated_co2_kg), count(s.estimated_co2_kg), min(s.pue), max(s.pue), count(DISTINCT s.pue), "
            "max(s.energy_files > 0), sum(s.requeues), sum(s.resumes) "
            f"FROM runs r JOIN summaries s ON s.run_id = r.run_id {where} GROUP BY k",
            args,
        ).fetchall()

    @_guarded
    def settled_runs(
        self,
        run_id: str | None = None,
        profile: str | None = None,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[tuple]:
        """Report figures of each run with a settled summary (`report --by run`), by run id: (run_id,
        gpu_hours, gpu_hours_source, energy_kwh, co2_kg, pue, estimated_kwh, estimated_co2_kg,
        measured, requeues, resumes), what usage.run_rows makes rows of. A group of one run needs
        none of settled_totals' counts: 11 columns instead of 16, a third less to fetch. [] without
        stored summaries."""
        if not self.has_summaries:
            return []
        where, args = self._filters(run_id=run_id, profile=profile, user=user, since=since, until=until)
        # the filters are on runs; without any, the summaries alone (every summary has its run: a
        # trigger deletes it with the run) and no lookup of 10,000 runs
        source = "runs r JOIN summaries s ON s.run_id = r.run_id" if where else "summaries s"
        where = f"{where} AND {_settled()}" if where else f"WHERE {_settled()}"
        return self._conn.execute(
            "SELECT s.run_id, s.gpu_hours, s.gpu_hours_source, s.energy_kwh, s.co2_kg, s.pue, s.estimated_kwh, "
            f"s.estimated_co2_kg, s.energy_files > 0, s.requeues, s.resumes FROM {source} {where} ORDER BY s.run_id",
            args,
        ).fetchall()

    @_guarded
    def settled_status(self) -> tuple[list[tuple[float, str]], list[str]]:
        """(created_at, `status --json` row as JSON text) of every run with a settled summary, newest
        first (no JSON decoded, no record made); and the ids of those that failed with retries allowed
        by their plan (status retries them: lifecycle.reconcile)."""
        if not self.has_summaries:
            return [], []
        join = "FROM runs r JOIN summaries s ON s.run_id = r.run_id JOIN status_rows j ON j.run_id = r.run_id"
        rows = self._conn.execute(
            f"SELECT r.created_at, j.json {join} WHERE {_settled(True)} ORDER BY r.created_at DESC"
        ).fetchall()
        retry = self._conn.execute(
            f"SELECT r.run_id {join} WHERE {_settled(True)} AND r.state IN ({_in(FAILURE_STATES)}) AND s.max_retries > 0"
        ).fetchall()
        return rows, [r[0] for r in retry]

    @_guarded
    def put_summaries(self, items: Iterable[tuple[Any, tuple]]) -> int:
        """Store summaries, each with the signature it was computed from ((run state, [job rows as
        tuples of JobRecord's fields])): one is stored only if its run's rows are still that (a
        newer write in between would otherwise be hidden behind an older summary). Returns how many."""
        from clusterctl.runs.summaries import COLUMNS, to_row

        items = list(items)
        if not items or not self.has_summaries:
            return 0
        ids = json.dumps([s.run_id for s, _ in items])
        with self._write() as c:
            now: dict[str, tuple] = {
                r: (state, [])
                for r, state in c.execute(
                    "SELECT run_id, state FROM runs WHERE run_id IN (SELECT value FROM json_each(?))", (ids,)
                )
            }
            for row in c.execute(
                f"SELECT {','.join(_JOB_COLS)} FROM jobs WHERE run_id IN (SELECT value FROM json_each(?)) "
                "ORDER BY run_id, attempt",
                (ids,),
            ):
                now[row[1]][1].append(tuple(row))
            keep = [s for s, sig in items if now.get(s.run_id) == (sig[0], list(sig[1]))]
            c.executemany(
                f"INSERT OR REPLACE INTO summaries ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})",
                [to_row(s) for s in keep],
            )
            c.executemany(
                "INSERT OR REPLACE INTO status_rows (run_id, format, json) VALUES (?, ?, ?)",
                [(s.run_id, s.status_format, s.status_json) for s in keep if s.status_json is not None],
            )
        return len(keep)

    @_guarded
    def insert_runs(self, items: Iterable[tuple[RunRecord, list[JobRecord]]]) -> None:
        """Many runs with their jobs in one transaction, as they are (tests, benchmarks, imports)."""
        run_sql = f"INSERT INTO runs ({','.join(_RUN_COLS)}) VALUES ({','.join('?' * len(_RUN_COLS))})"
        job_sql = f"INSERT INTO jobs ({','.join(_JOB_COLS)}) VALUES ({','.join('?' * len(_JOB_COLS))})"
        ci, pi = _RUN_COLS.index("config"), _RUN_COLS.index("plan")
        with self._write() as c:
            for run, jobs in items:
                values = [getattr(run, k) for k in _RUN_COLS]
                values[ci] = dumps_strict(run.config, sort_keys=True, default=str)
                values[pi] = dumps_strict(run.plan, sort_keys=True, default=str)
                c.execute(run_sql, values)
                c.executemany(job_sql, [[getattr(j, k) for k in _JOB_COLS] for j in jobs])

    # --- jobs -------------------------------------------------------------------------------

    @_guarded
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

    @_guarded
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

    @_guarded
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
        ).fetchall()
        for row in rows:
            out[row[1]].append(_job_from_row(row))
        return out

    # --- events -----------------------------------------------------------------------------

    @_guarded
    def add_event(self, run_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
        with self._write() as c:
            c.execute(
                "INSERT INTO events (run_id, ts, kind, data) VALUES (?, ?, ?, ?)",
                (run_id, time.time(), kind, dumps_strict(data or {}, sort_keys=True, default=str)),
            )

    @_guarded
    def events(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT ts, kind, data FROM events WHERE run_id = ? ORDER BY id", (run_id,)
        ).fetchall()
        return [{"ts": ts, "kind": kind, "data": json.loads(data)} for ts, kind, data in rows]


def _settled(status_rows: bool = False) -> str:
    """SQL: the summary `s` is settled (runs.summaries); `status_rows`: and the status row `j` is
    there, of this clusterctl's format."""
    if not status_rows:
        return "s.settled = 1"
    from clusterctl.runs.summaries import STATUS_FORMAT

    return f"s.settled = 1 AND j.format IS {int(STATUS_FORMAT)}"


def _in(values: Iterable[str]) -> str:
    """A literal SQL list of fixed, trusted constants (the state names above)."""
    return ",".join(f"'{v}'" for v in sorted(values))


# --- check and rebuild ----------------------------------------------------------------------------


def _check(conn: sqlite3.Connection, pragma: str) -> list[str]:
    """Problems SQLite's `integrity_check` / `quick_check` finds ([] when it says ok); a page so
    damaged that the check itself stops is a problem too."""
    try:
        rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}").fetchall()]
    except sqlite3.DatabaseError as e:
        return [str(e)]
    return [] if rows == ["ok"] else [str(r) for r in rows]


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
        out["problems"] += _check(conn, "integrity_check")
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
    finally:
        conn.close()
    return out


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
        for row in _rows(conn, "runs", ",".join(_RUN_COLS), out.lost):
            try:
                run = _run_from_row(row)
            except (ValueError, TypeError):
                out.lost.append(f"runs: row {row[0]!r} unreadable")
                continue
            out.runs[run.run_id] = run
        try:
            jobs = _rows(conn, "jobs", ",".join(_JOB_COLS), out.lost)
        except sqlite3.DatabaseError:
            jobs = []
        for row in jobs:
            try:
                job = _job_from_row(row)
            except TypeError:
                continue
            out.jobs.setdefault(job.run_id, []).append(job)
        for row in _rows(conn, "events", "run_id, ts, kind, data", out.lost):
            out.events.setdefault(row[0], []).append((row[1], row[2], row[3]))
    finally:
        conn.close()
    return out


_STAMPED = re.compile(r"^(?P<name>.+)-(?P<stamp>\d{8}-\d{6})-[0-9a-f]{4}$")


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


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
    import tomllib

    from clusterctl.backends import results
    from vltrain.rundir import RunDir

    rd = RunDir(run_dir)
    run_id = run_id or rd.root.name
    plan = _json_file(rd.plan)
    profile = _json_file(rd.profile)
    if not isinstance(plan, dict) or not isinstance(profile, dict):
        raise ValueError("no readable plan.json and profile.json: not a run directory of clusterctl")
    try:
        config = tomllib.loads(rd.config.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        config = {}
    launch = _json_file(rd.launch)
    launch = launch if isinstance(launch, dict) else {}
    nodes = profile.get("nodes") if isinstance(profile.get("nodes"), dict) else {}
    derived = profile.get("derived") if isinstance(profile.get("derived"), dict) else {}
    gpus = derived.get("world_size") or (nodes.get("count") or 1) * (nodes.get("gpus_per_node") or 1)
    m = _STAMPED.match(run_id)
    name = launch.get("job_name") or (m.group("name") if m else run_id)
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
    executor = str(launch.get("executor") or profile.get("executor") or "slurm")
    total = config.get("steps", plan.get("steps", 0))
    jobs: list[JobRecord] = []
    for n, (job_id, submitted) in enumerate(_job_dirs(rd.root), start=1):
        job = JobRecord(job_id, run_id, n, "submit" if n == 1 else "resume", submitted, RunState.UNKNOWN)
        outcome, ended = results.submitit_outcome(str(rd.root), job_id)
        if n > 1 and jobs[-1].state in (RunState.FAILED, RunState.NODE_FAIL):
            job.kind = "retry"  # a job after a failed one: clusterctl resubmitted it (or the user did)
        if executor == "local":  # no scheduler remembers a local job: the files are all there is
            from clusterctl.backends.local import pid_alive

            if outcome is None and not pid_alive(job_id):
                outcome = RunState.FAILED
                try:
                    ended = max(p.stat().st_mtime for p in (rd.submitit / job_id).iterdir())
                except (OSError, ValueError):
                    ended = submitted
            if outcome is not None:
                job.state, job.started_at, job.ended_at = outcome, submitted, ended
                job.elapsed_s, job.alloc_gpus = max(0.0, (ended or submitted) - submitted), int(gpus)
        elif outcome == RunState.FAILED:
            job.state = outcome  # Slurm's accounting may still add times; status asks
        jobs.append(job)
    states = [j.state for j in jobs]
    state = states[-1] if states and all(s in FINAL_STATES for s in states) else RunState.UNKNOWN
    run = RunRecord(
        run_id=run_id,
        name=str(name),
        profile=str(profile.get("name") or "?"),
        executor=executor,
        run_dir=str(rd.root),
        created_at=float(created),
        user=user,
        gpus=int(gpus),
        total_steps=int(total) if isinstance(total, int) else 0,
        state=state,
        config=config,
        plan=plan,
    )
    return run, jobs


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


def find_run_dirs(roots: Iterable[Path]) -> list[Path]:
    """Run directories under `roots` (each a directory of run directories, or one itself): those
    with a plan.json."""
    from vltrain.rundir import RunDir

    out = []
    for root in roots:
        root = Path(root)
        if RunDir(root).plan.is_file():
            out.append(root)
            continue
        try:
            out += sorted(d for d in root.iterdir() if d.is_dir() and RunDir(d).plan.is_file())
        except OSError:
            continue
    return out


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
    old = salvage(path)
    dirs: dict[str, Path] = {}
    skipped = []
    for run in old.runs.values():
        if Path(run.run_dir).is_dir():
            dirs[run.run_id] = Path(run.run_dir)
    for d in find_run_dirs(roots):
        dirs.setdefault(d.name, d)
    runs: dict[str, tuple[RunRecord, list[JobRecord]]] = {}
    from_dirs, from_old = [], []
    for run_id, d in sorted(dirs.items()):
        try:
            run, jobs = run_from_dir(d, run_id)
        except (ValueError, OSError) as e:
            skipped.append(f"{d}: {e}")
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
            values = [getattr(run, c) for c in _RUN_COLS]
            values[_RUN_COLS.index("config")] = dumps_strict(run.config, sort_keys=True, default=str)
            values[_RUN_COLS.index("plan")] = dumps_strict(run.plan, sort_keys=True, default=str)
            conn.execute(f"INSERT INTO runs ({','.join(_RUN_COLS)}) VALUES ({','.join('?' * len(_RUN_COLS))})", values)
            for j in jobs:
                conn.execute(
                    f"INSERT INTO jobs ({','.join(_JOB_COLS)}) VALUES ({','.join('?' * len(_JOB_COLS))})",
                    [getattr(j, k) for k in _JOB_COLS],
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
