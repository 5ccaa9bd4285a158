"""`clusterctl status [RUN] [--all] [--json]`: where each run stands, from registry + Slurm + run dir.

At most one squeue and one sacct call per invocation, each for every shown run at once, so the
answer costs the same however many runs there are: squeue for every job not final in the registry,
then sacct only for the jobs squeue cannot answer for (left the queue, ended, or requeued); runs
whose registry state is final are not asked about again. When accounting is unavailable, states
come from squeue and the registry; when slurmctld does not answer in time, the last known states
are shown; the output says which (`source` and `notes`). Progress comes from the last line of each
run's metrics.jsonl, read from the end of the file. What Slurm says is written back to the registry.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from clusterctl import slurm
from clusterctl.registry import ACTIVE_STATES, JobRecord, Registry, RunRecord
from vltrain.errors import UserError

RECENT_FINISHED = 5  # finished runs shown beside the active ones by default
SACCT_LAG_S = 120  # a job this young may not be in accounting yet: keep its state


@dataclass
class SlurmView:
    """What Slurm said in this invocation (None: that source did not answer)."""

    queue: dict[str, slurm.QueueRow] | None = None
    acct: dict[str, slurm.AcctRow] | None = None
    source: str = "registry"
    notes: list[str] = field(default_factory=list)


# --- pure ---------------------------------------------------------------------------------------

def job_changes(job: JobRecord, q: slurm.QueueRow | None, a: slurm.AcctRow | None, now: float,
                outcome: str | None = None) -> dict[str, Any]:
    """The registry fields of `job` that Slurm's rows change (the controller wins for live state,
    accounting for times and totals). `outcome`: submitit's result file, for jobs Slurm forgot."""
    new: dict[str, Any] = {}
    if q is not None and q.state != slurm.UNKNOWN:
        new["state"] = q.state
    elif a is not None:
        new["state"] = a.state
    elif outcome is not None:
        new["state"] = outcome
    elif q is None and now - job.submitted_at > SACCT_LAG_S and job.state not in slurm.FINAL:
        new["state"] = slurm.UNKNOWN  # neither knows it and it is too old to be accounting lag
    restarts = max([job.requeues] + ([q.restarts] if q else []) + ([a.requeues] if a else []))
    new["requeues"] = restarts
    if a is not None:
        new |= {"started_at": a.start, "ended_at": a.end, "elapsed_s": a.elapsed_s}
        if a.state in slurm.FINAL:  # a running job's row says 0:0; the exit code is known only at the end
            new["exit_code"] = a.exit_code
    if q is not None:
        if q.start is not None and q.state != slurm.PENDING:
            new["started_at"] = q.start
        if a is None and q.elapsed_s is not None:  # no accounting: the current attempt only
            new["elapsed_s"] = max(q.elapsed_s, job.elapsed_s or 0.0)
    gpus = (a.alloc_gpus if a else None) or (q.alloc_gpus if q else None)
    nodes = (q.node_list if q else None) or (a.node_list if a else None)
    new |= {"alloc_gpus": gpus, "node_list": nodes}
    return {k: v for k, v in new.items() if v is not None and getattr(job, k) != v}


def awaiting_accounting(run: RunRecord, job: JobRecord, now: float) -> bool:
    """Still ask Slurm about this job? Yes while it is not final; and for a Slurm job that ended
    without its final accounting record yet (no exit code: slurmdbd lags the controller by up to a
    few seconds), for SACCT_LAG_S more, so its exit code and totals are not lost (retries need the
    exit code to tell a cluster failure from a user error)."""
    if job.state not in slurm.FINAL:
        return run.state in ACTIVE_STATES
    return run.executor == "slurm" and job.exit_code is None and now - (job.ended_at or job.submitted_at) < SACCT_LAG_S


def run_state(run: RunRecord, jobs: list[JobRecord]) -> str:
    """A run is where its latest job is; a job pending again after a Slurm requeue is REQUEUED.
    A job nobody has reported on yet (SUBMITTED) leaves the run's recorded state as it is."""
    if not jobs or jobs[-1].state == "SUBMITTED":
        return run.state
    last = jobs[-1]
    if last.state == slurm.PENDING and last.requeues > 0:
        return slurm.REQUEUED
    return last.state


