"""`clusterctl status [RUN] [--all] [--json]`: where each run stands (clusterctl.runs.status)."""

from __future__ import annotations

import typer

from clusterctl.runs.registry import Registry
from clusterctl.specs import FAILURE_STATES


def status(
    run: str = typer.Argument(
        None, help="Run id, unique id prefix or name (default: active runs and the newest finished)."
    ),
    all_: bool = typer.Option(False, "--all", help="Show every run in the registry."),
    json_: bool = typer.Option(False, "--json", help="Print JSON for scripts (with 'source' and 'notes')."),
) -> None:
    """Where runs stand: state, requeues, step, loss, throughput, ETA, elapsed, GPU-hours."""
    from clusterctl.runs.status import collect, select_runs

    reg = Registry()
    runs = select_runs(reg, run, all_)
    data = collect(reg, runs)
    if any(r.state in FAILURE_STATES for r in runs) and not reg.readonly:  # no daemon: retried here
        from clusterctl.runs.lifecycle import reconcile

        for run_id, job_id in reconcile(reg, runs):
            data["notes"].append(f"{run_id}: retried as job {job_id} after a cluster failure")
    if json_:
        from clusterctl.render.output import print_json

        print_json(data)
        return
    from clusterctl.render.status_table import print_status

    print_status(data)
