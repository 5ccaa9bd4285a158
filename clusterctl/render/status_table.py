"""The `clusterctl status` listing: aligned plain-text columns that fit the terminal (pure but for
asking the terminal its width)."""

from __future__ import annotations

import math
import os
from typing import Any

from clusterctl.render.safe import printable
from clusterctl.render.units import duration, step_text

COLUMNS = (
    ("RUN", "<"),
    ("JOB", "<"),
    ("PROFILE", "<"),
    ("STATE", "<"),
    ("RQ", ">"),
    ("STEP", ">"),
    ("LOSS", ">"),
    ("SAMPLES/S", ">"),
    ("ETA", ">"),
    ("ELAPSED", ">"),
    ("GPU-H", ">"),
)


DROP_ORDER = ("SAMPLES/S", "PROFILE", "ELAPSED", "JOB")  # hidden first when the terminal is narrow


def table_lines(runs: list[dict[str, Any]], width: int | None = None) -> tuple[list[str], list[str]]:
    """The status listing as aligned text lines (header first), and the columns left out to fit
    `width` (None: all columns). RUN, STATE, RQ, RES, STEP, LOSS, ETA and GPU-H are always kept.

    Formatted by hand, not with rich's Table: rich measures every cell through its renderable
    protocol (~40 ms for 50 rows, a sixth of what the whole command may cost), and a fixed set
    of plain columns needs none of that. RQ is `requeues` (the scheduler restarted a job under
    its id: Slurm's count, 0 for local runs), RES is `resumes` (the trainer continued from a
    checkpoint, whatever restarted it), as in --json, watch and reports; RES is left out when no
    listed run has resumed. Every text cell goes through render.safe.printable.
    """
    columns = list(COLUMNS)
    with_res = any(r.get("resumes") for r in runs)
    if with_res:
        columns.insert(5, ("RES", ">"))
    cells = [[h for h, _ in columns]]
    for r in runs:
        step = "-" if r["step"] is None else f"{step_text(r['step'], True)}/{step_text(r['total_steps'], True)}"
        cells.append(
            [
                printable(r["run_id"]),
                printable(r["job_id"]),
                printable(r["profile"]),
                printable(r["state"]),
                str(r["requeues"]),
                *([str(r["resumes"])] if with_res else []),
                step,
                _fmt(r["loss"], "{:.4f}"),
                _fmt(r["samples_per_s"], "{:,.1f}"),
                duration(r["eta_s"]),
                duration(r["elapsed_s"]),
                f"{r['gpu_hours']:,.0f}" if r["gpu_hours"] >= 100 else f"{r['gpu_hours']:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    keep = list(range(len(columns)))
    hidden: list[str] = []

    def over() -> int:  # columns beyond `width` with the columns kept (2 spaces between them)
        return 0 if width is None else sum(widths[i] for i in keep) + 2 * (len(keep) - 1) - width

    for name in DROP_ORDER:
        if over() <= 0:
            break
        keep.remove(next(i for i, (h, _) in enumerate(columns) if h == name))
        hidden.append(name)
    if (excess := over()) > 0:  # last resort: cut run ids at the end; the prefix left is what commands accept
        widths[0] = max(12, widths[0] - excess)
        for row in cells[1:]:
            if len(row[0]) > widths[0]:
                row[0] = row[0][: widths[0] - 1] + "…"
    lines = ["  ".join(f"{row[i]:{columns[i][1]}{widths[i]}}" for i in keep).rstrip() for row in cells]
    return lines, hidden


def terminal_width() -> int | None:
    """Columns to fit: the terminal's, or $COLUMNS; None when output goes to a pipe or file (keep all)."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(1).columns if os.isatty(1) else None
    except OSError:
        return None


def print_status(data: dict[str, Any]) -> None:
    """The status answer (clusterctl.runs.status.collect) as a table, its notes and its source
    (plain text: render.text)."""
    from clusterctl.render.text import say

    if not data["runs"]:
        say("no runs yet: clusterctl submit --profile local")
    else:
        (header, *rows), hidden = table_lines(data["runs"], terminal_width())
        say(header, style="bold")
        if rows:
            say("\n".join(rows))
        if hidden:
            say(f"({', '.join(hidden)} hidden to fit the terminal; --json shows everything)", style="dim")
    for row in data["runs"]:  # why each shown run that ended without completing did, one line each
        if row.get("reason"):
            say(f"{printable(row['state'])} {printable(row['run_id'])}: {printable(row['reason'])}")
    for note in data["notes"]:
        say(f"note: {printable(note)}")
    if data["runs"] and data["source"] != "registry":
        say(f"source: {data['source']}", style="dim")


def _fmt(v: float | None, spec: str) -> str:
    """A figure, '-' when unknown; NaN and infinity as 'nan' / 'inf' (a diverged loss stays visible)."""
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return spec.format(v)
