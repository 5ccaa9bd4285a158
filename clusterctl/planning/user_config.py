"""The user's own settings file: `[notify]` (webhooks told about a run's events), parsed and checked.

The file is ~/.config/clusterctl/config.toml (platformdirs' user config dir, beside profiles/), or the
file $CLUSTERCTL_CONFIG names. It is the user's, not a profile's: the webhook URLs are secrets (a Slack
incoming-webhook URL is its own credential), so they are never printed whole (`mask`). submit copies the
resolved `[notify]` into the run directory (RunDir.notify, 0600, the same keys as JSON), and every
observer of the run (the job, the follow-up job, a later command on another machine) reads that copy:
what the run was submitted with, whatever the config says later.

    [notify]
    timeout_s = 5                                   # per webhook call; (0, 30], default 5
    events = ["failed", "completed"]                # optional: the default of every webhook (else all five)

    [[notify.webhooks]]
    url = "https://hooks.slack.com/services/T000/B000/XXXX"
    events = ["started", "failed", "completed"]     # optional: this webhook's events

Parsing is pure (`parse_notify`); `read_notify` is the edge that finds and reads the file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vltrain.common.errors import UserError

EVENTS = ("started", "requeued", "retried", "failed", "completed")
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 30.0  # the job's rank 0 waits for it: a hung webhook must not hold training long
MAX_WEBHOOKS = 16
_NOTIFY_KEYS = ("timeout_s", "events", "webhooks")
_WEBHOOK_KEYS = ("url", "events")


@dataclass(frozen=True)
class Webhook:
    """One URL that gets a Slack-compatible JSON body ({"text": one line}) for each of its events."""

    url: str
    events: tuple[str, ...] = EVENTS


@dataclass(frozen=True)
class NotifySettings:
    webhooks: tuple[Webhook, ...]
    timeout_s: float = DEFAULT_TIMEOUT_S

    def for_event(self, event: str) -> tuple[Webhook, ...]:
        return tuple(w for w in self.webhooks if event in w.events)

    def to_json(self) -> dict[str, Any]:
        """The run directory's copy: the same keys as the [notify] table, so parse_notify reads it back."""
        return {
            "timeout_s": self.timeout_s,
            "webhooks": [{"url": w.url, "events": list(w.events)} for w in self.webhooks],
        }

    def describe(self) -> str:
        """One line for dry-run and status: how many webhooks, masked, and their events."""
        parts = [
            f"{mask(w.url)} ({', '.join(w.events) if w.events != EVENTS else 'all events'})" for w in self.webhooks
        ]
        return f"{len(self.webhooks)} webhook{'s' if len(self.webhooks) != 1 else ''}: " + "; ".join(parts)


def mask(url: str) -> str:
    """A webhook URL without its secret: scheme and host, the path hidden ('https://hooks.slack.com/…')."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<not a URL>"
    return f"{parts.scheme}://{host}{port}/…" if parts.scheme else "<not a URL>"


# --- pure ---------------------------------------------------------------------------------------


def parse_notify(doc: dict[str, Any], source: str) -> NotifySettings | None:
    """The [notify] table of a parsed config document (or a run directory's copy under "notify");
    None when there is none or it names no webhook. Every problem is one line naming `source` and
    the field, and what is allowed."""
    unknown = sorted(set(doc) - {"notify"})
    if unknown:
        raise UserError(f"{source}: unknown table or key {unknown[0]!r}; allowed: notify")
    table = doc.get("notify")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UserError(f"{source}: notify must be a table; allowed: [notify] with [[notify.webhooks]]")
    unknown = sorted(set(table) - set(_NOTIFY_KEYS))
    if unknown:
        raise UserError(f"{source}: notify.{unknown[0]} is not known; allowed: {', '.join(_NOTIFY_KEYS)}")
    timeout = table.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise UserError(f"{source}: notify.timeout_s = {timeout!r}; allowed: seconds, > 0 and <= {MAX_TIMEOUT_S:g}")
    default = _events(table["events"], f"{source}: notify.events") if "events" in table else EVENTS
    hooks = table.get("webhooks", [])
    if not isinstance(hooks, list) or not all(isinstance(h, dict) for h in hooks):
        raise UserError(f"{source}: notify.webhooks must be an array of tables; allowed: [[notify.webhooks]] url = ...")
    if len(hooks) > MAX_WEBHOOKS:
        raise UserError(f"{source}: notify.webhooks has {len(hooks)} entries; allowed: at most {MAX_WEBHOOKS}")
    out = []
    for i, h in enumerate(hooks):
        where = f"{source}: notify.webhooks[{i}]"
        unknown = sorted(set(h) - set(_WEBHOOK_KEYS))
        if unknown:
            raise UserError(f"{where}.{unknown[0]} is not known; allowed: {', '.join(_WEBHOOK_KEYS)}")
        out.append(
            Webhook(
                _url(h.get("url"), f"{where}.url"),
                _events(h["events"], f"{where}.events") if "events" in h else default,
            )
        )
    return NotifySettings(tuple(out), float(timeout)) if out else None


def _url(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise UserError(f"{where}: missing or not text; allowed: an http:// or https:// URL")
    try:
        parts = urlsplit(v)
        _ = parts.port  # a port that is not a number raises here
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok or any(c.isspace() or ord(c) < 32 for c in v):
        raise UserError(f"{where}: {mask(v)} is not an http(s) URL; allowed: http://HOST/... or https://HOST/...")
    return v


def _events(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(e, str) for e in v):
        raise UserError(f"{where}: must be a list of event names; allowed: {', '.join(EVENTS)}")
    bad = [e for e in v if e not in EVENTS]
    if bad:
        raise UserError(f"{where}: {bad[0]!r} is not an event; allowed: {', '.join(EVENTS)}")
    return tuple(e for e in EVENTS if e in v)  # in the events' order, each once


# --- the file (edge) ----------------------------------------------------------------------------


def config_path() -> Path:
    """$CLUSTERCTL_CONFIG, else config.toml in the user config dir (where profiles/ is)."""
    env = os.environ.get("CLUSTERCTL_CONFIG")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    # config.toml, spelled apart: the run directory's config.toml (RunDir.CONFIG) is another file, and
    # test_architecture keeps that quoted name to vltrain.rundir
    return (Path(user_config_dir("clusterctl")) / "config").with_suffix(".toml")


def read_notify(path: Path | None = None) -> NotifySettings | None:
    """The user's [notify] settings; None when the file does not exist (unless $CLUSTERCTL_CONFIG
    names it: then a missing file is an error) or has no webhook."""
    path = config_path() if path is None else path
    named = path is not None and bool(os.environ.get("CLUSTERCTL_CONFIG"))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if named:
            raise UserError(
                f"CLUSTERCTL_CONFIG: {str(path)!r} does not exist; allowed: a TOML file, or unset it"
            ) from None
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: cannot be read ({getattr(e, 'strerror', None) or e}); allowed: a readable UTF-8 TOML file"
        ) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e}); allowed: a TOML file with a [notify] table") from None
    return parse_notify(doc, str(path))
