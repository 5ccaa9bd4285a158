"""`clusterctl recipes list|show`: the shipped train configs, and which profile runs each."""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

import typer

from clusterctl.cli.options import JSON
from clusterctl.render import output
from clusterctl.render.output import print_json
from clusterctl.render.safe import cell, printable
from vltrain.common.errors import UserError

app = typer.Typer(
    help="List and show the recipes (train configs: one per seed, its twin, the demo).", no_args_is_help=True
)


@app.command("list")
def list_(json_: bool = JSON) -> None:
    """Every recipe: what it is and the profiles that run it by default. A *.toml in ./configs that
    is no recipe (a directory, a FIFO, a binary file, a name that is not one) is skipped with a note
    (on stderr with --json, whose rows stay a list), never the end of the listing."""
    from clusterctl.planning.profiles import profile_rows
    from clusterctl.planning.recipes import NAME, find_recipe, known_recipes, recipe_summary, search_dirs

    profiles = [r for r in profile_rows() if r["valid"] and not r["shadowed"]]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name in known_recipes():
        try:
            path = find_recipe(name, "NAME")
            summary = recipe_summary(path)
        except UserError:  # found by the glob, not by name: a directory, a FIFO, a device, an odd name
            what = "not a regular file" if re.fullmatch(NAME, name) else f"not a recipe name ({NAME})"
            notes.append(f"{name}.toml in {' or '.join(map(str, search_dirs()))}: {what}; skipped")
            continue
        except UnicodeDecodeError:
            notes.append(f"{path}: not UTF-8 text; skipped")
            continue
        except OSError as e:  # safe_read.NotReadable: 'PATH: what it is'
            notes.append(f"{e}; skipped")
            continue
        rows.append(
            {
                "name": name,
                "path": str(path),
                "summary": summary,
                "profiles": [p["name"] for p in profiles if p.get("recipe") == name],
            }
        )
    if json_:
        print_json(rows)
        _say(notes, sys.stderr)
        return
    from rich.table import Table

    t = Table(title="recipes", title_justify="left", caption="clusterctl recipes show NAME prints the resolved config")
    for col in ("name", "profiles", "what"):
        t.add_column(col, no_wrap=col == "name")
    for r in rows:
        t.add_row(cell(r["name"]), cell(", ".join(r["profiles"])), cell(r["summary"]))
    output.console.print(t)
    _say(notes, sys.stdout)


def _say(notes: list[str], out: TextIO) -> None:
    out.writelines(f"note: {printable(n)}\n" for n in notes)


@app.command()
def show(name: str = typer.Argument(..., help="Recipe name or path."), json_: bool = JSON) -> None:
    """A recipe as the trainer would read it (its base applied), before a profile's plan fills in the batch split,
    and what its paper states that it does not reproduce, with the reason."""
    from clusterctl.planning.recipes import find_recipe, paper_facts
    from vltrain.config import load_train_config

    path = find_recipe(name, "NAME")
    cfg = load_train_config(path)
    paper = paper_facts(path).to_dict()
    if json_:
        print_json(
            {"name": name, "path": str(path), "config": cfg.to_dict(), "paper": paper}
            | {"not_reproduced": paper["not_reproduced"]}
        )
        return
    from clusterctl.render.plan_view import print_config
    from clusterctl.render.recipe_view import print_paper

    print_config(cfg.to_dict(), str(path))
    print_paper(paper)
