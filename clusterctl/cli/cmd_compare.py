"""`clusterctl compare RUN|SWEEP ...`: runs side by side, for a sweep or a hand-picked few.

What differs in their resolved configs (only that), a grid of final and best figures (each loss term,
Recall@K and zero-shot top-1 of eval.json, GPU-hours, energy, cost when a price is set, the commit),
and each run's total loss as a sparkline, or overlaid in a PNG with --plot; --json for all of it.
It reads: the registry, the run directories, and status's own refresh of runs still active.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from clusterctl.cli.options import JSON
from clusterctl.render.safe import printable


def compare(
    refs: list[str] = typer.Argument(..., metavar="RUN|SWEEP...", help="Run ids, id prefixes, names or sweep ids."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the runs' total loss curves overlaid to FILE.png."),
    json_: bool = JSON,
) -> None:
    """Compare runs: config differences, final and best figures, loss curves (--plot PNG)."""
    from clusterctl.runs.compare import as_dict, compare
    from clusterctl.runs.registry import Registry

    if plot is not None:
        from clusterctl.render.plots import check_target

        check_target(plot)
    figs, diffs, notes = compare(Registry(), refs)
    if plot is not None:
        from clusterctl.render.compare_view import compare_plot

        compare_plot(figs, plot)
    if json_:
        from clusterctl.render.output import print_json

        print_json({"runs": [as_dict(f) for f in figs], "differences": diffs, "notes": notes})
        return
    from clusterctl.render.compare_view import print_compare

    print_compare(figs, diffs)
    sys.stdout.writelines(f"note: {printable(note)}\n" for note in notes)
    if plot is not None:
        sys.stdout.write(f"plot written to {printable(str(plot))}\n")
