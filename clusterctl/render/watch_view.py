"""What `clusterctl watch` shows, as pure functions of plain data, plus the incremental file tails.

`Tail` reads only the bytes appended since its last call (it keeps the offset and any partial last
line), so watching a weeks-long run never re-reads metrics.jsonl or a log. `run_panel` and
`summary_lines` turn a status row (clusterctl.runs.status.summarize) and a `RunView` into rich
renderables or text lines; they do no I/O and are unit-tested.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from clusterctl.render.fold import fold
from clusterctl.render.safe import cell, printable
from clusterctl.render.status_table import pending_text
from clusterctl.render.units import ENERGY_UNITS, co2, duration, energy, pick_unit, quantity, step_text
from clusterctl.runs.artifacts import eval_headline, metric_record, zero_shot
from clusterctl.specs import FINAL_STATES, RunState
from vltrain.common import safe_read

SPARK = "▁▂▃▄▅▆▇█"
OBJECTIVES = ("itc", "mlm", "caption")
HISTORY = 48


def sparkline(values: list[float], width: int = 24) -> str:
    """The last `width` values as block characters scaled between their min and max."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)][-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in vals)


class Tail:
    """New complete lines of a growing file since the last call; survives the file not existing yet
    and a truncation (a new attempt's log): then it starts over from the beginning."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self._partial = b""

    def lines(self, max_bytes: int = 1 << 20) -> list[str]:
        """At most `max_bytes` new bytes as lines; a FIFO or a device in the file's place is not
        read (safe_read: a note), nor a partial line longer than `max_bytes`."""
        try:
            f = safe_read.open_regular(self.path)
        except OSError:
            return []
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < self.offset:
                self.offset, self._partial = 0, b""
            if size == self.offset:
                return []
            skip = size - self.offset > max_bytes  # far behind (a first look at a long run): only the end
            f.seek(size - max_bytes if skip else self.offset)
            chunk = f.read(size - f.tell())
            self.offset = f.tell()
        if len(self._partial) > max_bytes:  # a "line" that never ends (a file of zeros): dropped
            self._partial = b""
        if skip:  # the first piece starts mid-line: drop it
            self._partial, chunk = b"", chunk.split(b"\n", 1)[-1]
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        return [c.decode("utf-8", "replace") for c in complete]


@dataclass
class RunView:
    """What the view remembers of one run between refreshes."""

    metrics: Tail
    log: Tail
    losses: dict[str, deque] = field(default_factory=lambda: {k: deque(maxlen=HISTORY) for k in ("loss", *OBJECTIVES)})
    last: dict[str, Any] = field(default_factory=dict)
    log_lines: deque = field(default_factory=lambda: deque(maxlen=3))
    energy_kwh: float = 0.0
    co2_kg: float = 0.0
    eval: dict[str, Any] = field(default_factory=dict)  # the latest eval.json (runs.artifacts.LatestEval)

    def feed_metrics(self, lines: list[str]) -> None:
        """New metrics.jsonl lines, read like status and reports read them (runs.artifacts.metric_record)."""
        for line in lines:
            rec = metric_record(line)
            if rec is None:
                continue
            self.last = rec
            for k, hist in self.losses.items():
                if isinstance(rec.get(k), (int, float)):
                    hist.append(float(rec[k]))

    def feed_log(self, lines: list[str]) -> None:
        for line in lines:
            if line.strip():
                self.log_lines.append(printable(line.rstrip()))


STATE_STYLES: dict[str, str] = {
    RunState.RUNNING: "green",
    RunState.COMPLETED: "bold green",
    RunState.PENDING: "yellow",
    RunState.REQUEUED: "yellow",
    RunState.SUBMITTING: "yellow",
}


def state_style(state: str) -> str:
    return STATE_STYLES.get(state, "red" if state in FINAL_STATES else "cyan")


def _number(v: object) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _loss(v: Any, spec: str) -> str | None:
    """A loss as text ('nan' and 'inf' shown as such: a diverged run must look diverged); None if none."""
    if not _number(v):
        return None
    return format(v, spec) if math.isfinite(v) else str(float(v))


def counts(row: Mapping[str, Any]) -> str:
    """Requeues and resumes, as status and reports count them (runs.status.RunStatus)."""
    return f"requeues {row.get('requeues', 0)}  resumes {row.get('resumes', 0)}"


def data_wait(m: dict[str, Any]) -> str | None:
    """The time a step spent blocked waiting for the loader's batches (metrics' data_wait_s), as
    ms/step and share of the step time; None when the run does not log it."""
    wait, step = m.get("data_wait_s"), m.get("step_time_s")
    if not _number(wait) or not math.isfinite(wait) or wait < 0:
        return None
    share = f" ({wait / step * 100:.0f}%)" if _number(step) and math.isfinite(step) and step > 0 else ""
    ms = wait * 1000
    return f"data wait {ms:.1f} ms/step{share}" if ms < 10 else f"data wait {ms:,.0f} ms/step{share}"


def stats_line(row: Mapping[str, Any], v: RunView) -> str:
    m = v.last
    sps = m.get("samples_per_s")
    mfu = m.get("mfu")
    return (
        (f"{sps:,.1f} samples/s" if _number(sps) else "- samples/s")
        + (f" | MFU {mfu * 100:.1f}%" if _number(mfu) else "")
        + (f" | {quantity(row.get('gpu_hours', 0.0))} GPU-h | {energy(v.energy_kwh)} | {co2(v.co2_kg)}")
    )


def eval_text(ev: Mapping[str, Any], width: int = 76) -> str | None:
    """The latest evaluation in one line for the run panel: zero-shot top-1 and top-5 with chance when
    the held-out shards have classes, and i2t R@1 where `width` leaves room (else i2t R@1 alone,
    runs.artifacts.eval_headline); None without one."""
    head = eval_headline(dict(ev))
    if head is None:
        return None
    at = f" step {step_text(head['step'])}" if head["step"] is not None else ""
    zs = zero_shot(dict(ev))
    if zs is None:
        return f"eval{at}: i2t R@1 {head['value']:.3f}" + (
            f" (chance {head['chance']:.4f})" if head["chance"] is not None else ""
        )
    top5 = f" top-5 {zs['top5']:.3f}" if _number(zs.get("top5")) and math.isfinite(zs["top5"]) else ""
    chance = f" (chance {head['chance']:.3f})" if head["chance"] is not None else ""
    text = f"eval{at}: zero-shot top-1 {zs['top1']:.3f}{top5}{chance}"
    r1 = ev.get("i2t", {}).get("R@1") if isinstance(ev.get("i2t"), dict) else None
    recall = f" | i2t R@1 {r1:.3f}" if _number(r1) and math.isfinite(r1) else ""
    return text + recall if len(text + recall) <= width else text


def run_panel(row: Mapping[str, Any], v: RunView, width: int = 80, now: float | None = None):
    """One run as a rich Panel sized for an 80x24 terminal (7 lines with borders, 8 once the run has an
    evaluation: its latest, zero-shot top-1 when the held-out shards have classes); its last line says
    why it ended, else why it waits to start (and when it is expected to), else the log's last line."""
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    state = row["state"]
    head = Text.assemble(
        (printable(row["name"]), "bold"),
        "  ",
        (printable(state), state_style(state)),
        f"  job {printable(row.get('job_id'))}",
        f"  nodes {printable(row.get('node_list'))}",
        f"  {counts(row)}",
    )
    step = v.last.get("step", row.get("step")) or 0
    total = row.get("total_steps") or 1
    bar = Table.grid(expand=True)
    bar.add_column(ratio=1)
    bar.add_column(no_wrap=True)
    bar.add_row(
        ProgressBar(total=total, completed=min(step, total), width=None),
        f" {step_text(step)}/{total} ETA {duration(row.get('eta_s'), 'clock')}"
        + (f" | {wait}" if (wait := data_wait(v.last)) else ""),
    )
    spark = Text()
    for k in ("loss", *OBJECTIVES):
        hist = v.losses[k]
        if hist:
            spark.append(f"{k} ", style="dim")
            spark.append(sparkline(list(hist), 10))
            spark.append(f" {_loss(hist[-1], '.3f')}  ")
    body = Table.grid()
    body.add_row(head)
    body.add_row(bar)
    body.add_row(spark if spark.plain else Text("waiting for the first logged step", style="dim"))
    body.add_row(Text(stats_line(row, v)))
    if ev := eval_text(v.eval, width=width - 4):
        body.add_row(Text(ev[: width - 4], style="cyan", no_wrap=True, overflow="ellipsis"))
    if row.get("reason"):  # why it ended says more than the log's last line
        body.add_row(Text(printable(row["reason"])[: width - 4], style="red", no_wrap=True, overflow="ellipsis"))
    elif waits := pending_text(row, now if now is not None else time.time()):  # why it has not started
        body.add_row(Text(f"pending: {waits}"[: width - 4], style="yellow", no_wrap=True, overflow="ellipsis"))
    else:
        for line in list(v.log_lines)[-1:]:  # escaped when fed (feed_log)
            body.add_row(Text(line[: width - 4], style="dim", no_wrap=True, overflow="ellipsis"))
    return Panel(body, title=cell(row["run_id"]), title_align="left", padding=(0, 1), width=width)


