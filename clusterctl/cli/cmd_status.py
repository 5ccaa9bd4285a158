"""`clusterctl status [RUN] [--all] [--json]`: where each run stands (clusterctl.runs.status)."""

from __future__ import annotations

import typer

from clusterctl.runs.registry import Registry


def status(
    run: str = typer.Argument(
        None, help="Run id, unique id prefix, name or sweep id (default: active runs and the newest finished)."
    ),
    all_: bool = typer.Option(False, "--all", help="Show every run in the registry."),
    json_: bool = typer.Option(False, "--json", help="Print JSON for scripts (with 'source' and 'notes')."),
) -> None:
    """Where runs stand: state, requeues, step, loss, throughput, ETA, elapsed, GPU-hours."""
    reg = Registry()
    if all_ and not run:
        _all(reg, json_)
        return
    from clusterctl.runs.lifecycle import refresh_and_retry
    from clusterctl.runs.status import collect, select_runs
    from clusterctl.runs.sweep import runs_of

    runs = (runs_of(reg, run) if run else []) or select_runs(reg, run, all_)  # a sweep id: its runs
    data = collect(runs, refresh_and_retry(reg, runs))  # no daemon: cluster failures are retried here
    if json_:
        from clusterctl.render.output import print_json

        print_json(data)
        return
    from clusterctl.render.status_table import print_status

    print_status(data)


def _all(reg: Registry, json_: bool) -> None:
    """Every run, from the registry's summaries (runs.summaries); `--json` is written one run at a time."""
    from clusterctl.runs.history import collect_all

    everything = collect_all(reg)  # and cluster failures retried (no daemon)
    head = {"source": everything.source, "notes": everything.notes}
    if json_:
        from clusterctl.render.output import print_json_stream

        print_json_stream(head, "runs", everything.texts())
        return
    from clusterctl.render.status_table import print_status

    print_status(head | {"runs": list(everything.rows())})
