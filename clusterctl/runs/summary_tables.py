"""The registry's summaries and status_rows tables (schema 3): what reports and `status --all` read
instead of every run directory (runs.summaries says what a summary is and when it is settled).

`SummaryTables` holds their queries and is part of runs.registry.Registry, whose connection, write
transaction and `has_summaries` (the file is at schema 3 or later) it uses. Reads filter and group in
SQL (`settled_totals`, `settled_runs`), so a report over 10,000 settled runs decodes no JSON and makes
no record; `put_summaries` stores a summary only if the rows it was computed from are still those.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from clusterctl.runs.dbfile import JOB_COLS, RUN_COLS, guarded, sql_list
from clusterctl.specs import FAILURE_STATES, RunRecord


def plan_sweep(field: str, table: str = "") -> str:
    """SQL for plan["sweep"][field] of a run row (runs.sweep); NULL where the plan is not JSON."""
    p = f"{table}plan"
    return f"CASE WHEN json_valid({p}) THEN json_extract({p}, '$.sweep.{field}') END"


class SummaryTables:
    """The summaries' queries of runs.registry.Registry (its base: they share one connection)."""

    path: Path
    readonly: bool
    has_summaries: bool  # False for a read-only registry of schema 2: summaries are computed, not stored
    _conn: sqlite3.Connection

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # Registry's write transaction

    @staticmethod
    def _filters(**given: Any) -> tuple[str, list[Any]]:
        """A WHERE clause over `runs r` for the filters given (None: not filtered)."""
        ops = {"run_id": "r.run_id =", "profile": "r.profile =", "user": "r.user =", "since": "r.created_at >=",
               "until": "r.created_at <", "sweep": f"{plan_sweep('id', 'r.')} ="}  # fmt: skip
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

    @guarded
    def index(
        self,
        run_id: str | None = None,
        profile: str | None = None,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
        sweep: str | None = None,
        stale_only: bool = False,
        status_rows: bool = False,
    ) -> list[tuple[RunRecord, Any]]:
        """Runs matching every filter given (in SQL: submitted in [since, until)), newest first, each
        with its stored summary (runs.summaries.Summary) or None; `stale_only`: only those without a
        settled summary (`status_rows`: or without its status row of this format). A run whose
        summary is settled comes without its config and plan ({}: a long history's JSON is never
        decoded), unless it failed and its plan allows retries."""
        from clusterctl.runs.summaries import COLUMNS, from_row

        where, args = self._filters(run_id=run_id, profile=profile, user=user, since=since, until=until, sweep=sweep)
        light = [f"r.{c}" for c in RUN_COLS if c not in ("config", "plan")]
        if self.has_summaries:
            settled = _settled(status_rows)
            keep = f"NOT ({settled}) OR (r.state IN ({sql_list(FAILURE_STATES)}) AND s.max_retries > 0)"
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
        n = len(RUN_COLS)
        loads = json.loads
        out = []
        for row in rows:
            run = RunRecord(*row[: n - 2])
            if row[n - 2] is not None:
                run.config, run.plan = loads(row[n - 2]), loads(row[n - 1])
            out.append((run, from_row(row[n:]) if row[n] is not None else None))
        return out

    @guarded
    def settled_totals(
        self,
        by: str,
        run_id: str | None = None,
        profile: str | None = None,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
        sweep: str | None = None,
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
        where, args = self._filters(run_id=run_id, profile=profile, user=user, since=since, until=until, sweep=sweep)
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

    @guarded
    def settled_runs(
        self,
        run_id: str | None = None,
        profile: str | None = None,
        user: str | None = None,
        since: float | None = None,
        until: float | None = None,
        sweep: str | None = None,
    ) -> list[tuple]:
        """Report figures of each run with a settled summary (`report --by run`), by run id: (run_id,
        gpu_hours, gpu_hours_source, energy_kwh, co2_kg, pue, estimated_kwh, estimated_co2_kg,
        measured, requeues, resumes), what usage.run_rows makes rows of. A group of one run needs
        none of settled_totals' counts: 11 columns instead of 16, a third less to fetch. [] without
        stored summaries."""
        if not self.has_summaries:
            return []
        where, args = self._filters(run_id=run_id, profile=profile, user=user, since=since, until=until, sweep=sweep)
        # the filters are on runs; without any, the summaries alone (every summary has its run: a
        # trigger deletes it with the run) and no lookup of 10,000 runs
        source = "runs r JOIN summaries s ON s.run_id = r.run_id" if where else "summaries s"
        where = f"{where} AND {_settled()}" if where else f"WHERE {_settled()}"
        return self._conn.execute(
            "SELECT s.run_id, s.gpu_hours, s.gpu_hours_source, s.energy_kwh, s.co2_kg, s.pue, s.estimated_kwh, "
            f"s.estimated_co2_kg, s.energy_files > 0, s.requeues, s.resumes FROM {source} {where} ORDER BY s.run_id",
            args,
        ).fetchall()

    @guarded
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
            f"SELECT r.run_id {join} WHERE {_settled(True)} AND r.state IN ({sql_list(FAILURE_STATES)}) AND s.max_retries > 0"
        ).fetchall()
        return rows, [r[0] for r in retry]

    @guarded
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
                f"SELECT {','.join(JOB_COLS)} FROM jobs WHERE run_id IN (SELECT value FROM json_each(?)) "
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


def _settled(status_rows: bool = False) -> str:
    """SQL: the summary `s` is settled (runs.summaries); `status_rows`: and the status row `j` is
    there, of this clusterctl's format."""
    if not status_rows:
        return "s.settled = 1"
    from clusterctl.runs.summaries import STATUS_FORMAT

    return f"s.settled = 1 AND j.format IS {int(STATUS_FORMAT)}"
