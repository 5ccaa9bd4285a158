"""`clusterctl presets list|show`: the named model sizes, with their exact parameter counts."""

from __future__ import annotations

import typer

from clusterctl.cli.options import JSON
from clusterctl.render.output import print_json

app = typer.Typer(help="List and show the model presets (named sizes, tiny to the seeds' 30B).", no_args_is_help=True)


@app.command("list")
def list_(json_: bool = JSON) -> None:
    """Every preset: parameter count, image and text sizes, vocabulary, and the seed it is for."""
    from clusterctl.planning.presets import preset_rows

    rows = preset_rows()
    if json_:
        print_json(rows)
        return
    from clusterctl.render.preset_view import print_presets

    print_presets(rows)


@app.command()
def show(name: str = typer.Argument(..., help="Preset name."), json_: bool = JSON) -> None:
    """One preset: every figure of its model table, and its parameters by tower."""
    from clusterctl.planning.presets import preset_detail

    d = preset_detail(name)
    if json_:
        print_json(d)
        return
    from clusterctl.render.preset_view import print_preset

    print_preset(d)
