"""`clusterctl report energy | gpu-hours | loss`: what runs used and how they learned.

GPU-hours come from Slurm accounting (allocated GPUs x elapsed) when the registry has them, else from
the registry's start/end times x GPUs; energy and CO2 from the per-node codecarbon files the trainer
writes (every attempt summed). Each figure says its source; the plan's estimate stands beside the
measurement. Aggregation and CSV columns live in clusterctl.runs.usage (pure).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from clusterctl.cli.options import JSON
from clusterctl.render.safe import printable
from vltrain.common.errors import UserError

app = typer.Typer(help="Energy, carbon, GPU-hour and loss reports.", no_args_is_help=True)


def _rows(
    kind_by: str, run: Optional[str], profile: Optional[str], user: Optional[str], since, until, plot: bool, table: bool
):
    """The report's rows and notes, and the runs (for --plot). Runs whose registry summary is settled
    are summed by SQL (Registry.settled_totals; by run, each run's figures: settled_runs); the
    others (active, just ended, never summarised) are refreshed from Slurm once, their files read,
    their summaries stored (runs.summaries), and added to the same groups. Filters are SQL's, on one
    snapshot of the registry. `table`: by run, the rows as the table reads them (usage.run_columns)."""
    from bisect import bisect_left
    from operator import itemgetter

    from clusterctl.runs.history import current
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.usage import from_summary, group, parse_day, rows_of, run_columns, run_rows, sql_row

    lo = parse_day(since, "--since") if since else None
    hi = parse_day(until, "--until") if until else None
    if lo is not None and hi is not None and hi <= lo:
        raise UserError(f"--until: {until} is not after --since {since}; allowed: a later date")
    reg = Registry()
    filters = {"run_id": reg.get_run(run).run_id if run else None, "profile": profile, "user": user}
    filters |= {"since": lo, "until": hi}
    if not run:
        reg.verify()  # every run is read: a damaged page must not pass as a complete report
    by_run = kind_by == "run"
    with reg.snapshot():  # the settled runs summed and the others listed from one state of the file
        totals = reg.settled_runs(**filters) if by_run else reg.settled_totals(kind_by, **filters)
        stale = reg.index(**filters, stale_only=True)
    cur = current(reg, stale)
    groups = group([from_summary(r, s) for r, s in cur.rows], kind_by)  # the runs that may still change
    runs = [r for r, _ in reg.index(**filters)] if plot else []
    if by_run and table:
        return run_columns(totals, rows_of(groups)), runs, cur.notes
    if by_run:  # the settled runs' rows, sorted by SQL; the few that may still change go into their places
        rows = run_rows(totals)
        keys = list(map(itemgetter("key"), rows))
        for row in rows_of(groups):
            i = bisect_left(keys, row["key"])
            if i < len(keys) and keys[i] == row["key"]:  # not within one snapshot; as by group, the fresh row wins
                rows[i] = row
            else:
                rows.insert(i, row)
                keys.insert(i, row["key"])
        return rows, runs, cur.notes
    rows = {t[0]: sql_row(t) for t in totals if t[0] not in groups}
    for t in totals:
        if t[0] in groups:
            groups[t[0]].add_sql(t[1:])
    rows |= {row["key"]: row for row in rows_of(groups)}
    return [rows[k] for k in sorted(rows)], runs, cur.notes


def _report(kind: str, run, profile, user, since, until, by, json_, csv_, plot) -> None:
    from clusterctl.runs.usage import BY, COLUMNS, to_csv

    if by not in BY:
        raise UserError(f"--by: {by!r} is not known; allowed: {', '.join(BY)}")
    if json_ and csv_:
        raise UserError("--csv: given together with --json; allowed: one of the two")
    if plot is not None:
        from clusterctl.render.plots import check_target

        check_target(plot)
    rows, runs, notes = _rows(by, run, profile, user, since, until, plot is not None, table=not (json_ or csv_))
    if plot is not None:
        from clusterctl.render.plots import energy_plot
        from clusterctl.runs.usage import read_timeline

        series = {r.run_id: [((t - r.created_at) / 3600, e, c) for t, e, c in read_timeline(r.run_dir)] for r in runs}
        energy_plot(series, plot)
    if csv_:
        sys.stdout.write(to_csv(rows))
    elif json_:
        from clusterctl.render.output import print_json_stream

        head = {"report": kind, "by": by, "columns": list(COLUMNS), "notes": notes}
        print_json_stream(head, "rows", rows)
    else:
        from clusterctl.render.report_view import print_report

        print_report(kind, by, rows)
    # CSV on stdout stays parseable: what did not answer goes to stderr
    out = sys.stderr if csv_ else sys.stdout
    if not json_:
        out.writelines(f"note: {printable(note)}\n" for note in notes)
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
    """Loss per objective (total, contrastive, MLM, captioning) from the run's metrics.jsonl."""
    from clusterctl.runs.artifacts import loss_summary, metric_rows
    from clusterctl.runs.registry import Registry
    from vltrain.rundir import RunDir

    r = Registry().get_run(run)
    objectives = ("loss", "itc", "mlm", "caption")
    if json_ or plot is not None:  # every step: the whole file, keeping only these fields
        rows = metric_rows(r.run_dir, fields=objectives)
        summary = None
    else:  # the first and last steps: one pass keeping two records, or head and tail of a large file
        summary = loss_summary(r.run_dir, objectives)
        rows = [summary.first, summary.last] if summary else []
    if not rows:
        raise UserError(
            f"{RunDir(r.run_dir).metrics}: no metrics yet; allowed: a run that has logged at least one step"
        )
    if plot is not None:
        from clusterctl.render.plots import loss_plot

        loss_plot(r.run_id, rows, plot)
    keys = summary.keys if summary else [k for k in objectives if any(k in d for d in rows)]
    if json_:
        from clusterctl.render.output import print_json_stream

        steps = ({k: d.get(k) for k in ("step", *keys)} for d in rows)
        print_json_stream({"run_id": r.run_id}, "steps", steps)
        return
    from clusterctl.render.report_view import print_loss

    if summary is not None:
        print_loss(r.run_id, summary.first, summary.last, keys, summary.steps, summary.size)
    else:
        print_loss(r.run_id, rows[0], rows[-1], keys, len(rows))
    if plot is not None:
        sys.stdout.write(f"plot written to {printable(str(plot))}\n")
