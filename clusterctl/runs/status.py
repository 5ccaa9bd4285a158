"""Where runs stand: the registry brought up to date by their backends, and one row per run.

`refresh` asks each backend about the jobs it runs that may still change (one batched question per
backend: for Slurm one squeue, plus one sacct only for jobs that ended or were requeued), writes
what changed to the registry and derives each run's state from its latest job. `summarize` (pure)
turns a refreshed run, its jobs and its last metrics line into the row `status`, `watch` and
`--json` show. Runs whose registry state is final are never asked about again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from clusterctl.backends import get_backend
from clusterctl.runs import artifacts, provenance
from clusterctl.runs.registry import Registry
from clusterctl.specs import FINAL_STATES, JobRecord, RunRecord, RunState
from vltrain.rundir import RunDir

RECENT_FINISHED = 5  # finished runs shown beside the active ones by default


class RunStatus(TypedDict):
    """One run as `status --json` prints it (the keys are a public interface: scripts read them)."""

    run_id: str
    name: str
    profile: str
    executor: str
    state: str
    job_id: str | None
    job_ids: list[str]
    requeues: int  # the scheduler's own restarts of the run's job ids (Slurm's RestartCnt, summed; 0 locally)
    resumes: int  # the trainer's resume events in events.jsonl: continued from a checkpoint, whatever restarted it
    step: float | None
    total_steps: int
    loss: float | None
    samples_per_s: float | None
    eta_s: float | None
    elapsed_s: float
    gpu_hours: float
    alloc_gpus: int
    node_list: str | None
    exit_code: str | None
    run_dir: str
    created_at: float
    reason: str | None  # why a run that ended without completing did (the trainer's error line), else None
    pending_reason: str | None  # why its job waits to start, the scheduler's code (squeue's Reason), else None
    pending_detail: str | None  # that code in words, where the backend knows it
    expected_start: float | None  # when the scheduler expects the waiting job to start (epoch), if it says
    eval: dict[str, Any] | None  # the latest held-out evaluation's headline (artifacts.eval_headline), else None
    commit: str | None  # the git commit it was submitted from (provenance.json), None when not known
    dirty: bool | None  # that work tree had uncommitted changes (source.diff holds them); None when not known
    excluded_nodes: list[str]  # the nodes its retries keep it off (the newest retry event's), [] when none
    startup: dict[str, Any] | None  # the latest attempt's time to first step by phase (artifacts.startup_headline)
    lineage: NotRequired[dict[str, Any]]  # submit --from: from_run, from_step, weights_only (runs.fork)


# --- pure ---------------------------------------------------------------------------------------


def run_state(run: RunRecord, jobs: list[JobRecord]) -> str:
    """A run is where its latest job is; a job pending again after a Slurm requeue is REQUEUED.
    A job nobody has reported on yet (SUBMITTED) leaves the run's recorded state as it is."""
    if not jobs or jobs[-1].state == RunState.SUBMITTED:
        return run.state
    last = jobs[-1]
    if last.state == RunState.PENDING and last.requeues > 0:
        return RunState.REQUEUED
    return last.state


def summarize(
    run: RunRecord,
    jobs: list[JobRecord],
    metrics: dict[str, Any] | None,
    resumes: int,
    now: float,
    reason: str | None = None,
    waiting: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    commit: tuple[str | None, bool | None] = (None, None),
    excluded: list[str] | None = None,
    startup: dict[str, Any] | None = None,
) -> RunStatus:
    """One status row from refreshed registry records and the last metrics line; `waiting`: why its
    latest job waits to start (Refresh.waiting), as the scheduler said in this refresh; `evaluation`:
    its eval.json's headline (artifacts.eval_headline); `commit`: (commit, dirty) it was submitted
    from (provenance.commit_of); `excluded`: the nodes its retries exclude (Refresh.excluded);
    `startup`: its latest attempt's start-up (artifacts.startup_headline)."""
    from clusterctl.runs.summaries import last_metrics
    from clusterctl.runs.usage import job_time

    step, loss, sps = last_metrics(metrics)
    accounting = get_backend(run.executor).has_accounting  # else the registry's clock (usage.job_time)
    elapsed, gpu_s = 0.0, 0.0
    for j in jobs:
        e, g, _ = job_time(j, run.gpus, now, accounting)
        elapsed += e
        gpu_s += g
    state = run.state
    last = jobs[-1] if jobs else None
    return RunStatus(
        run_id=run.run_id,
        name=run.name,
        profile=run.profile,
        executor=run.executor,
        state=state,
        job_id=last.job_id if last else None,
        job_ids=[j.job_id for j in jobs],
        requeues=sum(j.requeues for j in jobs),
        resumes=resumes,
        step=step,
        total_steps=run.total_steps,
        loss=loss,
        samples_per_s=sps,
        eta_s=eta_s(run, step, sps),
        elapsed_s=elapsed,
        gpu_hours=gpu_s / 3600.0,
        alloc_gpus=(last.alloc_gpus if last else None) or run.gpus,
        node_list=last.node_list if last else None,
        exit_code=last.exit_code if last else None,
        run_dir=run.run_dir,
        created_at=run.created_at,
        reason=reason,
        pending_reason=(waiting or {}).get("reason"),
        pending_detail=(waiting or {}).get("detail"),
        expected_start=(waiting or {}).get("expected_start"),
        eval=evaluation,
        commit=commit[0],
        dirty=commit[1],
        excluded_nodes=list(excluded or []),
        startup=startup,
    )


