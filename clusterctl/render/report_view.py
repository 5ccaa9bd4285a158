"""`report energy | gpu-hours | loss` as tables and lines that fit 80 columns (data in, console out)."""

from __future__ import annotations

import math
from typing import Any

from clusterctl.render import output
from clusterctl.render.safe import cell, printable
from clusterctl.render.units import CO2_UNITS, ENERGY_UNITS, pick_unit, quantity

SOURCES = {"sacct": "Slurm accounting", "registry": "start/end x GPUs", "none": "no times recorded"}


def print_report(kind: str, by: str, rows: list[dict]) -> None:
    """A table that fits 80 columns: numbers are never cut. Columns whose value is the same on every
    row (GPU-h source, grid intensity, PUE: usually one per profile) move to the line under it."""
    from rich import box
    from rich.table import Table

    if not rows:
        output.console.print("no runs match: clusterctl submit --profile local")
        return
    cols: list[tuple[str, str, float]] = [("runs", "runs", 1.0)] if by != "run" else []
    cols += [("gpu_hours", "GPU-h", 1.0), ("gpu_hours_source", "GPU-h\nsource", 1.0)]
    cols += [("requeues", "re-\nqueues", 1.0), ("resumes", "re-\nsumes", 1.0)]  # as status and watch count them
    if kind == "energy":
        ef, eu = pick_unit([r.get(k) for r in rows for k in ("energy_kwh", "estimated_kwh")], ENERGY_UNITS)
        cf, cu = pick_unit([r.get(k) for r in rows for k in ("co2_kg", "estimated_co2_kg")], CO2_UNITS)
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
        values = {_fmt(r.get(key)) for r in rows}
        if len(values) == 1 and any(k == key for k, _, _ in cols):
            (v,) = values
            notes.append(
                f"{head} {v}"
                + (f" = {SOURCES[v]}" if key == "gpu_hours_source" and v in SOURCES else "")
                + (" g/kWh" if key == "carbon_intensity_g_per_kwh" and v != "-" else "")
            )
            cols = [c for c in cols if c[0] != key]
    cells = [
        [printable(_fmt(r.get("key")))] + [printable(_fmt(_scaled(r.get(k), f))) for k, _, f in cols] for r in rows
    ]
    t = Table(title=f"{kind} by {by}", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    t.add_column(by, overflow="fold", min_width=8)
    for i, (_, head, _) in enumerate(cols, start=1):
        width = max([len(w) for w in head.split()] + [len(c[i]) for c in cells])
        t.add_column(head, justify="left" if "source" in head else "right", no_wrap=True, min_width=width)
    for c in cells:
        t.add_row(*(cell(x) for x in c))
    output.console.print(t)
    if any(k == "gpu_hours_source" for k, _, _ in cols):  # the column stayed: say what its values mean
        notes.append("GPU-h source: sacct = Slurm accounting, registry = start/end x GPUs")
    output.console.print(" | ".join(notes), highlight=False, markup=False)
    if kind == "energy":
        output.console.print(
            "energy measured by codecarbon, one tracker per node, every attempt summed; "
            "plan = the estimate made at submit",
            highlight=False,
        )


def _scaled(v, factor: float):
    return v * factor if isinstance(v, float) and factor != 1.0 else v


def _fmt(v) -> str:
    return quantity(v) if isinstance(v, float) or v is None else str(v)


def print_loss(run_id: str, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """First and last logged value of each objective ('-' where a line has none, 'nan' where the
    trainer logged NaN). Rows: runs.artifacts.metric_rows (every step a finite number)."""
    first, last = rows[0], rows[-1]
    say = output.console.print
    say(
        f"{printable(run_id)}: {len(rows)} logged steps, step {_step(first['step'])} -> {_step(last['step'])}",
        markup=False,
        highlight=False,
    )
    for k in keys:
        say(f"  {printable(k):8s} {_value(first.get(k))} -> {_value(last.get(k))}", markup=False, highlight=False)


def _step(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _value(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-"
    return f"{v:.4f}" if math.isfinite(v) else str(float(v))
