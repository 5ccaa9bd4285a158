"""`report energy | gpu-hours | loss` as tables and lines that fit 80 columns (data in, plain text out)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from clusterctl.render.safe import printable
from clusterctl.render.status_table import commit_text
from clusterctl.render.text import output_text, table_text
from clusterctl.render.units import CO2_UNITS, ENERGY_UNITS, pick_unit, quantity

_SHOWN = ("key", "runs", "gpu_hours", "gpu_hours_source", "requeues", "resumes", "energy_kwh", "co2_kg",
          "carbon_intensity_g_per_kwh", "pue", "estimated_kwh", "estimated_co2_kg", "cost", "currency")  # fmt: skip
SOURCES = {"sacct": "Slurm accounting", "registry": "start/end x GPUs", "none": "no times recorded"}
_SHORT_SOURCES = {"registry": "times", "registry+sacct": "both"}  # GPU-h source cells: 5 characters at most


def print_report(kind: str, by: str, rows: list[dict] | dict[str, list], width: int | None = None) -> None:
    """A table that fits the terminal (80 columns when output is not one): numbers are never cut, nor
    keys (one too long goes whole on a line of its own). Columns whose value is the same on every row
    that has one (GPU-h source, grid intensity, PUE: usually one per profile; a run without energy has
    no grid) move to the line under it, so that run ids and their figures share a line.
    `rows`: the report's rows, or the same as columns (name -> every row's value: usage.run_columns).

    Plain text laid out as rich's SIMPLE_HEAD table was (rich measured every cell: 97 % of a report
    over 10,000 runs), so 10,000 rows print in milliseconds."""
    say = output_text
    if isinstance(rows, dict):
        data = {k: v for k, v in rows.items() if k in _SHOWN}
    else:  # the columns by name, each pulled out of the rows once (every row has the first's keys: usage.COLUMNS)
        data = {k: list(map(itemgetter(k), rows)) for k in _SHOWN if rows and k in rows[0]}
    n = len(data.get("key", ()))
    if not n:
        say("no runs match: clusterctl submit --profile local")
        return
    cols: list[tuple[str, str, float]] = [("runs", "runs", 1.0)] if by != "run" else []
    cols += [("gpu_hours", "GPU-h", 1.0), ("gpu_hours_source", "GPU-h\nsource", 1.0)]
    cols += _cost_columns(data)  # money beside GPU-hours, only where a profile sets a price (runs.reports.priced)
    cols += [("requeues", "re-\nqueues", 1.0), ("resumes", "re-\nsumes", 1.0)]  # as status and watch count them
    if kind == "energy":
        ef, eu = pick_unit(_distinct(data, "energy_kwh", "estimated_kwh"), ENERGY_UNITS)
        cf, cu = pick_unit(_distinct(data, "co2_kg", "estimated_co2_kg"), CO2_UNITS)
        cols += [
            ("energy_kwh", f"energy\n{eu}", ef),
            ("co2_kg", f"CO2eq\n{cu}", cf),
            ("carbon_intensity_g_per_kwh", "grid\ng/kWh", 1.0),
            ("pue", "PUE", 1.0),
            ("estimated_kwh", f"plan\n{eu}", ef),
            ("estimated_co2_kg", f"plan\n{cu}", cf),
        ]
    notes = []
    for key, head in (
        ("gpu_hours_source", "GPU-h source"),
        ("requeues", "requeues"),
        ("resumes", "resumes"),
        ("carbon_intensity_g_per_kwh", "grid"),
        ("pue", "PUE"),
    ):
        values = {_fmt(v) for v in _distinct(data, key)} - {"-"}  # the few distinct values, formatted
        # a run with no measurement has no grid or PUE: the others' one value is still said once
        if len(values) == 1 and any(k == key for k, _, _ in cols):
            (v,) = values
            notes.append(
                f"{head} {v}"
                + (f" = {SOURCES[v]}" if key == "gpu_hours_source" and v in SOURCES else "")
                + (" g/kWh" if key == "carbon_intensity_g_per_kwh" and v != "-" else "")
            )
            cols = [c for c in cols if c[0] != key]
    columns = [_keys(data["key"])] + [_column(data.get(k, [None] * n), f) for k, _, f in cols]
    if any(k == "gpu_hours_source" for k, _, _ in cols):  # the column stayed: short values, said below
        i = 1 + [k for k, _, _ in cols].index("gpu_hours_source")
        columns[i] = [_SHORT_SOURCES.get(v, v) for v in columns[i]]
        notes.append("GPU-h source: sacct = Slurm accounting, times = start/end x GPUs, both = some of each")
    heads = [by.split("\n")] + [head.split("\n") for _, head, _ in cols]
    right = [False] + ["source" not in head for _, head, _ in cols]
    # a key (run id) is never cut: one too long for the narrowed column goes whole on a line of its own
    say(table_text(f"{kind} by {by}", heads, columns, right, width or _width()))
    say(" | ".join(notes), wrap=width or _width())
    if kind == "energy":
        say(
            "energy measured by codecarbon, one tracker per node, every attempt summed; "
            "plan = the estimate made at submit",
            wrap=width or _width(),
        )


def _cost_columns(data: dict[str, list]) -> list[tuple[str, str, float]]:
    """The cost column, headed by its currency (one currency), or with a currency column beside it."""
    currencies = _distinct(data, "currency") - {None}
    if not currencies:
        return []
    if len(currencies) == 1:
        return [("cost", f"cost\n{next(iter(currencies))}", 1.0)]
    return [("cost", "cost", 1.0), ("currency", "cur-\nrency", 1.0)]


def _width() -> int:
    """The terminal's columns ($COLUMNS first); 80 when output is not a terminal (as rich did)."""
    from clusterctl.render.text import terminal_width

    return terminal_width() or 80


