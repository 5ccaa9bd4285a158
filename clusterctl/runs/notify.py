"""Notifications: a run's events told to the user's webhooks, exactly once, by whoever sees them first.

clusterctl has no daemon, so an event is observed by whichever process is there: the job itself
(runs.attempt: started, requeued, completed), the follow-up job or a command (runs.lifecycle: retried,
failed; runs.status.refresh: what a refresh sees change). Each calls `notify` with the same key for
the same event; the registry's notifications table makes it exactly once: the observer that inserts the
row (run id, key) sends, every other one skips. The outcome is recorded in that row (ok, error); a
webhook that is down, slow or answers an error is a miss, written to the row and to the run
directory's notify log, and never resent (at most once, never twice; docs/reliability.md).

The settings are the run directory's copy of the user's [notify] (planning.user_config), so a job on
another machine uses what the run was submitted with. A run without it costs one stat per event.
Sending is urllib's (stdlib, no client to install on the nodes) with a short timeout; nothing here
raises: a notification never changes what happens to the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.planning.user_config import EVENTS, NotifySettings, mask, parse_notify
from clusterctl.specs import RunRecord
from vltrain.rundir import RunDir

if TYPE_CHECKING:
    from clusterctl.runs.registry import Registry

MAX_LINE = 600  # characters of a message (a reason is cut to fit: one line in a chat)


# --- pure ---------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return str(v)


def facts(event: str, data: Mapping[str, Any]) -> str:
    """The key facts of one event, as words (missing ones are left out)."""
    d = {k: v for k, v in data.items() if v is not None and v != ""}
    parts: list[str] = []
    if event == "started":
        parts += [f"job {d['job_id']}" if "job_id" in d else "", f"on {_fmt(d['nodes'])}" if "nodes" in d else ""]
    elif event == "requeued":
        parts += [d.get("reason", "requeued"), f"job {d['job_id']}" if "job_id" in d else ""]
        parts += [f"requeue #{d['count']}" if "count" in d else ""]
    elif event == "retried":
        parts += [d.get("reason", "cluster failure"), f"failed job {d['failed_job']}" if "failed_job" in d else ""]
        parts += [f"new job {d['job_id']}" if "job_id" in d else "", f"excluded {_fmt(d.get('excluded', []))}"]
    elif event == "failed":
        parts += [f"job {d['job_id']}" if "job_id" in d else "", d.get("reason", "no reason recorded")]
    elif event == "completed":
        parts += [f"job {d['job_id']}" if "job_id" in d else "", f"step {_fmt(d['step'])}" if "step" in d else ""]
        parts += [f"loss {_fmt(d['loss'])}" if "loss" in d else ""]
        parts += [f"{k} {_fmt(v)}" for k, v in (d.get("eval") or {}).items()]
        parts += [f"{_fmt(d['gpu_hours'])} GPU-hours" if "gpu_hours" in d else ""]
    return "; ".join(p for p in parts if p)


def message(run: RunRecord, event: str, data: Mapping[str, Any]) -> str:
    """The one line every webhook gets: run id, name, profile, event and its facts."""
    line = f"clusterctl: run {run.run_id} ({run.name}, profile {run.profile}) {event}"
    text = facts(event, data)
    line = f"{line}: {text}" if text else line
    line = " ".join(line.split())  # one line whatever a reason held
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 1] + "…"


def payload(text: str) -> bytes:
    """Slack's incoming-webhook body: {"text": ...} and nothing else (Slack refuses what it does not know
    in some fields, and every chat webhook that speaks Slack's format reads `text`)."""
    return json.dumps({"text": text}).encode("utf-8")


# --- edges --------------------------------------------------------------------------------------


def settings(run_dir: str | Path) -> NotifySettings | None:
    """The [notify] the run was submitted with (its run directory's copy); None without one. A copy
    that does not parse raises (notify logs it)."""
    path = RunDir(run_dir).notify
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return parse_notify({"notify": json.loads(text)}, str(path))


