"""`report energy | gpu-hours | loss` as tables and lines that fit 80 columns (data in, plain text out)."""

from __future__ import annotations

import math
from operator import itemgetter
from typing import Any

from clusterctl.render.safe import printable
from clusterctl.render.text import output_text, table_text
from clusterctl.render.units import CO2_UNITS, ENERGY_UNITS, pick_unit, quantity

_SHOWN = ("key", "runs", "gpu_hours", "gpu_hours_source", "requeues", "resumes", "energy_kwh", "co2_kg",
          "carbon_intensity_g_per_kwh", "pue", "estimated_kwh", "estimated_co2_kg")  # fmt: skip
SOURCES = {"sacct": "Slurm accounting", "registry": "start/end x GPUs", "none": "no times recorded"}


def print_report(kind: str, by: str, rows: list[dict] | dict[str, list], width: int | None = None) -> None:
    """A table that fits the terminal (80 columns when output is not one): numbers are never cut,
    a key too long for its column continues on the next line. Columns whose value is the same on
    every row (GPU-h source, grid intensity, PUE: usually one per profile) move to the line under it.
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
        values = {_fmt(v) for v in _distinct(data, key)}  # the few distinct values, formatted
        if len(values) == 1 and any(k == key for k, _, _ in cols):
            (v,) = values
            notes.append(
                f"{head} {v}"
                + (f" = {SOURCES[v]}" if key == "gpu_hours_source" and v in SOURCES else "")
                + (" g/kWh" if key == "carbon_intensity_g_per_kwh" and v != "-" else "")
            )
            cols = [c for c in cols if c[0] != key]
    columns = [_keys(data["key"])] + [_column(data.get(k, [None] * n), f) for k, _, f in cols]
    heads = [by.split("\n")] + [head.split("\n") for _, head, _ in cols]
    right = [False] + ["source" not in head for _, head, _ in cols]
    say(table_text(f"{kind} by {by}", heads, columns, right, width or _width()))
    if any(k == "gpu_hours_source" for k, _, _ in cols):  # the column stayed: say what its values mean
        notes.append("GPU-h source: sacct = Slurm accounting, registry = start/end x GPUs")
    say(" | ".join(notes), wrap=width or _width())
    if kind == "energy":
        say(
            "energy measured by codecarbon, one tracker per node, every attempt summed; "
            "plan = the estimate made at submit",
            wrap=width or _width(),
        )


def _width() -> int:
    """The terminal's columns ($COLUMNS first); 80 when output is not a terminal (as rich did)."""
    from clusterctl.render.status_table import terminal_width

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
    run_id: str, first: dict[str, Any], last: dict[str, Any], keys: list[str], steps: int | None, size: int = 0
) -> None:
    """First and last logged value of each objective ('-' where a line has none, 'nan' where the
    trainer logged NaN), from the records of the lowest and highest step (runs.artifacts.loss_summary);
    `steps`: the distinct steps logged (None: the file was too large to count them, `size` bytes)."""
    counted = f"{steps} logged steps" if steps is not None else f"{size / 1e6:,.0f} MB of metrics, head and tail read"
    lines = [f"{printable(run_id)}: {counted}, step {_step(first['step'])} -> {_step(last['step'])}"]
    lines += [f"  {printable(k):8s} {_value(first.get(k))} -> {_value(last.get(k))}" for k in keys]
    output_text("\n".join(lines))


def _step(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _value(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-"
    return f"{v:.4f}" if math.isfinite(v) else str(float(v))
