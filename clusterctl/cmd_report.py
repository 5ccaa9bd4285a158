"""`clusterctl report energy | gpu-hours | loss`: what runs used and how they learned.

GPU-hours come from Slurm accounting (allocated GPUs x elapsed) when the registry has them, else from
the registry's start/end times x GPUs; energy and CO2 from the per-node codecarbon files the trainer
writes (every attempt summed). Each figure says its source; the plan's estimate stands beside the
measurement. Aggregation and CSV columns live in clusterctl.reports (pure).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from clusterctl import output
from clusterctl.output import CO2_UNITS, ENERGY_UNITS, pick_unit, print_json
from vltrain.errors import UserError

app = typer.Typer(help="Energy, carbon, GPU-hour and loss reports.", no_args_is_help=True)


def _usages(run: Optional[str], profile: Optional[str], since: Optional[str], until: Optional[str]):
    """Registry runs matching the filters, refreshed from Slurm once, with their energy files read."""
    from clusterctl.cmd_status import refresh
    from clusterctl.registry import Registry
    from clusterctl.reports import parse_day, read_energy, usage_for

    reg = Registry()
    runs = [reg.get_run(run)] if run else reg.list_runs()
    if profile:
        runs = [r for r in runs if r.profile == profile]
    lo = parse_day(since, "--since") if since else None
    hi = parse_day(until, "--until") if until else None
    if lo is not None and hi is not None and hi <= lo:
        raise UserError(f"--until: {until} is not after --since {since}; allowed: a later date")
    runs = [r for r in runs if (lo is None or r.created_at >= lo) and (hi is None or r.created_at < hi)]
    refresh(reg, runs)  # one batched squeue/sacct for the runs still active
    jobs = reg.jobs_for(r.run_id for r in runs)
    now = time.time()
    return [usage_for(r, jobs[r.run_id], read_energy(Path(r.run_dir)), now) for r in runs], runs


def _report(kind: str, run, profile, since, until, by, json_, csv_, plot) -> None:
    from clusterctl.reports import BY, COLUMNS, aggregate, to_csv

    if by not in BY:
        raise UserError(f"--by: {by!r} is not known; allowed: {', '.join(BY)}")
    if json_ and csv_:
        raise UserError("--csv: given together with --json; allowed: one of the two")
    if plot is not None:
        from clusterctl.plots import _check_target

        _check_target(plot)
    usages, runs = _usages(run, profile, since, until)
    rows = aggregate(usages, by)
    if plot is not None:
        from clusterctl.plots import energy_plot
        from clusterctl.reports import read_timeline

        series = {r.run_id: [((t - r.created_at) / 3600, e, c) for t, e, c in read_timeline(Path(r.run_dir))] for r in runs}
        energy_plot(series, plot)
    if csv_:
        typer.echo(to_csv(rows), nl=False)
    elif json_:
        print_json({"report": kind, "by": by, "columns": list(COLUMNS), "rows": rows})
    else:
        _print_rows(kind, by, rows)
    if plot is not None and not json_ and not csv_:
        output.console.print(f"plot written to {plot}")


SOURCES = {"sacct": "Slurm accounting", "registry": "start/end x GPUs", "none": "no times recorded"}


def _print_rows(kind: str, by: str, rows: list[dict]) -> None:
    """A table that fits 80 columns: numbers are never cut. Columns whose value is the same on every
    row (GPU-h source, grid intensity, PUE: usually one per profile) move to the line under it."""
    from rich import box
    from rich.table import Table

    if not rows:
        output.console.print("no runs match: clusterctl submit --profile local")
        return
    cols: list[tuple[str, str, float]] = [("runs", "runs", 1.0)] if by != "run" else []
    cols += [("gpu_hours", "GPU-h", 1.0), ("gpu_hours_source", "GPU-h\nsource", 1.0)]
    if kind == "energy":
        ef, eu = pick_unit([r.get(k) for r in rows for k in ("energy_kwh", "estimated_kwh")], ENERGY_UNITS)
        cf, cu = pick_unit([r.get(k) for r in rows for k in ("co2_kg", "estimated_co2_kg")], CO2_UNITS)
        cols += [("energy_kwh", f"energy\n{eu}", ef), ("co2_kg", f"CO2eq\n{cu}", cf),
                 ("carbon_intensity_g_per_kwh", "grid\ng/kWh", 1.0), ("pue", "PUE", 1.0),
                 ("estimated_kwh", f"plan\n{eu}", ef), ("estimated_co2_kg", f"plan\n{cu}", cf)]
    notes = []
    for key, head in (("gpu_hours_source", "GPU-h source"), ("carbon_intensity_g_per_kwh", "grid"), ("pue", "PUE")):
        values = {_fmt(r.get(key)) for r in rows}
        if len(values) == 1 and any(k == key for k, _, _ in cols):
            (v,) = values
            notes.append(f"{head} {v}" + (f" = {SOURCES[v]}" if key == "gpu_hours_source" and v in SOURCES else "")
                         + (" g/kWh" if key == "carbon_intensity_g_per_kwh" and v != "-" else ""))
            cols = [c for c in cols if c[0] != key]
    cells = [[_fmt(r.get("key"))] + [_fmt(_scaled(r.get(k), f)) for k, _, f in cols] for r in rows]
    t = Table(title=f"{kind} by {by}", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    t.add_column(by, overflow="fold", min_width=8)
    for i, (_, head, _) in enumerate(cols, start=1):
        width = max([len(w) for w in head.split()] + [len(c[i]) for c in cells])
        t.add_column(head, justify="left" if "source" in head else "right", no_wrap=True, min_width=width)
    for c in cells:
        t.add_row(*c)
    output.console.print(t)
    if any(k == "gpu_hours_source" for k, _, _ in cols):  # the column stayed: say what its values mean
        notes.append("GPU-h source: sacct = Slurm accounting, registry = start/end x GPUs")
    output.console.print(" | ".join(notes), highlight=False)
    if kind == "energy":
        output.console.print("energy measured by codecarbon, one tracker per node, every attempt summed; "
                             "plan = the estimate made at submit", highlight=False)


def _scaled(v, factor: float):
    return v * factor if isinstance(v, float) and factor != 1.0 else v


def _fmt(v) -> str:
    return output.quantity(v) if isinstance(v, float) or v is None else str(v)


_RUN = typer.Option(None, "--run", help="Run id, id prefix or name.")
_PROFILE = typer.Option(None, "--profile", help="Only runs on this profile.")
_SINCE = typer.Option(None, "--since", help="Runs submitted on or after YYYY-MM-DD[THH:MM] (UTC).")
_UNTIL = typer.Option(None, "--until", help="Runs submitted before YYYY-MM-DD[THH:MM] (UTC).")
_BY = typer.Option("run", "--by", help="Group by run, profile, day, month or user.")
_JSON = typer.Option(False, "--json", help="Print JSON.")
_CSV = typer.Option(False, "--csv", help="Print CSV (columns in docs/reports.md).")
_PLOT = typer.Option(None, "--plot", help="Also write cumulative energy/CO2 per run over time to FILE.png.")


@app.command()
def energy(run: Optional[str] = _RUN, profile: Optional[str] = _PROFILE, since: Optional[str] = _SINCE,
           until: Optional[str] = _UNTIL, by: str = _BY, json_: bool = _JSON, csv_: bool = _CSV,
           plot: Optional[Path] = _PLOT) -> None:
    """Measured kWh and kg CO2eq (codecarbon), GPU-hours, and the plan's estimate beside them."""
    _report("energy", run, profile, since, until, by, json_, csv_, plot)


