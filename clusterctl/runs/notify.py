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