def eta_s(run: RunRecord, step: float | None, samples_per_s: float | None) -> float | None:
    """Seconds left for a running run at its logged speed (None when not running or not known)."""
    batch = _num(run.plan.get("global_batch", run.config.get("global_batch")))
    if run.state != RunState.RUNNING or step is None or not samples_per_s or not batch:
        return None
    return max(0.0, run.total_steps - step) * batch / samples_per_s


def _num(v: Any, finite: bool = True) -> float | None:
    """A number from a metrics line, or None (missing, null, text, a bool; NaN or infinite unless
    `finite` is False: a NaN loss is worth showing, a NaN step or speed is not a figure)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    return v if not finite or math.isfinite(v) else None


# --- backends + registry (edge) -----------------------------------------------------------------


@dataclass
class Refresh:
    """The outcome of one refresh: each run's state, its jobs (updated), and what was asked."""

    states: dict[str, str]
    jobs: dict[str, list[JobRecord]]
    source: str = "registry"
    notes: list[str] = field(default_factory=list)
    now: float = 0.0  # when the backends were asked
    retried: list[tuple[str, str]] = field(default_factory=list)  # (run id, new job id): lifecycle.refresh_and_retry
    waiting: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> why its latest job waits (api.Poll)
    excluded: dict[str, list[str]] = field(default_factory=dict)  # run id -> nodes its retries exclude (excluded_nodes)


def refresh(reg: Registry, runs: list[RunRecord], timeout: float | None = None, now: float | None = None) -> Refresh:
    """Ask the backends about every job of `runs` that may still change, write what changed to the
    registry, and return each run's state. Status, watch, logs --follow, --wait and resume go through
    lifecycle.refresh_and_retry (this, then the retry of cluster failures); reports call it alone."""
    now = time.time() if now is None else now
    jobs = reg.jobs_for(r.run_id for r in runs)
    by_backend: dict[str, list[tuple[RunRecord, JobRecord]]] = {}
    for r in runs:
        backend = get_backend(r.executor)
        by_backend.setdefault(r.executor, []).extend((r, j) for j in jobs[r.run_id] if backend.needs_poll(r, j, now))
    updates, sources, notes = [], [], []
    waiting: dict[str, dict[str, Any]] = {}
    requeued: list[tuple[str, str, int]] = []
    for executor, pairs in by_backend.items():
        poll = get_backend(executor).poll(pairs, now, timeout)
        if poll.source:
            sources.append(poll.source)
        notes += poll.notes
        for (run, job), change in zip(pairs, poll.changes, strict=True):
            if job.job_id in poll.waiting and job is jobs[run.run_id][-1]:  # the run's latest job only
                waiting[run.run_id] = poll.waiting[job.job_id]
            if change:
                if change.get("requeues", 0) > job.requeues:  # a new requeue: notified (runs.notify)
                    requeued.append((run.run_id, job.job_id, int(change["requeues"])))
                updates.append((job.job_id, run.run_id, change, job.state))
                for k, v in change.items():
                    setattr(job, k, v)
    states = {r.run_id: r.state if r.state in FINAL_STATES else run_state(r, jobs[r.run_id]) for r in runs}
    changed = {r.run_id: s for r in runs if (s := states[r.run_id]) != r.state}
    if reg.readonly:
        notes.append(readonly_note(reg))
    else:
        reg.update_jobs(updates)
        reg.set_run_states(changed, if_states={r.run_id: r.state for r in runs if r.run_id in changed})
        if changed or requeued:  # the webhooks of what this refresh saw happen, once each (runs.notify)
            from clusterctl.runs.notify import observed

            observed(reg, runs, jobs, changed, requeued, now)
    fresh = Refresh(states, jobs, "+".join(sources) or "registry", notes, now, waiting=waiting)
    fresh.excluded = excluded_nodes(reg, runs)
    return fresh


def excluded_nodes(reg: Registry, runs: list[RunRecord]) -> dict[str, list[str]]:
    """The nodes each run's retries keep it off: the "excluded" of its newest registry event of kind
    "retry" (runs.retry writes it: the whole set after that retry), for the runs that have one."""
    latest = reg.latest_events((r.run_id for r in runs), "retry")
    return {k: [str(n) for n in v] for k, d in latest.items() if isinstance(v := d.get("excluded"), list)}