def post(url: str, body: bytes, timeout: float) -> str | None:
    """POST `body` as JSON to `url`; None when the server answered 2xx, else the error in words (the URL
    masked: it is a secret)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # http(s) only: user_config._url
            resp.read(1 << 16)
        return None
    except urllib.error.HTTPError as e:
        return f"{mask(url)}: HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        return f"{mask(url)}: {e.reason}"
    except (OSError, ValueError) as e:  # a timeout while reading, a reset connection
        return f"{mask(url)}: {type(e).__name__}: {e}"


def log_miss(run_dir: str | Path, key: str, event: str, errors: Iterable[str]) -> None:
    """One line per miss in the run directory's notify log (appended; never raises)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = " ".join(f"{stamp} {event} [{key}] not delivered: {'; '.join(errors)}".split()) + "\n"
    try:
        with open(RunDir(run_dir).notify_log, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError:
        pass


def notify(reg: Registry, run: RunRecord, event: str, data: Mapping[str, Any], key: str | None = None) -> None:
    """Tell the run's webhooks that want `event` about it, exactly once per (run id, key or event):
    claimed in the registry before sending, the outcome recorded after. Never raises; a miss is
    logged (notify log, registry row) and not resent. Nothing happens without settings, for an event
    no webhook wants, or from a read-only registry."""
    key = key or event
    try:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; allowed: {', '.join(EVENTS)}")
        conf = settings(run.run_dir)
        hooks = conf.for_event(event) if conf is not None else ()
        if not hooks or reg.readonly or not reg.claim_notification(run.run_id, key, event):
            return
        body = payload(message(run, event, data))
        errors = [e for h in hooks if (e := post(h.url, body, conf.timeout_s if conf else 5.0)) is not None]
        reg.record_notification(run.run_id, key, not errors, "; ".join(errors) or None)
        if errors:
            log_miss(run.run_dir, key, event, errors)
    except Exception as e:  # a notification must never change what happens to the run
        log_miss(run.run_dir, key, event, [f"{type(e).__name__}: {e}"])


# --- what observers pass ------------------------------------------------------------------------

EVAL_FIGURES = ("zero-shot top-1", "i2t R@1", "t2i R@1")  # of artifacts.eval_summary, when present


def completed_data(run: RunRecord, jobs: list[Any], now: float, accounting: bool = False) -> dict[str, Any]:
    """A completed run's facts (edge: reads its last metrics line and eval.json): the last job, step,
    final loss, the eval figures and GPU-hours (usage.gpu_hours; `accounting`: the scheduler's times)."""
    from clusterctl.runs import artifacts
    from clusterctl.runs.summaries import last_metrics
    from clusterctl.runs.usage import gpu_hours

    step, loss, _ = last_metrics(artifacts.tail_json(RunDir(run.run_dir).metrics))
    figures = artifacts.eval_summary(run.run_dir)
    return {
        "job_id": jobs[-1].job_id if jobs else None,
        "step": int(step) if step is not None else None,
        "loss": loss,
        "eval": {k: figures[k] for k in EVAL_FIGURES if k in figures},
        "gpu_hours": gpu_hours(run.gpus, jobs, now, accounting)[0],
    }


def from_job(
    registry: str,
    run_dir: str,
    run_id: str,
    event: str,
    data: dict[str, Any],
    key: str | None = None,
    started: float | None = None,
) -> None:
    """The job's own observation (runs.attempt, rank 0): the registry the run was submitted to (never
    created here: a path this node cannot see means nothing is sent, and the next observer sends),
    the run's record, then notify. For "completed", its facts are read here, the job's own time from
    `started` (the registry knows no start of it until a command asked the scheduler). Never raises."""
    if not RunDir(run_dir).notify.exists():
        return  # no [notify] when it was submitted: nothing to open
    try:
        from clusterctl.runs.registry import Registry

        if not Path(registry).is_file():
            raise FileNotFoundError(f"registry {registry} not on this node")
        reg = Registry(Path(registry))
        try:
            run = reg.get_run(run_id)
            if event == "completed":
                now = time.time()
                jobs = reg.jobs(run_id)
                if jobs and started is not None and jobs[-1].started_at is None:
                    jobs[-1].started_at = started
                data = completed_data(run, jobs, now) | {k: v for k, v in data.items() if v is not None}
            notify(reg, run, event, data, key)
        finally:
            reg.close()
    except Exception as e:  # the registry cannot be opened or read here: logged, the run goes on
        log_miss(run_dir, key or event, event, [f"{type(e).__name__}: {e}"])


def save_settings(run_dir: str | Path) -> NotifySettings | None:
    """Copy the user's [notify] (planning.user_config) into the run directory, 0600 (the URLs are
    secrets), so every observer uses what the run was submitted with; submit calls it. A bad config
    is the caller's one-line error; no config writes nothing."""
    from clusterctl.planning.user_config import read_notify
    from vltrain.common.atomic import atomic_write

    conf = read_notify()
    if conf is not None:
        atomic_write(RunDir(run_dir).notify, json.dumps(conf.to_json(), indent=1) + "\n", mode=0o600)
    return conf


def observed(
    reg: Registry,
    runs: list[RunRecord],
    jobs: Mapping[str, list[Any]],
    changed: Mapping[str, str],
    requeued: list[tuple[str, str, int]],
    now: float,
) -> None:
    """What a status refresh saw change, notified (runs.status.refresh calls it when something did):
    a run newly RUNNING (started), COMPLETED, ended otherwise for good (FAILED or NODE_FAIL the retry
    policy will not resubmit: a retry is lifecycle's to notify; TIMEOUT or PREEMPTED not requeued), and each new requeue (run id, job id, its requeue count). The
    keys are those the job and lifecycle use. One query for what was sent already; a run's settings
    are read only for what is left."""
    from clusterctl.specs import FAILURE_STATES, RunState

    ended_badly = FAILURE_STATES | {RunState.TIMEOUT, RunState.PREEMPTED}  # not requeued: the run is over
    by_id = {r.run_id: r for r in runs}
    todo: list[tuple[RunRecord, str, str]] = []  # (run, event, key)
    for run_id, state in changed.items():
        run, last = by_id[run_id], (jobs[run_id] or [None])[-1]
        if state == RunState.RUNNING:
            todo.append((run, "started", "started"))
        elif state == RunState.COMPLETED:
            todo.append((run, "completed", "completed"))
        elif state in ended_badly and last is not None and not _will_retry(run, jobs[run_id]):
            todo.append((run, "failed", f"failed:{last.job_id}"))
    todo += [(by_id[r], "requeued", f"requeued:{j}:{n}") for r, j, n in requeued]
    if not todo or reg.readonly:
        return
    sent = reg.notified_keys({run.run_id for run, _, _ in todo})
    for run, event, key in todo:
        if key in sent[run.run_id] or not os.path.exists(os.path.join(run.run_dir, RunDir.NOTIFY)):  # no pathlib: cheap
            continue
        try:
            data = _data(run, event, jobs[run.run_id], key, now)
        except Exception:  # a file that cannot be read: the event is still told, with fewer facts
            data = {}
        notify(reg, run, event, data, key)


def _will_retry(run: RunRecord, jobs: list[Any]) -> bool:
    """Will lifecycle.reconcile resubmit this failed run (a cluster failure, retries left, not the user's)?"""
    from clusterctl.runs.artifacts import user_failure
    from clusterctl.runs.retry import should_retry

    return should_retry(run, jobs) and not user_failure(run.run_dir, jobs[-1].job_id)


def _data(run: RunRecord, event: str, jobs: list[Any], key: str, now: float) -> dict[str, Any]:
    from clusterctl.backends import get_backend

    last = jobs[-1] if jobs else None
    job_id = last.job_id if last else None
    if event == "started":
        return {"job_id": job_id, "nodes": last.node_list if last else None}
    if event == "completed":
        return completed_data(run, jobs, now, get_backend(run.executor).has_accounting)
    if event == "failed" and last is not None:  # the words lifecycle and the follow-up job use
        from clusterctl.runs.artifacts import failure_reason
        from clusterctl.runs.retry import failure_words

        return {"job_id": job_id, "reason": failure_reason(run.run_dir, job_id) or failure_words(last)}
    _, job, count = key.split(":")
    return {"job_id": job, "count": int(count), "reason": requeue_reason(run.run_dir)}


def requeue_reason(run_dir: str | Path) -> str:
    """Why the run was requeued, from the trainer's last event (it writes "timeout" or "preempt" before
    submitit requeues); "time-out or preemption" when that is not the last one any more."""
    from clusterctl.runs.artifacts import tail_json

    last = (tail_json(RunDir(run_dir).events) or {}).get("event")
    return {"timeout": "time-out", "preempt": "preemption"}.get(str(last), "time-out or preemption")
