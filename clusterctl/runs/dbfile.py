"""The registry's SQLite file: where it is, how it is opened, what goes wrong with it, its rows as records.

A file is opened read-write in autocommit mode with WAL and a busy timeout (transactions are explicit:
runs.registry), created 0600 in a 0700 directory; read-only where it or its directory cannot be
written (with immutable=1 where not even WAL's -shm index can be made). SQLite's failures become one
line naming the file and what to do (`db_error`: a `UserError`, or `ServiceUnavailable` for a lock held
too long), never a traceback. Shared by the store (runs.registry, runs.summary_tables) and the repair
kit (runs.repair).
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import quote

from clusterctl.specs import JobRecord, RunRecord
from vltrain.common.errors import ServiceUnavailable, UserError

BUSY_TIMEOUT_MS = 30_000

# The columns of the runs and jobs tables: the fields of the records, in their order.
RUN_COLS = tuple(f.name for f in fields(RunRecord))
JOB_COLS = tuple(f.name for f in fields(JobRecord))


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


class OnFile(Protocol):
    """What `guarded` needs of the object whose methods it wraps: the file's path."""

    path: Path


_S = TypeVar("_S", bound=OnFile)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def guarded(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Registry methods turn SQLite's failures into one-line errors (db_error). Misuse of the
    sqlite3 API or a broken constraint (ProgrammingError, InterfaceError, IntegrityError) is a bug
    and stays a traceback."""

    @functools.wraps(method)
    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
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
        except BadColumn as e:
            raise UserError(f"registry {shown(str(self.path))}: the file is damaged ({e}); {DAMAGED_HINT}") from None
        except RecursionError:  # nested deeper than json can parse: clusterctl never writes one
            raise UserError(
                f"registry {shown(str(self.path))}: the file is damaged (a JSON column nested too deep); {DAMAGED_HINT}"
            ) from None

    return wrapper


class BadColumn(ValueError):
    """A JSON column that parses but is not what clusterctl writes there (an object)."""


def run_from_row(row: Sequence[Any]) -> RunRecord:
    d = dict(zip(RUN_COLS, row))
    for k in ("config", "plan"):
        d[k] = json.loads(d[k])
        if not isinstance(d[k], dict):
            raise BadColumn(f"runs.{k} of {shown(str(d['run_id']))} is not a JSON object")
    return RunRecord(**d)


def job_from_row(row: Iterable[Any]) -> JobRecord:
    return JobRecord(**dict(zip(JOB_COLS, row)))


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


def connect(path: Path, known: int | None = None) -> sqlite3.Connection:
    """Open `path` read-write in autocommit mode with WAL and a busy timeout (transactions are
    explicit); a new file is created 0600. With `known` (the schema version this clusterctl writes),
    a file that is not a clusterctl registry is refused (schema_problem) before anything is written
    to it, not even WAL's journal mode."""
    if not path.exists():
        create_private(path)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if known is not None and (problem := schema_problem(conn, known)):
        conn.close()
        raise UserError(f"registry {shown(str(path))}: {problem}; {FOREIGN_HINT}")
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


def integrity_problems(conn: sqlite3.Connection, pragma: str) -> list[str]:
    """Problems SQLite's `integrity_check` / `quick_check` finds ([] when it says ok); a page so
    damaged that the check itself stops is a problem too."""
    try:
        rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}").fetchall()]
    except sqlite3.DatabaseError as e:
        return [str(e)]
    return [] if rows == ["ok"] else [str(r) for r in rows]


# The tables clusterctl's migrations make (runs.registry._MIGRATIONS), by the schema version that adds them.
OWN_TABLES = {1: ("runs", "jobs", "events"), 3: ("summaries", "status_rows"), 4: ("notifications",)}


def schema_problem(conn: sqlite3.Connection, known: int) -> str | None:
    """Why the file is not clusterctl's registry (another application's SQLite file), or None when it is
    one, or empty (a new file): every table must be one of clusterctl's, and those its version implies
    must be there. Checked before any migration, so no table is ever added to someone else's file. A
    version above `known` (a newer clusterctl's file) is the version check's to refuse."""
    own_txn = not conn.in_transaction  # one snapshot: another process may be migrating a new file
    if own_txn:
        conn.execute("BEGIN")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        if own_txn:
            conn.execute("COMMIT")
    if version > known:
        return None
    names = {n for n in names if not n.startswith("sqlite_")}
    own = {t for tables in OWN_TABLES.values() for t in tables}
    foreign = sorted(names - own)
    if foreign:
        listed = ", ".join(shown(n) for n in foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        return f"holds tables that are not clusterctl's ({listed}): another application's database"
    if version < 0 or (not names and version > 0):
        return f"schema version {version} with no clusterctl table: not a clusterctl registry"
    missing = sorted(t for v, tables in OWN_TABLES.items() if v <= version for t in tables if t not in names)
    if names and (version == 0 or missing):
        what = "no schema version" if version == 0 else f"schema version {version} without table {missing[0]}"
        return f"has clusterctl's table names but {what}: not a registry this clusterctl wrote"
    return None


FOREIGN_HINT = "allowed: point CLUSTERCTL_REGISTRY at a clusterctl registry, or at a new or empty file"


def sql_list(values: Iterable[str]) -> str:
    """A literal SQL list of fixed, trusted constants (run-state names of clusterctl.specs)."""
    return ",".join(f"'{v}'" for v in sorted(values))
