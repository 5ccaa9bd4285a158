"""`clusterctl report energy | gpu-hours | loss | eval`: what runs used, how they learned, how they score.

GPU-hours come from Slurm accounting (allocated GPUs x elapsed) when the registry has them, else from
the registry's start/end times x GPUs; energy and CO2 from the per-node codecarbon files the trainer
writes (every attempt summed). Each figure says its source; the plan's estimate stands beside the
measurement. The reports are clusterctl.runs.reports's; aggregation and CSV columns clusterctl.runs.usage's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from clusterctl.cli.options import JSON
from clusterctl.render.safe import printable
from vltrain.common.errors import UserError

app = typer.Typer(help="Energy, carbon, GPU-hour, loss and evaluation reports.", no_args_is_help=True)


def _report(kind: str, run, profile, user, since, until, by, json_, csv_, plot) -> None:
    from clusterctl.runs.reports import check_by, usage_report
    from clusterctl.runs.usage import COLUMNS, to_csv

    check_by(by)
    if json_ and csv_:
        raise UserError("--csv: given together with --json; allowed: one of the two")
    if plot is not None:
        from clusterctl.render.plots import check_target

        check_target(plot)
    report = usage_report(by, run, profile, user, since, until, with_runs=plot is not None, table=not (json_ or csv_))
    if plot is not None:
        from clusterctl.render.plots import energy_plot
        from clusterctl.runs.reports import energy_series

        energy_plot(energy_series(report.runs), plot)
    if csv_:
        sys.stdout.write(to_csv(report.rows))
    elif json_:
        from clusterctl.render.output import print_json_stream

        head = {"report": kind, "by": by, "columns": list(COLUMNS), "notes": report.notes}
        print_json_stream(head, "rows", report.rows)
    else:
        from clusterctl.render.report_view import print_report

        print_report(kind, by, report.rows)
    # CSV on stdout stays parseable: what did not answer goes to stderr
    out = sys.stderr if csv_ else sys.stdout
    if not json_:
        from clusterctl.runs.status import with_skipped

        out.writelines(f"note: {printable(note)}\n" for note in with_skipped(report.notes))  # and --plot's files
    if plot is not None and not json_ and not csv_:
        out.write(f"plot written to {printable(str(plot))}\n")


_RUN = typer.Option(None, "--run", help="Run id, id prefix or name.")
_PROFILE = typer.Option(None, "--profile", help="Only runs on this profile.")
_USER = typer.Option(None, "--user", help="Only runs submitted by this user.")
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
    user: Optional[str] = _USER,
    since: Optional[str] = _SINCE,
    until: Optional[str] = _UNTIL,
    by: str = _BY,
    json_: bool = _JSON,
    csv_: bool = _CSV,
    plot: Optional[Path] = _PLOT,
) -> None:
    """Measured kWh and kg CO2eq (codecarbon), GPU-hours, and the plan's estimate beside them."""
    _report("energy", run, profile, user, since, until, by, json_, csv_, plot)


@app.command("gpu-hours")
def gpu_hours(
    run: Optional[str] = _RUN,
    profile: Optional[str] = _PROFILE,
    user: Optional[str] = _USER,
    since: Optional[str] = _SINCE,
    until: Optional[str] = _UNTIL,
    by: str = _BY,
    json_: bool = _JSON,
    csv_: bool = _CSV,
    plot: Optional[Path] = _PLOT,
) -> None:
    """GPU-hours per run/profile/day/month/user, each with its source (sacct or registry)."""
    _report("gpu-hours", run, profile, user, since, until, by, json_, csv_, plot)


@app.command()
def loss(
    run: str = typer.Argument(..., help="Run id, id prefix or name."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the loss curves per objective to FILE.png."),
    json_: bool = _JSON,
) -> None:
    """Loss per objective (total and each one a stage weights) and stage, from metrics.jsonl and config.toml."""
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.reports import in_stages, loss_report, step_record
    from vltrain.common import safe_read

    if plot is not None:
        from clusterctl.render.plots import check_target

        check_target(plot)
    report = loss_report(Registry(), run, every=json_ or plot is not None)
    rows = report.every or [report.first, *([report.last] if report.last["step"] != report.first["step"] else [])]
    parts = in_stages(report.stages, rows)
    if plot is not None:
        from clusterctl.render.plots import loss_plot

        loss_plot(report.run_id, parts, report.keys, plot)
    if json_:
        from clusterctl.render.output import print_json_stream

        stages = [s._asdict() for s in report.stages]
        steps = (step_record(d, report.keys, report.stages) for d in report.every)
        head = {"run_id": report.run_id, "keys": report.keys, "stages": stages, "notes": safe_read.skipped()}
        print_json_stream(head, "steps", steps)
        return
    from clusterctl.render.report_view import print_loss

    print_loss(report.run_id, report.first, report.last, report.keys, report.steps, report.size, parts)
    sys.stdout.writelines(f"note: {printable(note)}\n" for note in safe_read.skipped())
    if plot is not None:
        sys.stdout.write(f"plot written to {printable(str(plot))}\n")


@app.command("eval")
def eval_(
    run: Optional[str] = _RUN,
    profile: Optional[str] = _PROFILE,
    user: Optional[str] = _USER,
    json_: bool = _JSON,
) -> None:
    """Held-out Recall@1/5/10 (image->text, text->image), CIDEr-D and zero-shot top-1/5 of each run's eval.json."""
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.reports import eval_report
    from vltrain.common import safe_read

    rows, missing = eval_report(Registry(), run, profile, user)
    if json_:
        from clusterctl.render.output import print_json_stream

        print_json_stream({"report": "eval", "without_eval": missing, "notes": safe_read.skipped()}, "rows", rows)
        return
    from clusterctl.render.report_view import print_eval

    print_eval(rows, missing)
    sys.stdout.writelines(f"note: {printable(note)}\n" for note in safe_read.skipped())
