"""`clusterctl profiles list|show|validate`: what clusters this install knows about."""

from __future__ import annotations

from pathlib import Path

import typer

from clusterctl.cli.options import JSON
from clusterctl.planning.profiles import (
    code_loading_env,
    discover,
    load_profile,
    profile_origin,
    profile_rows,
    read_profile,
)
from clusterctl.render import output
from clusterctl.render.output import print_json

app = typer.Typer(help="List, show and validate cluster profiles.", no_args_is_help=True)


@app.command("list")
def list_(json_: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Every profile found, in search order; later ones with the same name are shadowed."""
    rows = profile_rows()
    if json_:
        print_json(rows)
        return
    from clusterctl.render.profile_view import print_profiles

    print_profiles(rows)


@app.command()
def show(name: str = typer.Argument(..., help="Profile name or path."), json_: bool = JSON) -> None:
    """One profile with its derived figures (world size, aggregate PFLOP/s, power, memory)."""
    p = load_profile(name, flag="NAME", allow_env=True)  # showing is not running: say where it is from instead
    where = profile_origin(name, "NAME")
    if json_:
        print_json(p.to_dict() | {"source": where})
        return
    import pycountry

    from clusterctl.render.profile_view import print_profile

    country = pycountry.countries.get(alpha_3=p.site.country_iso)
    print_profile(p, country.name if country else p.site.country_iso)
    output.console.print(f"source: {where}", markup=False, highlight=False, soft_wrap=True)
    if risky := code_loading_env(p):
        output.console.print(
            f"note: interconnect.env sets {', '.join(risky)}, outside the allow-list of variables known to load no code; "
            "plan and submit refuse it unless the profile is shipped or yours, or --allow-env",
            markup=False,
            highlight=False,  # wrapped at spaces: a variable name or --allow-env is never split
        )


@app.command()
def validate(paths: list[Path] = typer.Argument(None, help="Profile files (default: every profile found).")) -> None:
    """Validate profile files; exit 2 on the first invalid one, with its one-line error."""
    targets = list(paths) if paths else [p for p, _ in discover()]
    for path in targets:
        p = read_profile(path)
        output.console.print(f"ok  {path}  ({p.name}: {p.world_size} x {p.gpu.model})", markup=False, soft_wrap=True)