def readonly_note(reg: Registry) -> str:
    """The note every command that refreshes a read-only registry adds (status, watch, report)."""
    from clusterctl.runs.dbfile import shown

    return (
        f"registry {shown(str(reg.path))} is read-only (the file or its directory cannot be written): what the "
        "scheduler says is shown but not saved, and no failed run is retried"
    )


def collect(runs: list[RunRecord], fresh: Refresh) -> dict[str, Any]:
    """The whole status answer for `runs` after `fresh` (lifecycle.refresh_and_retry) as JSON-able
    data (edge: reads each run's last metrics record, resume events and why it ended). A file
    refused by vltrain.common.safe_read (a FIFO, a device, over its cap) is a note."""
    rows = []
    for r in runs:
        r.state = fresh.states[r.run_id]
        rd = RunDir(r.run_dir)
        metrics = artifacts.tail_json(rd.metrics)
        events = artifacts.events_of(rd.events, "resume", "startup")  # one pass over events.jsonl
        resumes = sum(artifacts.is_kind(e, "resume") for e in events)
        startup = artifacts.startup_headline(events)
        jobs = fresh.jobs[r.run_id]
        headline = artifacts.eval_headline(artifacts.read_eval(r.run_dir))
        why, waiting = why_ended(r, jobs), fresh.waiting.get(r.run_id)
        commit, excluded = provenance.commit_of(r.run_dir), fresh.excluded.get(r.run_id)
        rows.append(summarize(r, jobs, metrics, resumes, fresh.now, why, waiting, headline, commit, excluded, startup))
        if lineage := r.plan.get("lineage"):  # a fork's origin (runs.fork)
            rows[-1]["lineage"] = lineage
    return {"source": fresh.source, "notes": with_skipped(fresh.notes), "runs": rows}


def with_skipped(notes: list[str]) -> list[str]:
    """`notes` and, after them, a note for each run file this process refused to read (safe_read)."""
    from vltrain.common import safe_read

    return notes + [n for n in safe_read.skipped() if n not in notes]


def why_ended(run: RunRecord, jobs: list[JobRecord]) -> str | None:
    """The reason a run that ended without completing gives in its run directory (edge: reads files)."""
    if run.state not in FINAL_STATES or run.state == RunState.COMPLETED or not jobs:
        return None
    return artifacts.failure_reason(run.run_dir, jobs[-1].job_id)


def from_summary(
    run: RunRecord, s: Any, waiting: dict[str, Any] | None = None, excluded: list[str] | None = None
) -> RunStatus:
    """The status row of a run from its summary (runs.summaries): the same figures as `summarize`
    (usage.job_time, the last metrics record, why_ended), read from the registry; `waiting` and
    `excluded` as there. Reads the run's eval.json and provenance.json (edge): made for a run not yet
    settled, and once when it settles (kept); and its events.jsonl for the start-up (the summary
    counts the resumes only)."""
    commit, dirty = provenance.commit_of(run.run_dir)
    return RunStatus(
        run_id=run.run_id,
        name=run.name,
        profile=run.profile,
        executor=run.executor,
        state=run.state,
        job_id=s.job_id,
        job_ids=s.job_ids,
        requeues=s.requeues,
        resumes=s.resumes,
        step=s.step,
        total_steps=run.total_steps,
        loss=s.loss,
        samples_per_s=s.samples_per_s,
        eta_s=eta_s(run, s.step, s.samples_per_s),
        elapsed_s=s.elapsed_s,
        gpu_hours=s.gpu_hours,
        alloc_gpus=s.alloc_gpus or run.gpus,
        node_list=s.node_list,
        exit_code=s.exit_code,
        run_dir=run.run_dir,
        created_at=run.created_at,
        reason=s.reason,
        pending_reason=(waiting or {}).get("reason"),
        pending_detail=(waiting or {}).get("detail"),
        expected_start=(waiting or {}).get("expected_start"),
        eval=artifacts.eval_headline(artifacts.read_eval(run.run_dir)),
        commit=commit,
        dirty=dirty,
        excluded_nodes=list(excluded or []),
        startup=artifacts.startup_headline(artifacts.events_of(RunDir(run.run_dir).events, "startup")),
    )


def select_runs(reg: Registry, ref: str | None, all_: bool) -> list[RunRecord]:
    """The runs a listing shows: one by reference, every run, or the active and newest finished.
    Every run (`all_`): the whole file is checked first (Registry.verify, a few ms), so a damaged
    page that the listing never reads (events) is an error, not a clean answer."""
    if ref:
        return [reg.get_run(ref)]
    if all_:
        reg.verify()
        return reg.list_runs()
    return reg.active_and_recent(RECENT_FINISHED)
