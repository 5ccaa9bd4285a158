"""The clusterctl command line: one typer app, one module per command group.

The root group turns a `UserError` from any command into one line on stderr and exit code 2;
`--debug` shows the traceback instead. Heavy modules (torch, deepspeed, webdataset) are imported
only inside the commands that train.
"""

from __future__ import annotations

import typer

from clusterctl import __version__
from clusterctl import cmd_plan, cmd_runs, cmd_watch
from clusterctl.cmd_profiles import app as profiles_app
from clusterctl.cmd_report import app as report_app
from clusterctl.cmd_status import status
from vltrain.cligroup import ErrorGroup

app = typer.Typer(
    cls=ErrorGroup,
    help="Plan, submit, watch and account vision-language pre-training runs on Slurm.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
app.add_typer(profiles_app, name="profiles")
app.add_typer(report_app, name="report")
app.command("status")(status)
app.command("plan")(cmd_plan.plan)
app.command("estimate")(cmd_plan.estimate)
app.command("submit")(cmd_runs.submit)
app.command("logs")(cmd_runs.logs)
app.command("cancel")(cmd_runs.cancel)
app.command("resume")(cmd_runs.resume)
app.command("watch")(cmd_watch.watch)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clusterctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    ErrorGroup.debug = debug


def main() -> None:
    app(prog_name="clusterctl")