def _distinct(data: dict[str, list], *keys: str) -> set:
    """The distinct values of some columns (1 and 1.0 count once: only for sets of numbers)."""
    out: set = set()
    for k in keys:
        out.update(data.get(k, (None,)))
    return out


def _keys(keys: list) -> list[str]:
    """The first column: group keys (run ids, dates, names), nearly all distinct. Printable text, the
    usual case, is checked in one pass over all of it and kept as it is."""
    if set(map(type, keys)) == {str} and "".join(keys).isprintable():
        return keys
    return _column(keys, 1.0)


def _column(values: list, factor: float) -> list[str]:
    """One column's cells: each distinct value formatted once (10,000 rows repeat most values)."""
    uniq = set(values)
    if len({v.__class__ for v in uniq} & {int, float}) == 2:  # 1234 == 1234.0, but they read differently
        return [printable(_fmt(_scaled(v, factor))) for v in values]
    table = {v: printable(_fmt(_scaled(v, factor))) for v in uniq}
    return list(map(table.__getitem__, values))


def _scaled(v, factor: float):
    return v * factor if isinstance(v, float) and factor != 1.0 else v


def _fmt(v) -> str:
    return quantity(v) if isinstance(v, float) or v is None else str(v)


def print_loss(
    run_id: str,
    first: dict[str, Any],
    last: dict[str, Any],
    keys: list[str],
    steps: int | None,
    size: int = 0,
    stages: Sequence[tuple[Any, list[dict[str, Any]]]] = (),
) -> None:
    """First and last logged value of each objective ('-' where a line has none, 'nan' where the
    trainer logged NaN), from the records of the lowest and highest step (runs.artifacts.loss_summary);
    `steps`: the distinct steps logged (None: the file was too large to count them, `size` bytes).
    `stages`: a run of several stages (reports.in_stages) gets a block per stage, with only the
    objectives that stage trains: its total is another sum, so one line from the first step to the
    last would read as a jump."""
    counted = f"{steps} logged steps" if steps is not None else f"{size / 1e6:,.0f} MB of metrics, head and tail read"
    lines = [f"{printable(run_id)}: {counted}, step {_step(first['step'])} -> {_step(last['step'])}"]
    if len(stages) <= 1:
        lines += [f"  {printable(k):8s} {_value(first.get(k))} -> {_value(last.get(k))}" for k in keys]
        output_text("\n".join(lines))
        return
    for i, (stage, rows) in enumerate(stages, 1):
        trained = [k for k in keys if k == "loss" or stage.weights.get(k, 0.0) > 0]
        weights = ", ".join(f"{k} {stage.weights[k]:g}" for k in trained if k != "loss")
        lines.append(f"stage {i}/{len(stages)} {printable(stage.name)}, steps {stage.first}-{stage.last}: {weights}")
        if not rows:
            lines.append("  (no step logged yet)" if steps is not None else "  (between the head and tail read)")
            continue
        lines += [f"  {printable(k):8s} {_value(rows[0].get(k))} -> {_value(rows[-1].get(k))}" for k in trained]
    output_text("\n".join(lines))