def summarize(run: RunRecord, jobs: list[JobRecord], metrics: dict[str, Any] | None, resumes: int,
              now: float) -> dict[str, Any]:
    """One status row (JSON-able) from refreshed registry records and the last metrics line."""
    m = metrics or {}
    step = _num(m.get("step"))
    loss = _num(m.get("loss", m.get("loss/total", m.get("train/loss"))))
    sps = _num(m.get("samples_per_s", m.get("samples_per_sec")))
    elapsed, gpu_s = 0.0, 0.0
    for j in jobs:
        e = j.elapsed_s
        if j.state == slurm.RUNNING and j.started_at and (e is None or run.executor == "local"):
            e = max(0.0, now - j.started_at)
        elapsed += e or 0.0
        gpu_s += (e or 0.0) * (j.alloc_gpus or run.gpus)
    state = run.state
    batch = _num(run.plan.get("global_batch", run.config.get("global_batch")))
    eta = None
    if state == slurm.RUNNING and step is not None and sps and batch:
        eta = max(0.0, run.total_steps - step) * batch / sps
    last = jobs[-1] if jobs else None
    return {
        "run_id": run.run_id, "name": run.name, "profile": run.profile, "executor": run.executor,
        "state": state, "job_id": last.job_id if last else None, "job_ids": [j.job_id for j in jobs],
        "requeues": sum(j.requeues for j in jobs), "resumes": resumes,
        "step": step, "total_steps": run.total_steps, "loss": loss, "samples_per_s": sps, "eta_s": eta,
        "elapsed_s": elapsed, "gpu_hours": gpu_s / 3600.0, "alloc_gpus": (last.alloc_gpus if last else None) or run.gpus,
        "node_list": last.node_list if last else None, "exit_code": last.exit_code if last else None,
        "run_dir": run.run_dir, "created_at": run.created_at,
    }


def _num(v: Any) -> float | None:
    """A number from a metrics line, or None (missing, null, text, or a bool)."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def last_json_line(buf: bytes, complete_first: bool) -> dict[str, Any] | None:
    """The last line of `buf` that parses as a JSON object; a half-written last line is skipped.
    `complete_first`: buf starts at the start of the file (its first line is whole)."""
    lines = buf.split(b"\n")
    for line in reversed(lines if complete_first else lines[1:]):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def pickle_outcome(head: bytes) -> str | None:
    """submitit's result pickle starts with the string 'success' or 'error': read it without
    unpickling (no code runs, no torch import)."""
    import io
    import pickletools

    try:
        for _op, arg, _pos in pickletools.genops(io.BytesIO(head)):
            if isinstance(arg, str):
                return {"success": slurm.COMPLETED, "error": slurm.FAILED}.get(arg)
    except Exception:  # truncated or not a pickle: no outcome
        return None
    return None


# --- run directory (edge) -----------------------------------------------------------------------

def tail_json(path: Path, chunk: int = 8192, max_bytes: int = 1 << 20) -> dict[str, Any] | None:
    """The last complete JSON line of a JSONL file, read backwards from the end in chunks."""
    try:
        f = path.open("rb")
    except OSError:
        return None
    with f:
        pos = f.seek(0, os.SEEK_END)
        end, buf = pos, b""
        while pos > 0 and end - pos < max_bytes:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            found = last_json_line(buf, complete_first=pos == 0)
            if found is not None:
                return found
    return None


def count_events(path: Path, kind: str) -> int:
    """How many events of `kind` the trainer wrote (events.jsonl is short: read whole)."""
    try:
        data = path.read_bytes()
    except OSError:
        return 0
    n = 0
    for line in data.splitlines():
        if kind.encode() in line:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            n += isinstance(ev, dict) and kind in (ev.get("event"), ev.get("kind"), ev.get("type"))
    return n


def submitit_outcome(run_dir: str, job_id: str) -> tuple[str | None, float | None]:
    """(COMPLETED|FAILED|None, result file mtime) from rank 0's result pickle of `job_id`."""
    base = Path(run_dir) / "submitit"
    for p in (base / job_id / f"{job_id}_0_result.pkl", base / f"{job_id}_0_result.pkl"):
        try:
            with p.open("rb") as f:
                return pickle_outcome(f.read(256)), p.stat().st_mtime
        except OSError:
            continue
    return None, None