PANEL_LINES = 8  # a run_panel's height with borders, the evaluation line and the log line


def fits_panels(n_runs: int, height: int) -> bool:
    """Whether `n_runs` full panels and the footer fit the terminal; else the compact table is drawn."""
    return n_runs * PANEL_LINES + 1 <= height


def runs_table(rows: Sequence[Mapping[str, Any]], views: dict[str, RunView], width: int = 80, height: int = 24):
    """Many runs at once: one line each (state, progress, ETA, last loss and its trend, speed, cost),
    as many as fit above the footer; the ones left out are counted in the last line."""
    from rich.table import Table
    from rich.text import Text

    ef, eu = pick_unit([views[r["run_id"]].energy_kwh for r in rows], ENERGY_UNITS)  # one unit for the column
    t = Table(box=None, padding=(0, 1), expand=False, width=width, show_edge=False)
    for name, kw in (
        ("RUN", {"ratio": 1, "no_wrap": True, "overflow": "ellipsis", "min_width": 8}),
        ("STATE", {"no_wrap": True}),
        ("STEP", {"justify": "right", "no_wrap": True}),
        ("ETA", {"justify": "right", "no_wrap": True}),
        ("LOSS", {"no_wrap": True}),
        ("S/S", {"justify": "right", "no_wrap": True}),
        ("GPU-H", {"justify": "right", "no_wrap": True}),
        (eu, {"justify": "right", "no_wrap": True}),
    ):
        t.add_column(name, **kw)
    room = max(1, height - 3)  # header, footer, and the "more" line
    for row in rows[:room]:
        v = views[row["run_id"]]
        m = v.last
        step = m.get("step", row.get("step"))
        hist = list(v.losses["loss"])
        loss = Text(f"{_loss(hist[-1], '.3f')} " if hist else "- ")
        loss.append(sparkline(hist, 6), style="dim")
        sps = m.get("samples_per_s")
        t.add_row(
            cell(row["name"]),
            cell(row["state"], style=state_style(row["state"])),
            f"{step_text(step)}/{row.get('total_steps')}",
            duration(row.get("eta_s"), "clock"),
            loss,
            f"{sps:,.0f}" if _number(sps) else "-",
            quantity(row.get("gpu_hours", 0.0)),
            quantity(v.energy_kwh * ef),
        )
    if len(rows) <= room:
        return t
    from rich.console import Group

    more = Text(f"... {len(rows) - room} more (clusterctl watch RUN ... to pick)", style="dim", no_wrap=True)
    return Group(t, more)


