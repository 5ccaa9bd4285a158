"""What `clusterctl compare` prints: the runs (each a letter, its id whole once), the config keys that
differ, a grid of final and best figures with a column per run, and a sparkline of each run's total
loss; or the loss curves overlaid in a PNG (--plot, render.plots' style). Pure text functions but for
`print_compare` and `compare_plot`.

Runs are columns, figures rows: a sweep of eight points is eight narrow columns, and the grid is cut
into blocks of as many runs as fit the width (80 columns), never a number cut.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from clusterctl.render.safe import printable
from clusterctl.render.watch_view import SPARK
from clusterctl.runs.compare import ABSENT, Figures

SPARK_WIDTH = 40
LONG_VALUE = 24  # characters of a config value the differences grid holds; longer ones get lines of their own
EVAL_ROWS = (
    ("i2t R@1 %", "i2t_r1"),
    ("i2t R@5 %", "i2t_r5"),
    ("i2t R@10 %", "i2t_r10"),
    ("t2i R@1 %", "t2i_r1"),
    ("t2i R@5 %", "t2i_r5"),
    ("t2i R@10 %", "t2i_r10"),
    ("zero-shot top-1 %", "zero_shot_top1"),
)


def letter(i: int) -> str:
    """A, B, ..., Z, AA, AB, ...: a run's short name in the grid."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def number(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return printable(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # nan, inf: a diverged run must look diverged
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def percent(v: Any) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "-"


