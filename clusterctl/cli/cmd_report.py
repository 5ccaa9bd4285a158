"""`clusterctl report energy | gpu-hours | loss`: what runs used and how they learned.

GPU-hours come from Slurm accounting (allocated GPUs x elapsed) when the registry has them, else from
the registry's start/end times x GPUs; energy and CO2 from the per-node codecarbon files the trainer
writes (every attempt summed). Each figure says its source; the plan's estimate stands beside the
measurement. Aggregation and CSV columns live in clusterctl.runs.usage (pure).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from clusterctl.cli.options import JSON
from clusterctl.render import output
from clusterctl.render.output import print_json
from clusterctl.render.safe import printable
from vltrain.common.errors import UserError

app = typer.Typer(help="Energy, carbon, GPU-hour and loss reports.", no_args_is_help=True)


def _usages(run: Optional[str], profile: Optional[str], since: Optional[str], until: Optional[str]):
    """Registry runs matching the filters, refreshed from Slurm once, with their energy files read;
    and the notes of that refresh (a controller that did not answer, a read-only registry)."""
    from clusterctl.runs.artifacts import count_events
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.status import refresh
    from clusterctl.runs.usage import parse_day, read_energy, usage_for
    from vltrain.rundir import RunDir

    reg = Registry()
    if run:
        runs = [reg.get_run(run)]
    else:
        reg.verify()  # every run is read: a damaged page must not pass as a complete report
        runs = reg.list_runs()
    if profile:
        runs = [r for r in runs if r.profile == profile]
    lo = parse_day(since, "--since") if since else None
    hi = parse_day(until, "--until") if until else None
    if lo is not None and hi is not None and hi <= lo:
        raise UserError(f"--until: {until} is not after --since {since}; allowed: a later date")
    runs = [r for r in runs if (lo is None or r.created_at >= lo) and (hi is None or r.created_at < hi)]
    fresh = refresh(reg, runs)  # one batched squeue/sacct for the runs still active
    now = time.time()
    usages = [
        usage_for(
            r, fresh.jobs[r.run_id], read_energy(r.run_dir), now, count_events(RunDir(r.run_dir).events, "resume")
        )
        for r in runs
    ]
    return usages, runs, fresh.notes


def _report(kind: str, run, profile, since, until, by, json_, csv_, plot) -> None:
    from clusterctl.runs.usage import BY, COLUMNS, aggregate, to_csv

    if by not in BY:
        raise UserError(f"--by: {by!r} is not known; allowed: {', '.join(BY)}")
    if json_ and csv_:
        raise UserError("--csv: given together with --json; allowed: one of the two")
    if plot is not None:
        from clusterctl.render.plots import check_target

        check_target(plot)
    usages, runs, notes = _usages(run, profile, since, until)
    rows = aggregate(usages, by)
    if plot is not None:
        from clusterctl.render.plots import energy_plot
        from clusterctl.runs.usage import read_timeline

        series = {r.run_id: [((t - r.created_at) / 3600, e, c) for t, e, c in read_timeline(r.run_dir)] for r in runs}
        energy_plot(series, plot)
    if csv_:
        typer.echo(to_csv(rows), nl=False)
    elif json_:
        print_json({"report": kind, "by": by, "columns": list(COLUMNS), "rows": rows, "notes": notes})
    else:
        from clusterctl.render.report_view import print_report

        print_report(kind, by, rows)
    if csv_:  # CSV on stdout stays parseable: what did not answer goes to stderr
        for note in notes:
            output.err_console.print(f"note: {printable(note)}", markup=False, highlight=False, soft_wrap=True)
    elif not json_:
        for note in notes:
            output.console.print(f"note: {printable(note)}", markup=False, highlight=False, soft_wrap=True)
    if plot is not None and not json_ and not csv_:
        output.console.print(f"plot written to {printable(str(plot))}", markup=False, highlight=False)


_RUN = typer.Option(None, "--run", help="Run id, id prefix or name.")
_PROFILE = typer.Option(None, "--profile", help="Only runs on this profile.")
_SINCE = typer.Option(None, "--since", help="Runs submitted on or after YYYY-MM-DD[THH:MM] (UTC).")
_UNTIL = typer.Option(None, "--until", help="Runs submitted before YYYY-MM-DD[THH:MM] (UTC).")
_BY = typer.Option("run", "--by", help="Group by run, profile, day, month or user.")
_JSON = JSON
_CSV = typer.Option(False, "--csv", help="Print CSV (columns in docs/reports.md).")
_PLOT = typer.Option(None, "--plot", help="Also write cumulative energy/CO2 per run over time to FILE.png.")


@app.command()
def energy(
    run: Optional[str] = _RUN,
    profile: Optional[str] = _PROFILE,
    since: Optional[str] = _SINCE,
    until: Optional[str] = _UNTIL,
    by: str = _BY,
    json_: bool = _JSON,
    csv_: bool = _CSV,
    plot: Optional[Path] = _PLOT,
) -> None:
    """Measured kWh and kg CO2eq (codecarbon), GPU-hours, and the plan's estimate beside them."""
    _report("energy", run, profile, since, until, by, json_, csv_, plot)


@app.command("gpu-hours")
def gpu_hours(
    run: Optional[str] = _RUN,
    profile: Optional[str] = _PROFILE,
    since: Optional[str] = _SINCE,
    until: Optional[str] = _UNTIL,
    by: str = _BY,
    json_: bool = _JSON,
    csv_: bool = _CSV,
    plot: Optional[Path] = _PLOT,
) -> None:
    """GPU-hours per run/profile/day/month/user, each with its source (sacct or registry)."""
    _report("gpu-hours", run, profile, since, until, by, json_, csv_, plot)


@app.command()
def loss(
    run: str = typer.Argument(..., help="Run id, id prefix or name."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the loss curves per objective to FILE.png."),
    json_: bool = _JSON,
) -> None:
    """Loss per objective (total, contrastive, MLM, captioning) from the run's metrics.jsonl."""
    from clusterctl.runs.artifacts import metric_rows
    from clusterctl.runs.registry import Registry
    from vltrain.rundir import RunDir

    r = Registry().get_run(run)
    rows = metric_rows(r.run_dir)
    if not rows:
        raise UserError(
            f"{RunDir(r.run_dir).metrics}: no metrics yet; allowed: a run that has logged at least one step"
        )
    if plot is not None:
        from clusterctl.render.plots import loss_plot

        loss_plot(r.run_id, rows, plot)
    keys = [k for k in ("loss", "itc", "mlm", "caption") if any(k in d for d in rows)]
    if json_:
        print_json({"run_id": r.run_id, "steps": [{k: d.get(k) for k in ("step", *keys)} for d in rows]})
        return
    from clusterctl.render.report_view import print_loss

    print_loss(r.run_id, rows, keys)
    if plot is not None:
        output.console.print(f"plot written to {printable(str(plot))}", markup=False, highlight=False)