def plain_line(row: Mapping[str, Any], v: RunView, now: float | None = None) -> str:
    """The non-TTY progress line of a run (with why it waits to start, while it does)."""
    m = v.last
    loss = f" loss {text}" if (text := _loss(m.get("loss"), ".4f")) else ""
    step = m.get("step", row.get("step"))
    return (
        f"{printable(row['run_id'])} {printable(row['state'])} step {step_text(step)}"
        f"/{row.get('total_steps')}{loss} {counts(row)} | {stats_line(row, v)}"
        + (f" | {wait}" if (wait := data_wait(m)) else "")
        + (f" | {printable(row['reason'])}" if row.get("reason") else "")
        + (f" | pending: {waits}" if (waits := pending_text(row, now if now is not None else time.time())) else "")
    )


def summary_lines(rows: Sequence[Mapping[str, Any]], views: dict[str, RunView], evals: dict[str, dict]) -> list[str]:
    """The one-screen summary printed when every watched run has finished."""
    out = [f"{len(rows)} run(s) finished"]
    for row in rows:
        v = views[row["run_id"]]
        m = v.last
        loss = _loss(m.get("loss"), ".4f") or "-"
        step = m.get("step", row.get("step"))
        out.append(  # folded at spaces to the terminal: a long run id must not push a figure over the edge
            fold(
                f"{printable(row['run_id'])}: {printable(row['state'])}, "
                f"step {step_text(step)}/{row.get('total_steps')}, final loss {loss}, "
                f"requeues {row.get('requeues', 0)}, resumes {row.get('resumes', 0)}, "
                f"elapsed {duration(row.get('elapsed_s'), 'clock')}"
            )
        )
        out.append(f"  {quantity(row.get('gpu_hours', 0.0))} GPU-h, {energy(v.energy_kwh)}, {co2(v.co2_kg)}")
        if row.get("reason"):
            out.append(f"  why: {printable(row['reason'])}")
        ev = evals.get(row["run_id"])
        if ev:
            out.append("  eval: " + "  ".join(f"{printable(k)} {val:.3f}" for k, val in ev.items()))
    return out
