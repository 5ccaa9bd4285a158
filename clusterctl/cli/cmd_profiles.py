"""`clusterctl profiles list|show|validate|calibrate`: what clusters this install knows about."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import typer

from clusterctl.cli.options import JSON
from clusterctl.planning.profiles import (
    code_loading_env,
    discover,
    find_profile,
    load_profile,
    profile_origin,
    profile_rows,
    read_profile,
)
from clusterctl.render import output
from clusterctl.render.output import print_json

app = typer.Typer(help="List, show, validate and calibrate cluster profiles.", no_args_is_help=True)


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


@app.command()
def calibrate(
    name: str = typer.Argument(..., help="Profile name or path (a CPU profile: gpu.kind = 'cpu')."),
    timeout: float = typer.Option(
        900.0, "--timeout", min=1, help="Seconds to wait for the job, queueing included; then it is cancelled."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Measure and print the table; write no file."),
    json_: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Measure a CPU profile's machines with one job laid out as its runs (matmul GFLOP/s, copy
    bandwidth, op overhead, gloo all-reduce between its nodes) and write them into its [calibration]
    table; a shipped profile is copied to your profile directory, which then shadows it."""
    from clusterctl.runs import calibrate as cal
    from clusterctl.runs import calibration_file
    from clusterctl.runs.submit import runs_root

    path = find_profile(name, "NAME")
    profile = load_profile(str(path), flag="NAME")
    where = profile_origin(str(path), "NAME")
    try:
        with _progress(sys.stderr.isatty() and not json_) as say:
            figures = cal.calibrate(profile, runs_root(), timeout, say)
    except KeyboardInterrupt:
        output.err_console.print("interrupted: the calibration job was cancelled", markup=False, highlight=False)
        raise typer.Exit(130) from None
    dest = calibration_file.write(path, where, figures, dry_run=dry_run)
    if json_:
        print_json(figures | {"file": str(dest), "written": not dry_run})
        return
    output.console.print(calibration_file.render(figures), markup=False, highlight=False, soft_wrap=True, end="")
    if dry_run:
        output.console.print(f"dry run: {dest} not written", markup=False, highlight=False, soft_wrap=True)
    elif dest != path:
        output.console.print(
            f"wrote {dest} (a copy of the shipped profile with this table; it now shadows the shipped one)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    else:
        output.console.print(f"wrote {dest} ({where})", markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _progress(tty: bool) -> Iterator[Callable[[str], None]]:
    """A progress line while the job runs: rich's status spinner on a terminal; nothing on a pipe or in
    a log (stderr then holds only the one-line error, if any)."""
    if not tty:
        yield lambda _line: None
        return
    with output.err_console.status("calibration: submitting") as status:
        yield lambda line: status.update(line)
