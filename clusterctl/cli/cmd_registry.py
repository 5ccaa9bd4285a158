"""`clusterctl registry check | rebuild`: is the run registry whole, and make it again if not
(clusterctl.runs.repair check / rebuild; docs/registry.md "When the file is damaged")."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clusterctl.cli.options import JSON
from clusterctl.render import output
from clusterctl.render.output import print_json
from clusterctl.render.safe import printable
from vltrain.common.errors import UserError

app = typer.Typer(help="Check the run registry, or rebuild it from the run directories.", no_args_is_help=True)


def _say(text: str) -> None:
    output.console.print(printable(text), markup=False, highlight=False, soft_wrap=True)


@app.command()
def check(json_: bool = JSON) -> None:
    """Run SQLite's integrity check on the registry (read-only); exit 2 with the problems if any."""
    from clusterctl.runs.dbfile import FOREIGN_HINT, default_path, shown
    from clusterctl.runs.repair import check as check_file

    result = check_file(default_path())
    if json_:
        print_json(result)
    else:
        counts = ", ".join(f"{result.get(t)} {t}" for t in ("runs", "jobs", "events") if result.get(t) is not None)
        _say(
            f"registry {result['path']}: schema version {result['schema_version']}" + (f", {counts}" if counts else "")
        )
        for problem in result["problems"]:
            _say(f"problem: {problem}")
        if not result["problems"]:
            _say("ok: PRAGMA integrity_check and foreign_key_check found no problem")
    if result.get("foreign"):
        raise UserError(f"registry {shown(result['path'])}: {printable(result['problems'][0])}; {FOREIGN_HINT}")
    if result["problems"]:
        n = len(result["problems"])
        raise UserError(
            f"registry {shown(result['path'])}: {n} problem{'s' if n > 1 else ''} found "
            f"({printable(result['problems'][0])}); allowed: `clusterctl registry rebuild` rebuilds it from the run "
            "directories and keeps this file as a backup"
        )


@app.command()
def rebuild(
    runs_dir: Optional[list[Path]] = typer.Option(
        None,
        "--runs-dir",
        help="A directory of run directories to rebuild from, inside the runs directory (repeatable; default: "
        "$CLUSTERCTL_RUNS_DIR or ./runs). Run directories the old file still names are always included; only "
        "directories submit made (mode 700, yours) are read.",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Write the rebuilt registry to FILE and leave the registry as it is."
    ),
    json_: bool = JSON,
) -> None:
    """Rebuild the registry's runs, jobs and events from the run directories (and the rows of the
    old file that can still be read); swap it in atomically, keeping the old file as a backup."""
    from clusterctl.runs.dbfile import default_path
    from clusterctl.runs.repair import rebuild as rebuild_file
    from clusterctl.runs.submit import runs_root

    root = runs_root()
    for d in runs_dir or []:
        if not d.is_dir():
            raise UserError(f"--runs-dir: {printable(str(d))!r} is not a directory; allowed: a directory of runs")
        if not d.resolve().is_relative_to(root.resolve()):  # a clone's ./runs is not where your runs are
            raise UserError(
                f"--runs-dir: {printable(str(d))!r} is outside the runs directory {printable(str(root))!r}; allowed: "
                "that directory or one in it (set CLUSTERCTL_RUNS_DIR to rebuild from another)"
            )
    roots = list(runs_dir or [root])
    done = rebuild_file(default_path(), roots, out)
    if json_:
        from dataclasses import asdict

        print_json(asdict(done))
        return
    _say(
        f"rebuilt registry {done.path}: {done.runs} runs ({len(done.from_dirs)} from their run directories, "
        f"{len(done.from_old)} kept from the old file), {done.jobs} jobs, {done.events} events"
    )
    if done.backup:
        _say(f"the old file is kept as {done.backup}")
    for line in done.lost:
        _say(f"unreadable in the old file: {line}")
    for line in done.skipped:
        _say(f"skipped: {line}")
    _say(
        "job states the run directories cannot tell are UNKNOWN until the next `clusterctl status` asks the "
        "scheduler (Slurm accounting remembers ended jobs)"
    )