def _pid_alive(pid: str) -> bool:
    """Is submitit's local controller process still there? /proc guards against pid reuse."""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
        return b"submitit" in cmdline
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        try:
            os.kill(int(pid), 0)
            return True
        except (OSError, ValueError):
            return False


def local_changes(run: RunRecord, job: JobRecord, now: float) -> dict[str, Any]:
    """State of a local-executor job (job id = pid of submitit's controller) from its files."""
    outcome, mtime = submitit_outcome(run.run_dir, job.job_id)
    if outcome is not None:
        new = {"state": outcome, "ended_at": mtime, "elapsed_s": max(0.0, (mtime or now) - job.submitted_at)}
    elif _pid_alive(job.job_id):
        new = {"state": slurm.RUNNING, "started_at": job.started_at or job.submitted_at}
    elif job.state in slurm.FINAL:
        return {}
    else:  # gone without a result: killed (OOM, reboot, kill -9)
        new = {"state": slurm.FAILED, "ended_at": now, "elapsed_s": max(0.0, now - job.submitted_at)}
    new["alloc_gpus"] = run.gpus
    return {k: v for k, v in new.items() if getattr(job, k) != v}


# --- Slurm + registry (edge) --------------------------------------------------------------------

def accounting_needed(job: JobRecord, q: slurm.QueueRow | None) -> bool:
    """Does this job need sacct, or does squeue's row say all status shows? squeue is enough for a
    job pending or running its first attempt (state, start, elapsed, GPUs, nodes); accounting is
    needed once it left the queue or ended (exit code, final elapsed) and after a requeue (sacct -D
    sums the elapsed time of every attempt; squeue knows only the current one)."""
    return (q is None or q.state not in (slurm.PENDING, slurm.RUNNING, slurm.COMPLETING, slurm.SUSPENDED)
            or q.restarts > 0 or job.requeues > 0)


def query_slurm(jobs: list[JobRecord], timeout: float, since: float | None = None) -> SlurmView:
    """One squeue call for all `jobs`, then one sacct call for those that need accounting (all of
    them when the controller did not answer), with what failed noted. In the steady state (jobs
    pending or running) that is squeue alone: a few ms, and no load on slurmdbd, which answers in
    ~90 ms at best and is what a busy site's admins ask users not to poll.
    `since`: the earliest submission among them (sacct ignores older jobs that reused an id)."""
    view = SlurmView()
    if not jobs:
        return view
    ids = sorted({j.job_id for j in jobs})
    errors: dict[str, str] = {}
    started = time.monotonic()
    try:
        view.queue = slurm.squeue(ids, timeout)
    except (UserError, OSError, ValueError) as e:  # SlurmUnavailable, odd bytes, no permission
        errors["queue"] = str(e).split("; allowed:")[0]
    acct_ids = ids if view.queue is None else sorted(
        {j.job_id for j in jobs if accounting_needed(j, view.queue.get(j.job_id))})
    if acct_ids:
        try:
            # what is left of the time-out (at least 2 s): a hung controller must not double the wait
            view.acct = slurm.sacct(acct_ids, max(2.0, timeout - (time.monotonic() - started)), since=since)
        except (UserError, OSError, ValueError) as e:  # AccountingUnavailable
            errors["acct"] = str(e).split("; allowed:")[0]
    if "queue" in errors:
        rest = "accounting (sacct) and the registry" if view.acct is not None else "the registry"
        view.notes.append(f"Slurm controller unavailable ({errors['queue']}): showing the last known states from {rest}")
    if "acct" in errors:
        view.notes.append(f"accounting unavailable ({errors['acct']}): " + (
            "states from squeue and the registry; elapsed time and GPU-hours count only what squeue saw"
            if view.queue is not None else "no accounting data either"))
    view.source = "+".join([s for s, v in (("squeue", view.queue), ("sacct", view.acct)) if v is not None] +
                           (["registry"] if errors else []))
    return view


