"""`clusterctl watch [RUN ...]`: the live view of runs until they finish (clusterctl.cli.live)."""

from __future__ import annotations

from typing import Optional

import typer

from vltrain.common.errors import UserError


def watch(
    runs: Optional[list[str]] = typer.Argument(
        None, help="Run ids, id prefixes, names or sweep ids (default: the active runs)."
    ),
    interval: float = typer.Option(2.0, "--interval", "-n", min=0.2, max=3600, help="Seconds between refreshes."),
) -> None:
    """Live view of runs: state, nodes, requeues, steps with ETA, loss sparklines, speed, GPU-hours, energy, log."""
    from clusterctl.cli.live import watch_runs
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.sweep import expand

    if not runs:
        active = [r.run_id for r in Registry().list_runs(include_finished=False)]
        if not active:
            raise UserError("RUN: no active runs to watch; allowed: run ids (clusterctl status --all lists them)")
        runs = active
    raise typer.Exit(watch_runs(expand(Registry(), runs), interval))  # a sweep id: its runs
