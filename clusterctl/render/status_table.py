"""The `clusterctl status` listing: aligned plain-text columns that fit the terminal (pure but for
asking the terminal its width)."""

from __future__ import annotations

import os
from typing import Any

from clusterctl.backends import get_backend
from clusterctl.render.units import duration

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
    `width` (None: all columns). RUN, STATE, RQ, STEP, LOSS, ETA and GPU-H are always kept.

    Formatted by hand, not with rich's Table: rich measures every cell through its renderable
    protocol (~40 ms for 50 rows, a sixth of what the whole command may cost), and a fixed set
    of plain columns needs none of that. RQ is Slurm's requeue count, or the trainer's resume
    events for local runs.
    """
    cells = [[h for h, _ in COLUMNS]]
    for r in runs:
        rq = r["requeues"] if get_backend(r["executor"]).requeues_itself else r["resumes"]
        step = "-" if r["step"] is None else f"{r['step']:,.0f}/{r['total_steps']:,}"
        cells.append(
            [
                r["run_id"],
                r["job_id"] or "-",
                r["profile"],
                r["state"],
                str(rq),
                step,
                _fmt(r["loss"], "{:.4f}"),
                _fmt(r["samples_per_s"], "{:,.1f}"),
                duration(r["eta_s"]),
                duration(r["elapsed_s"]),
                f"{r['gpu_hours']:,.0f}" if r["gpu_hours"] >= 100 else f"{r['gpu_hours']:.2f}",
            ]
        )
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


def print_status(data: dict[str, Any]) -> None:
    """The status answer (clusterctl.runs.status.collect) as a table, its notes and its source."""
    from clusterctl.render.output import console

    if not data["runs"]:
        console.print("no runs yet: clusterctl submit --profile local")
    else:
        (header, *rows), hidden = table_lines(data["runs"], terminal_width())
        console.print(header, style="bold", markup=False, highlight=False, soft_wrap=True)
        if rows:
            console.print("\n".join(rows), markup=False, highlight=False, soft_wrap=True)
        if hidden:
            console.print(
                f"({', '.join(hidden)} hidden to fit the terminal; --json shows everything)",
                style="dim",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    for row in data["runs"]:  # why each shown run that ended without completing did, one line each
        if row.get("reason"):
            console.print(
                f"{row['state']} {row['run_id']}: {row['reason']}", markup=False, highlight=False, soft_wrap=True
            )
    for note in data["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if data["runs"] and data["source"] != "registry":
        console.print(f"source: {data['source']}", style="dim", markup=False, highlight=False)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else spec.format(v)