def refresh(reg: Registry, runs: list[RunRecord], timeout: float | None = None,
            now: float | None = None) -> dict[str, str]:
    """Ask Slurm / the run directories about every non-final job of `runs`, write what changed to
    the registry, and return {run_id: state}. Used by status, logs --follow and resume."""
    states, _jobs, _view = _refresh(reg, runs, timeout, now)
    return states


def _refresh(reg: Registry, runs: list[RunRecord], timeout: float | None, now: float | None):
    now = time.time() if now is None else now
    jobs = reg.jobs_for(r.run_id for r in runs)
    live = [(r, j) for r in runs for j in jobs[r.run_id] if awaiting_accounting(r, j, now)]
    slurm_jobs = [j for r, j in live if r.executor == "slurm"]
    since = min((j.submitted_at for j in slurm_jobs), default=now) - 300  # slack for clock skew
    view = query_slurm(slurm_jobs, slurm.slurm_timeout() if timeout is None else timeout, since)
    updates = []
    for run, job in live:
        if run.executor == "local":
            change = local_changes(run, job, now)
        else:
            q = view.queue.get(job.job_id) if view.queue is not None else None
            a = view.acct.get(job.job_id) if view.acct is not None else None
            answered = view.queue is not None or view.acct is not None  # (sacct may not have been asked)
            outcome = submitit_outcome(run.run_dir, job.job_id)[0] if answered and q is None and a is None else None
            change = job_changes(job, q, a, now, outcome) if answered else {}
        if change:
            updates.append((job.job_id, run.run_id, change, job.state))
            for k, v in change.items():
                setattr(job, k, v)
    reg.update_jobs(updates)
    states = {r.run_id: run_state(r, jobs[r.run_id]) if r.state in ACTIVE_STATES else r.state for r in runs}
    changed = {r.run_id: s for r in runs if (s := states[r.run_id]) != r.state}
    reg.set_run_states(changed, if_states={r.run_id: r.state for r in runs if r.run_id in changed})
    return states, jobs, view


def collect(reg: Registry, runs: list[RunRecord], timeout: float | None = None) -> dict[str, Any]:
    """The whole status answer for `runs` as JSON-able data."""
    now = time.time()
    states, jobs, view = _refresh(reg, runs, timeout, now)
    rows = []
    for r in runs:
        r.state = states[r.run_id]
        run_dir = Path(r.run_dir)
        metrics = tail_json(run_dir / "metrics.jsonl")
        rows.append(summarize(r, jobs[r.run_id], metrics, count_events(run_dir / "events.jsonl", "resume"), now))
    return {"source": view.source, "notes": view.notes, "runs": rows}


# --- the command --------------------------------------------------------------------------------

def status(
    run: str = typer.Argument(None, help="Run id, unique id prefix or name (default: active runs and the newest finished)."),
    all_: bool = typer.Option(False, "--all", help="Show every run in the registry."),
    json_: bool = typer.Option(False, "--json", help="Print JSON for scripts (with 'source' and 'notes')."),
) -> None:
    """Where runs stand: state, requeues, step, loss, throughput, ETA, elapsed, GPU-hours."""
    reg = Registry()
    runs = [reg.get_run(run)] if run else reg.list_runs() if all_ else reg.active_and_recent(RECENT_FINISHED)
    data = collect(reg, runs)
    failed = [r for r in runs if r.state in ("FAILED", "NODE_FAIL")]
    if failed:  # cluster failures get their retry here (clusterctl has no daemon; see clusterctl/retry.py)
        from clusterctl.retry import reconcile

        for run_id, job_id in reconcile(reg, failed):
            data["notes"].append(f"{run_id}: retried as job {job_id} after a cluster failure")
    if json_:
        from clusterctl.output import print_json

        print_json(data)
        return
    _print_table(data)