def _step(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _value(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-"
    return f"{v:.4f}" if math.isfinite(v) else str(float(v))


_EVAL_COLS = (  # (row key, header, format): recall in percent of the held-out pairs, CIDEr-D as computed
    ("step", "step", "{:,.0f}"),
    ("n", "pairs", "{:,.0f}"),
    ("i2t_r1", "i2t\nR@1", "{:.1f}"),
    ("i2t_r5", "i2t\nR@5", "{:.1f}"),
    ("i2t_r10", "i2t\nR@10", "{:.1f}"),
    ("t2i_r1", "t2i\nR@1", "{:.1f}"),
    ("t2i_r5", "t2i\nR@5", "{:.1f}"),
    ("t2i_r10", "t2i\nR@10", "{:.1f}"),
    ("cider", "CIDEr-D", "{:.3f}"),
)
_COMMIT_COL = ("commit", "commit", "")  # never dropped for width (table_text puts long run ids on a line of their own)
_ZERO_SHOT_COLS = (  # shown when a run's eval.json has zero-shot figures: in % of its labelled held-out images
    ("zero_shot_top1", "0-shot\ntop-1", "{:.1f}"),
    ("zero_shot_top5", "0-shot\ntop-5", "{:.1f}"),
)


def print_eval(rows: list[dict[str, Any]], missing: list[str], width: int | None = None) -> None:
    """`report eval`: a row per run, with zero-shot top-1/top-5 after the pairs when a run has them. To
    fit the terminal, a column the same on every row (the held-out pairs, usually) goes under the table,
    then the R@10 columns (kept in --json); a run id is never cut (table_text: one too long goes whole
    on a line of its own)."""
    width = width or _width()
    if not rows:
        output_text("no run has an eval.json yet: `vltrain eval --run-dir DIR`, or a run that finishes")
    else:
        zero_shot = any(isinstance(r.get("zero_shot_top1"), (int, float)) for r in rows)
        cols = list(_EVAL_COLS[:2]) + (list(_ZERO_SHOT_COLS) if zero_shot else []) + list(_EVAL_COLS[2:])
        cells = {k: [_eval_cell(r.get(k), f, k) for r in rows] for k, _, f in cols}
        cells["commit"] = [(commit_text(r.get("commit"), r.get("dirty")) or "-").replace("+dirty", "+") for r in rows]
        if any(c != "-" for c in cells["commit"]):
            cols.append(_COMMIT_COL)  # the code each run was submitted from (provenance.json)
        notes = []
        for key, label in (("n", "held-out pairs"), ("step", "step"), ("commit", "commit")):
            if all(c[0] != key for c in cols):  # commit: no run has one (submitted before provenance)
                continue
            values = set(cells[key])
            if len(values) == 1 and (len(rows) > 1 or key == "commit"):
                notes.append(f"{label} {values.pop()}")
                cols = [c for c in cols if c[0] != key]
        keys = [printable(str(r["run_id"])) for r in rows]

        def wide(cs: list) -> int:
            own = [max(len(max(h.split("\n"), key=len)), *map(len, cells[k])) for k, h, _ in cs]
            return 1 + max(map(len, [*keys, "run"])) + sum(2 + w for w in own)

        if wide(cols) > width:
            cols = [c for c in cols if not c[0].endswith("r10")]
            notes.append("R@10: --json")
        heads = [["run"]] + [h.split("\n") for _, h, _ in cols]
        columns = [keys] + [cells[k] for k, _, _ in cols]
        right = [False] + [c != _COMMIT_COL for c in cols]
        output_text(table_text("held-out evaluation by run", heads, columns, right, width, gap=2))
        chance = {r["chance_r1"] for r in rows if isinstance(r.get("chance_r1"), (int, float))}
        if len(chance) == 1:
            notes.append(f"chance R@1 {100 * chance.pop():.2g} %")
        if zero_shot:
            notes.append(_zero_shot_note(rows))
        notes.append("recall in % of every held-out pair, both ways; CIDEr-D of the generated captions")
        if any(r.get("dirty") is True for r in rows):
            notes.append("commit+: with uncommitted changes (source.diff)")
        output_text(" | ".join(notes), wrap=width)
    if missing:
        more = f" and {len(missing) - 5:,} more" if len(missing) > 5 else ""
        output_text(f"no eval.json yet: {', '.join(map(printable, missing[:5]))}{more}", wrap=width)


def _zero_shot_note(rows: list[dict[str, Any]]) -> str:
    """What the 0-shot columns count: the classes (and chance top-1) when every run has the same."""
    classes = {r["zero_shot_classes"] for r in rows if isinstance(r.get("zero_shot_classes"), (int, float))}
    chance = {r["chance_top1"] for r in rows if isinstance(r.get("chance_top1"), (int, float))}
    about = f" over {classes.pop():,.0f} classes" if len(classes) == 1 else ""
    odds = f", chance top-1 {100 * chance.pop():.3g} %" if len(chance) == 1 else ""
    return f"0-shot: % of the labelled held-out images{about}{odds}"


def _eval_cell(v: Any, fmt: str, key: str) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "-"
    return fmt.format(100 * v if key.startswith(("i2t", "t2i", "zero_shot_top")) else v)
