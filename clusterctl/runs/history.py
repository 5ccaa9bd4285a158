"""Every run of a long history, from the registry's per-run summaries (runs.summaries): the runs
that may still change are refreshed from their backends (status's refresh) and summarised again, the
settled ones are read as the registry keeps them. Reports (`clusterctl report`) and `status --all`
go through here; `status` of a few runs and `watch` read the run directories directly (status.collect).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from clusterctl.runs.registry import Registry
from clusterctl.runs.status import RunStatus, from_summary, refresh, with_skipped
from clusterctl.runs.summaries import STATUS_FORMAT, Summary, compute
from clusterctl.specs import FAILURE_STATES, JobRecord, RunRecord


@dataclass
class Current:
    """Runs with an up-to-date summary each, and what the refresh said."""

    rows: list[tuple[RunRecord, Summary]]
    source: str = "registry"
    notes: list[str] = field(default_factory=list)
    computed: int = 0  # summaries computed in this call (the rest were stored and settled)
    waiting: dict[str, dict] = field(default_factory=dict)  # why a run's job waits to start (status.Refresh)
    excluded: dict[str, list[str]] = field(default_factory=dict)  # nodes a run's retries exclude (status.Refresh)


def current(reg: Registry, index: list[tuple[RunRecord, Summary | None]], timeout: float | None = None) -> Current:
    """Every run of `index` (Registry.index) with a summary that is up to date: settled ones as
    stored; the others' jobs refreshed from their backends (one batched question, status's refresh),
    computed again and stored (unless the registry is read-only)."""
    from clusterctl.runs.artifacts import dumps_strict

    now = time.time()
    stale = [run.run_id for run, s in index if s is None or not s.settled]
    if not stale:
        return Current([(run, s) for run, s in index if s is not None])  # every one settled
    full = reg.runs_by_ids(stale)  # with their config and plan
    fresh = refresh(reg, list(full.values()), timeout, now)
    old = {run.run_id: s for run, s in index if s is not None}
    new: dict[str, Summary] = {}
    signatures = {}
    for run_id, run in full.items():
        run.state = fresh.states[run_id]
        jobs = fresh.jobs[run_id]
        s = new[run_id] = compute(run, jobs, now, old.get(run_id))
        if s.settled:  # its status row no longer changes: kept as text, written as it is by status --all --json
            row = from_summary(run, s, excluded=fresh.excluded.get(run_id))
            s.status_format, s.status_json = STATUS_FORMAT, dumps_strict(row, default=str)
        signatures[run_id] = (run.state, [tuple(getattr(j, c) for c in _JOB_FIELDS) for j in jobs])
    # Stored: settled summaries, and the others whose files changed (for the next call, a stored
    # unsettled summary only serves its file figures; the rest is made again anyway): no write at all
    # while active runs write nothing new.
    keep = [r for r in stale if r in new and (new[r].settled or r not in old or old[r].files != new[r].files)]
    if keep and not reg.readonly and reg.has_summaries:
        reg.put_summaries([(new[r], signatures[r]) for r in keep])
    rows = [(full.get(run.run_id, run), cur) for run, s0 in index if (cur := new.get(run.run_id) or s0) is not None]
    return Current(rows, fresh.source, fresh.notes, len(new), fresh.waiting, fresh.excluded)


_JOB_FIELDS = tuple(JobRecord.__dataclass_fields__)


@dataclass
class AllRuns:
    """`status --all`: every run, newest first, what the refresh said (and the retries), and the failed
    runs whose plan allows a retry (lifecycle.reconcile's input)."""

    source: str
    notes: list[str]
    fresh: list[RunStatus]  # runs without a settled summary, refreshed now (newest first)
    settled: list[tuple[float, str]]  # (created_at, row as JSON text) of the others (Registry.settled_status)
    retry_candidates: list[RunRecord]

    def texts(self) -> Iterator[str]:
        """Every row as JSON text, newest first: settled ones as stored, the others encoded now."""
        import heapq
        import json

        from clusterctl.runs.artifacts import finite

        enc = json.JSONEncoder(allow_nan=False, default=str)
        fresh = ((r["created_at"], enc.encode(finite(r))) for r in self.fresh)
        return (text for _, text in heapq.merge(fresh, self.settled, key=lambda t: -t[0]))

    def rows(self) -> Iterator[RunStatus]:
        import json

        return (json.loads(text) for text in self.texts())


def collect_all(reg: Registry, timeout: float | None = None) -> AllRuns:
    """Every run of the registry from its summaries (runs.summaries): settled runs' rows as the
    registry keeps them, the others refreshed from their backends and made now (from_summary); then
    the failed runs whose plan allows a retry are reconciled (lifecycle.reconcile: resubmitted if the
    failure was the cluster's), each retry a note. The whole file is checked first (Registry.verify),
    so a damaged page is an error, not a short answer."""
    reg.verify()
    with reg.snapshot():  # settled and not: one state of the file, so no run is in both or neither
        stale = reg.index(stale_only=True, status_rows=True)
        settled, retry_ids = reg.settled_status()
    cur = current(reg, stale, timeout)
    fresh = [from_summary(run, s, cur.waiting.get(run.run_id), cur.excluded.get(run.run_id)) for run, s in cur.rows]
    retry = [run for run, s in cur.rows if run.state in FAILURE_STATES and s.max_retries > 0]
    retry += reg.runs_by_ids(retry_ids).values()
    notes = list(cur.notes)
    if retry and not reg.readonly:  # no daemon: retried here (lifecycle imported only when there is one)
        from clusterctl.runs.lifecycle import reconcile, retried_note

        notes += [retried_note(run_id, job_id) for run_id, job_id in reconcile(reg, retry, notes)]
    return AllRuns(cur.source, with_skipped(notes), fresh, settled, retry)