@app.command("gpu-hours")
def gpu_hours(run: Optional[str] = _RUN, profile: Optional[str] = _PROFILE, since: Optional[str] = _SINCE,
              until: Optional[str] = _UNTIL, by: str = _BY, json_: bool = _JSON, csv_: bool = _CSV,
              plot: Optional[Path] = _PLOT) -> None:
    """GPU-hours per run/profile/day/month/user, each with its source (sacct or registry)."""
    _report("gpu-hours", run, profile, since, until, by, json_, csv_, plot)


@app.command()
def loss(run: str = typer.Argument(..., help="Run id, id prefix or name."),
         plot: Optional[Path] = typer.Option(None, "--plot", help="Write the loss curves per objective to FILE.png."),
         json_: bool = _JSON) -> None:
    """Loss per objective (total, contrastive, MLM, captioning) from the run's metrics.jsonl."""
    from clusterctl.registry import Registry

    r = Registry().get_run(run)
    path = Path(r.run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if isinstance(d, dict) and "step" in d:
                rows.append(d)
    if not rows:
        raise UserError(f"{path}: no metrics yet; allowed: a run that has logged at least one step")
    if plot is not None:
        from clusterctl.plots import loss_plot

        loss_plot(r.run_id, rows, plot)
    keys = [k for k in ("loss", "itc", "mlm", "caption") if k in rows[-1]]
    if json_:
        print_json({"run_id": r.run_id, "steps": [{k: d.get(k) for k in ("step", *keys)} for d in rows]})
        return
    first, last = rows[0], rows[-1]
    output.console.print(f"{r.run_id}: {len(rows)} logged steps, step {first['step']} -> {last['step']}")
    for k in keys:
        output.console.print(f"  {k:8s} {first[k]:.4f} -> {last[k]:.4f}")
    if plot is not None:
        output.console.print(f"plot written to {plot}")
