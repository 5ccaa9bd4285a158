"""`clusterctl recipes list|show`: the shipped train configs, and which profile runs each."""

from __future__ import annotations

from typing import Any

import typer

from clusterctl.cli.options import JSON
from clusterctl.render import output
from clusterctl.render.output import print_json

app = typer.Typer(
    help="List and show the recipes (train configs: one per seed, its twin, the demo).", no_args_is_help=True
)


@app.command("list")
def list_(json_: bool = JSON) -> None:
    """Every recipe: what it is and the profiles that run it by default."""
    from clusterctl.planning.profiles import profile_rows
    from clusterctl.planning.recipes import find_recipe, known_recipes, recipe_summary

    profiles = [r for r in profile_rows() if r["valid"] and not r["shadowed"]]
    rows: list[dict[str, Any]] = []
    for name in known_recipes():
        path = find_recipe(name, "NAME")
        rows.append(
            {
                "name": name,
                "path": str(path),
                "summary": recipe_summary(path),
                "profiles": [p["name"] for p in profiles if p.get("recipe") == name],
            }
        )
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    t = Table(title="recipes", title_justify="left", caption="clusterctl recipes show NAME prints the resolved config")
    for col in ("name", "profiles", "what"):
        t.add_column(col, no_wrap=col == "name")
    for r in rows:
        t.add_row(r["name"], ", ".join(r["profiles"]), r["summary"])
    output.console.print(t)


@app.command()
def show(name: str = typer.Argument(..., help="Recipe name or path."), json_: bool = JSON) -> None:
    """A recipe as the trainer would read it (its base applied), before a profile's plan fills in the batch split."""
    from clusterctl.planning.recipes import find_recipe
    from vltrain.config import load_train_config

    path = find_recipe(name, "NAME")
    cfg = load_train_config(path)
    if json_:
        print_json({"name": name, "path": str(path), "config": cfg.to_dict()})
        return
    from clusterctl.render.plan_view import print_config

    print_config(cfg.to_dict(), str(path))
