"""The `clusterctl status` listing: aligned plain-text columns that fit the terminal (pure but for
asking the terminal its width)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
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


DROP_ORDER = ("SAMPLES/S", "PROFILE", "ELAPSED", "JOB", "EVAL")  # hidden first when the terminal is narrow


def table_lines(runs: list[dict[str, Any]], width: int | None = None) -> tuple[list[str], list[str]]:
    """The status listing as aligned text lines (header first), and the columns left out to fit
    `width` (None: all columns). RUN, STATE, RQ, RES, STEP, LOSS, ETA and GPU-H are always kept.
    EVAL (when a listed run has an eval.json: the row's "eval", runs.artifacts.eval_headline) is the
    latest held-out evaluation: zero-shot top-1 ("top-1 0.812") when the held-out shards have
    classes, else image-to-text Recall@1 ("R@1 0.152").

    Formatted by hand, not with rich's Table: rich measures every cell through its renderable
    protocol (~40 ms for 50 rows, a sixth of what the whole command may cost), and a fixed set
    of plain columns needs none of that. RQ is `requeues` (the scheduler restarted a job under
    its id: Slurm's count, 0 for local runs), RES is `resumes` (the trainer continued from a
    checkpoint, whatever restarted it), as in --json, watch and reports; RES is left out when no
    listed run has resumed. Every text cell goes through render.safe.printable.

    A run id is never cut (it is what every other command takes): when the columns still do not fit
    with the least needed ones hidden, each run's id goes on a line of its own, its figures under it
    (indented, the header naming them), and the columns are fitted again without RUN.
    """
    columns = list(COLUMNS)
    with_res = any(r.get("resumes") for r in runs)
    if with_res:
        columns.insert(5, ("RES", ">"))
    with_eval = any(r.get("eval") for r in runs)
    if with_eval:
        columns.insert(columns.index(("LOSS", ">")) + 1, ("EVAL", ">"))
    cells = [[h for h, _ in columns]] + [_cells(r, with_res, with_eval) for r in runs]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    keep, hidden = _fit(columns, widths, list(range(len(columns))), width)
    if width is None or _used(widths, keep) <= width:
        return [_line(row, columns, widths, keep) for row in cells], hidden
    keep, hidden = _fit(columns, widths, list(range(1, len(columns))), width - len(INDENT))
    lines = [INDENT + _line(cells[0], columns, widths, keep)]
    for row in cells[1:]:
        lines += [row[0], INDENT + _line(row, columns, widths, keep)]
    return lines, hidden


INDENT = "  "  # a run's figures under its id, when the id has a line of its own


def eval_words(headline: Mapping[str, Any]) -> str:
    """A run's latest evaluation as words: 'eval step 300: zero-shot top-1 0.812 (chance 0.100)'."""
    at = f" step {step_text(headline['step'])}" if isinstance(headline.get("step"), (int, float)) else ""
    name, digits = ("zero-shot top-1", 3) if headline["metric"] == "top-1" else ("i2t R@1", 4)
    chance = headline.get("chance")
    odds = f" (chance {chance:.{digits}f})" if isinstance(chance, (int, float)) else ""
    return f"eval{at}: {name} {_fmt(headline['value'], '{:.3f}')}{odds}"


def eval_cell(headline: Mapping[str, Any] | None) -> str:
    """A run's latest evaluation in a few characters: 'top-1 0.812' (zero-shot) or 'R@1 0.152'; '-' if none."""
    if not headline:
        return "-"
    return f"{printable(headline['metric'])} {_fmt(headline['value'], '{:.3f}')}"


def _cells(r: dict[str, Any], with_res: bool, with_eval: bool = False) -> list[str]:
    step = "-" if r["step"] is None else f"{step_text(r['step'], True)}/{step_text(r['total_steps'], True)}"
    return [
        printable(r["run_id"]),
        printable(r["job_id"]),
        printable(r["profile"]),
        printable(r["state"]),
        str(r["requeues"]),
        *([str(r["resumes"])] if with_res else []),
        step,
        _fmt(r["loss"], "{:.4f}"),
        *([eval_cell(r.get("eval"))] if with_eval else []),
        _fmt(r["samples_per_s"], "{:,.1f}"),
        duration(r["eta_s"]),
        duration(r["elapsed_s"]),
        f"{r['gpu_hours']:,.0f}" if r["gpu_hours"] >= 100 else f"{r['gpu_hours']:.2f}",
    ]


def _used(widths: list[int], keep: list[int]) -> int:
    """Columns taken by the kept columns, 2 spaces between them."""
    return sum(widths[i] for i in keep) + 2 * (len(keep) - 1)


def _fit(
    columns: list[tuple[str, str]], widths: list[int], keep: list[int], width: int | None
) -> tuple[list[int], list[str]]:
    """`keep` less the columns of DROP_ORDER, in that order, until the rest fit `width` (or none is left to drop)."""
    keep, hidden = list(keep), []
    for name in DROP_ORDER:
        if width is None or _used(widths, keep) <= width:
            break
        at = next((i for i, (h, _) in enumerate(columns) if h == name), None)
        if at is None or at not in keep:  # a column not shown (EVAL: no run has an evaluation)
            continue
        keep.remove(at)
        hidden.append(name)
    return keep, hidden


def _line(row: list[str], columns: list[tuple[str, str]], widths: list[int], keep: list[int]) -> str:
    return "  ".join(f"{row[i]:{columns[i][1]}{widths[i]}}" for i in keep).rstrip()


def pending_text(row: Mapping[str, Any], now: float) -> str | None:
    """Why a run's job waits to start, and when the scheduler expects it to, in one line (None when it
    does not wait): the scheduler's code, its meaning where known, the expected start as local time."""
    reason = row.get("pending_reason")
    if not reason:
        return None
    detail = row.get("pending_detail")
    text = printable(reason) + (f" ({printable(detail)})" if detail else "")
    start = row.get("expected_start")
    if not isinstance(start, (int, float)) or isinstance(start, bool) or not math.isfinite(start):
        return f"{text}; no expected start yet"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
    return f"{text}; expected start {when}" + (f" (in {duration(start - now)})" if start > now else " (due)")


def print_status(data: dict[str, Any]) -> None:
    """The status answer (clusterctl.runs.status.collect) as a table, its notes and its source
    (plain text: render.text). A terminal too narrow for the EVAL column gets a line per evaluated run."""
    from clusterctl.render.fold import fold
    from clusterctl.render.text import say, terminal_width

    if not data["runs"]:
        say("no runs yet: clusterctl submit --profile local")
    else:
        (header, *rows), hidden = table_lines(data["runs"], terminal_width())
        say(header, style="bold")
        if rows:
            say("\n".join(rows))
        if "EVAL" in hidden:  # too narrow for the column: a line for each run's latest evaluation instead
            hidden.remove("EVAL")
            for row in data["runs"]:
                if row.get("eval"):
                    say(fold(f"{printable(row['run_id'])} {eval_words(row['eval'])}"))
        if hidden:
            say(fold(f"({', '.join(hidden)} hidden to fit the terminal; --json shows everything)"), style="dim")
    now = time.time()
    for row in data["runs"]:  # why each shown run that ended without completing did, or waits: one line each
        if why := row.get("reason") or pending_text(row, now):
            say(f"{printable(row['state'])} {printable(row['run_id'])}: {printable(why)}")
    for line in provenance_lines(data["runs"]):
        say(fold(line))
    for note in data["notes"]:
        say(f"note: {printable(note)}")
    if data["runs"] and data["source"] != "registry":
        say(f"source: {data['source']}", style="dim")


def commit_text(commit: Any, dirty: Any) -> str | None:
    """A commit as people quote it: its first 8 hex digits, "+dirty" when the tree had changes."""
    if not isinstance(commit, str) or not commit:
        return None
    return printable(commit[:8]) + ("+dirty" if dirty is True else "")


def provenance_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Under the table: the nodes each run's retries exclude (runs that have some), and, for one run
    (`status RUN`), the commit it was submitted from, its fork's origin and its latest attempt's time to
    first step."""
    lines = []
    for row in runs:
        if nodes := row.get("excluded_nodes"):
            lines.append(f"{printable(row['run_id'])}: retries exclude {printable(', '.join(map(str, nodes)))}")
    if len(runs) == 1 and (commit := commit_text(runs[0].get("commit"), runs[0].get("dirty"))):
        lines.append(f"{printable(runs[0]['run_id'])}: submitted from commit {commit}")
    if len(runs) == 1 and isinstance(lin := runs[0].get("lineage"), dict):  # submit --from (runs.fork)
        how = "weights only, from step 0" if lin.get("weights_only") else "weights and optimizer"
        said = f"forked from {printable(str(lin.get('from_run')))} at step {lin.get('from_step')} ({how})"
        lines.append(f"{printable(runs[0]['run_id'])}: {said}")
    if len(runs) == 1 and (start := startup_text(runs[0].get("startup"))):
        lines.append(f"{printable(runs[0]['run_id'])}: {start}")
    return lines


def startup_text(startup: Any) -> str | None:
    """A start-up (runs.artifacts.startup_headline) as the job log says it (vltrain.startup.log_line):
    the first step's time after the process started and the phases of 0.1 s or more, in order."""
    if not isinstance(startup, dict) or not isinstance(startup.get("total_s"), (int, float)):
        return None
    phases = startup.get("phases")
    steps = phases.items() if isinstance(phases, dict) else ()
    big = ", ".join(f"{printable(str(k))} {v:.1f}" for k, v in steps if isinstance(v, (int, float)) and v >= 0.1)
    attempt = f" (attempt {startup['attempt']})" if startup.get("attempt") else ""
    return f"first step {startup['total_s']:.1f} s after the process started{attempt}: {big or 'no phase over 0.1 s'}"


def _fmt(v: float | None, spec: str) -> str:
    """A figure, '-' when unknown; NaN and infinity as 'nan' / 'inf' (a diverged loss stays visible)."""
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return spec.format(v)