COLUMNS = (("RUN", "<"), ("JOB", "<"), ("PROFILE", "<"), ("STATE", "<"), ("RQ", ">"), ("STEP", ">"), ("LOSS", ">"),
           ("SAMPLES/S", ">"), ("ETA", ">"), ("ELAPSED", ">"), ("GPU-H", ">"))


DROP_ORDER = ("SAMPLES/S", "PROFILE", "ELAPSED", "JOB")  # hidden first when the terminal is narrow


def table_lines(runs: list[dict[str, Any]], width: int | None = None) -> tuple[list[str], list[str]]:
    """The status listing as aligned text lines (header first), and the columns left out to fit
    `width` (None: all columns). RUN, STATE, RQ, STEP, LOSS, ETA and GPU-H are always kept.

    Formatted by hand, not with rich's Table: rich measures every cell through its renderable
    protocol (~40 ms for 50 rows, a sixth of what the whole command may cost), and a fixed set
    of plain columns needs none of that. RQ is Slurm's requeue count, or the trainer's resume
    events for local runs.
    """
    cells = [[h for h, _ in COLUMNS]]
    for r in runs:
        rq = r["requeues"] if r["executor"] == "slurm" else r["resumes"]
        step = "-" if r["step"] is None else f"{r['step']:,.0f}/{r['total_steps']:,}"
        cells.append([r["run_id"], r["job_id"] or "-", r["profile"], r["state"], str(rq), step,
                      _fmt(r["loss"], "{:.4f}"), _fmt(r["samples_per_s"], "{:,.1f}"), _dur(r["eta_s"]),
                      _dur(r["elapsed_s"]), f"{r['gpu_hours']:,.0f}" if r["gpu_hours"] >= 100 else f"{r['gpu_hours']:.2f}"])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    keep = list(range(len(COLUMNS)))
    hidden: list[str] = []

    def over() -> int:  # columns beyond `width` with the columns kept (2 spaces between them)
        return 0 if width is None else sum(widths[i] for i in keep) + 2 * (len(keep) - 1) - width

    for name in DROP_ORDER:
        if over() <= 0:
            break
        keep.remove(next(i for i, (h, _) in enumerate(COLUMNS) if h == name))
        hidden.append(name)
    if (excess := over()) > 0:  # last resort: cut run ids at the end; the prefix left is what commands accept
        widths[0] = max(12, widths[0] - excess)
        for row in cells[1:]:
            if len(row[0]) > widths[0]:
                row[0] = row[0][: widths[0] - 1] + "…"
    lines = ["  ".join(f"{row[i]:{COLUMNS[i][1]}{widths[i]}}" for i in keep).rstrip() for row in cells]
    return lines, hidden


def terminal_width() -> int | None:
    """Columns to fit: the terminal's, or $COLUMNS; None when output goes to a pipe or file (keep all)."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(1).columns if os.isatty(1) else None
    except OSError:
        return None


def _print_table(data: dict[str, Any]) -> None:
    from clusterctl.output import console

    if not data["runs"]:
        console.print("no runs yet: clusterctl submit --profile local")
    else:
        (header, *rows), hidden = table_lines(data["runs"], terminal_width())
        console.print(header, style="bold", markup=False, highlight=False, soft_wrap=True)
        if rows:
            console.print("\n".join(rows), markup=False, highlight=False, soft_wrap=True)
        if hidden:
            console.print(f"({', '.join(hidden)} hidden to fit the terminal; --json shows everything)",
                          style="dim", markup=False, highlight=False, soft_wrap=True)
    for note in data["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if data["runs"] and data["source"] != "registry":
        console.print(f"source: {data['source']}", style="dim", markup=False, highlight=False)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else spec.format(v)


def _dur(s: float | None) -> str:
    """Seconds as '45s', '12m03s', '3h05m', '2d04h'."""
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