def value_text(v: Any) -> str:
    """A config value in one cell: numbers short, lists and tables as compact JSON."""
    if v == ABSENT or isinstance(v, str):
        return printable(v) if v else '""'
    if isinstance(v, (list, dict)):
        import json

        return printable(json.dumps(v, default=str))  # ", " and ": ": a long one folds at its spaces
    return number(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else printable(v)


def money_text(m: dict[str, Any] | None) -> str | None:
    """The cost cell: planning.cost.money's total in its currency (None: no price set)."""
    if not m or not isinstance(m.get("total"), (int, float)):
        return None
    from clusterctl.planning.cost import amount_text

    return amount_text(m["total"], printable(m.get("currency")))


def figure_rows(figs: list[Figures]) -> list[tuple[str, list[str]]]:
    """The grid's rows (label, a cell per run); a row no run has a figure for is left out."""
    rows: list[tuple[str, list[str]]] = [("state", [printable(f.run.state) for f in figs])]
    rows.append(("steps logged", [str(f.steps) if f.steps else "none yet" for f in figs]))
    keys = list(dict.fromkeys(k for f in figs for k in f.losses))
    for k in keys:
        name = "total loss" if k == "loss" else k
        rows.append((f"{name} final", [number(f.losses[k]["final"]) if k in f.losses else "-" for f in figs]))
        best = []
        for f in figs:
            b = f.losses.get(k)
            best.append("-" if not b or b["best"] is None else f"{number(b['best'])} @{number(b['best_step'])}")
        rows.append((f"{name} best", best))
    for label, key in EVAL_ROWS:  # in percent, as `report eval` shows them
        cells = [percent((f.eval or {}).get(key)) for f in figs]
        if any(c != "-" for c in cells):
            rows.append((label, cells))
    rows.append(("GPU-hours", [f"{f.usage['gpu_hours']:.3g}" for f in figs]))
    rows.append(("energy kWh", [f"{f.usage['energy_kwh']:.3g}" if f.usage["energy_files"] else "-" for f in figs]))
    money = [money_text(f.money) for f in figs]
    if any(money):
        rows.append(("cost", [m or "-" for m in money]))
    rows.append(("commit", [(f.commit[:10] + ("+dirty" if f.dirty else "")) if f.commit else "-" for f in figs]))
    return rows


def grid(title: str, rows: list[tuple[str, list[str]]], heads: list[str], width: int | None) -> list[str]:
    """Rows of a label and a cell per column, the columns cut into blocks that fit `width` (None:
    one block); each block repeats the labels."""
    lw = max([len(title), *(len(label) for label, _ in rows)])
    cols = list(range(len(heads)))
    widths = [max([len(heads[i]), *(len(cells[i]) for _, cells in rows)]) for i in cols]
    blocks: list[list[int]] = [[]]
    used = 1 + lw
    for i in cols:
        if blocks[-1] and width is not None and used + 3 + widths[i] > width:
            blocks.append([])
            used = 1 + lw
        blocks[-1].append(i)
        used += 3 + widths[i]
    out = []
    for block in blocks:
        out.append(" " + title.ljust(lw) + "".join("   " + heads[i].rjust(widths[i]) for i in block))
        out.append(" " + "\u2500" * (lw + sum(3 + widths[i] for i in block)))
        out += [
            " " + label.ljust(lw) + "".join("   " + cells[i].rjust(widths[i]) for i in block) for label, cells in rows
        ]
        out.append("")
    return out


def sparkline(points: list[tuple[float, float]], width: int = SPARK_WIDTH) -> str:
    """The whole curve in at most `width` block characters (each the mean of its share of the
    points), scaled between the lowest and highest of them."""
    vals = [v for _, v in points]
    if not vals:
        return ""
    n = min(width, len(vals))
    means = []
    for i in range(n):
        part = vals[i * len(vals) // n : (i + 1) * len(vals) // n]
        means.append(sum(part) / len(part))
    lo, hi = min(means), max(means)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in means)


def run_lines(figs: list[Figures]) -> list[str]:
    """Each run's letter and whole id, its sweep point and lineage on lines of their own."""
    out = []
    for i, f in enumerate(figs):
        r = f.run
        out.append(f" {letter(i):>2}  {printable(r.run_id)}  {printable(r.profile)}")
        sweep = r.plan.get("sweep")
        if isinstance(sweep, dict):
            out.append(f"     sweep {printable(sweep.get('id'))} point {printable(sweep.get('index'))}")
        lin = r.plan.get("lineage")
        if isinstance(lin, dict):
            how = " (weights only)" if lin.get("weights_only") else ""
            out.append(f"     from {printable(lin.get('from_run'))}@{printable(lin.get('from_step'))}{how}")
    return out


def differences(diffs: dict[str, list[Any]], heads: list[str], width: int | None) -> list[str]:
    """The keys that differ: a grid of those whose values are short; after it, each key with a long
    value (a stage list, a path) on a line of its own and every run's value under it, folded at its
    spaces to `width` (a value is never cut)."""
    import textwrap

    cells = {k: [value_text(v) for v in vals] for k, vals in diffs.items()}
    short = [(printable(k), c) for k, c in cells.items() if max(map(len, c)) <= LONG_VALUE]
    out = grid("key", short, heads, width) if short else []
    for k, c in cells.items():
        if max(map(len, c)) <= LONG_VALUE:
            continue
        out.append(f" {printable(k)}")
        pad = " " * (6 + max(map(len, heads)))
        for head, text in zip(heads, c, strict=True):
            lines = textwrap.wrap(text, max(20, (width or 10**6) - len(pad)), break_long_words=False,
                                  break_on_hyphens=False) or [text]  # fmt: skip
            out.append(f"    {head:<{len(pad) - 6}}  {lines[0]}")
            out += [pad + line for line in lines[1:]]
        out.append("")
    return out


def compare_text(figs: list[Figures], diffs: dict[str, list[Any]], width: int | None) -> str:
    """The whole human output (no notes)."""
    heads = [letter(i) for i in range(len(figs))]
    out = [f"compare: {len(figs)} run{'s' * (len(figs) != 1)}", *run_lines(figs), ""]
    if diffs:
        out.append(f"config: {len(diffs)} key{'s differ' if len(diffs) != 1 else ' differs'}")
        out += differences(diffs, heads, width)
    else:
        out += ["config: no key differs", ""]
    out += grid("figure", figure_rows(figs), heads, width)
    out.append("total loss by step (first -> last logged)")
    for i, f in enumerate(figs):
        if not f.curve:
            out.append(f" {heads[i]:>2}  no metrics yet")
            continue
        first, last = f.curve[0], f.curve[-1]
        ends = f"{number(first[1])} -> {number(last[1])}, steps {number(first[0])}-{number(last[0])}"
        room = SPARK_WIDTH if width is None else max(8, min(SPARK_WIDTH, width - 7 - len(heads[i]) - len(ends)))
        out.append(f" {heads[i]:>2}  {sparkline(f.curve, room)}  {ends}")
    return "\n".join(out) + "\n"


def print_compare(figs: list[Figures], diffs: dict[str, list[Any]]) -> None:
    from clusterctl.render.text import terminal_width

    sys.stdout.write(compare_text(figs, diffs, terminal_width()))


def compare_plot(figs: list[Figures], path: Path) -> Path:
    """The runs' total loss against the optimizer step, overlaid, one colour per run (labelled with
    its letter and id)."""
    from clusterctl.render.plots import _pyplot, _save, check_target

    check_target(path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for i, f in enumerate(figs):
        if f.curve:
            xs, ys = zip(*f.curve)
            ax.plot(xs, ys, label=f"{letter(i)} {printable(f.run.run_id)}", linewidth=1.5)
            drawn += 1
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("total loss (weighted sum)")
    ax.set_title(f"total loss of {len(figs)} run{'s' * (len(figs) != 1)}")
    if drawn:
        ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path
