"""The clusterctl command line: one typer app, one module per command (cli/cmd_*.py), imported on use.

Commands are thin: parse flags -> call the runs or planning layer -> render -> exit code. They never
import each other; what two share lives in cli/options.py (flags) or cli/live.py (the watch loop).

The root group turns a `UserError` from any command into one line on stderr and exit code 2;
`--debug` shows the traceback instead. Each command's module is imported, and its click command
built, only when that command runs (or when `--help` lists them all): `clusterctl status` pays for
status alone, not for planning, reports or the live view. Heavy modules (torch, deepspeed,
webdataset) are imported only inside the commands that train.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import typer

from clusterctl import __version__
from vltrain.common.cligroup import ErrorGroup

# name -> (module, attribute): a command function, or a typer.Typer of subcommands. Help order.
COMMANDS: dict[str, tuple[str, str]] = {
    "profiles": ("clusterctl.cli.cmd_profiles", "app"),
    "presets": ("clusterctl.cli.cmd_presets", "app"),
    "recipes": ("clusterctl.cli.cmd_recipes", "app"),
    "plan": ("clusterctl.cli.cmd_plan", "plan"),
    "estimate": ("clusterctl.cli.cmd_estimate", "estimate"),
    "submit": ("clusterctl.cli.cmd_submit", "submit"),
    "status": ("clusterctl.cli.cmd_status", "status"),
    "watch": ("clusterctl.cli.cmd_watch", "watch"),
    "logs": ("clusterctl.cli.cmd_runs", "logs"),
    "cancel": ("clusterctl.cli.cmd_runs", "cancel"),
    "resume": ("clusterctl.cli.cmd_runs", "resume"),
    "report": ("clusterctl.cli.cmd_report", "app"),
    "registry": ("clusterctl.cli.cmd_registry", "app"),
}


def build_command(name: str, module: str, attr: str):
    """The click command for one table entry (imports its module)."""
    import importlib

    obj = getattr(importlib.import_module(module), attr)
    if isinstance(obj, typer.Typer):
        group = typer.main.get_group(obj)
        group.name = name
        return group
    single = typer.Typer(add_completion=False)
    single.command(name)(obj)
    return typer.main.get_command(single)


class LazyCommands(MutableMapping):
    """click's `group.commands` mapping, filled on first lookup of each name. Listing the names
    (typo suggestions, completion of names) imports nothing; listing items (--help) builds all."""

    def __init__(self, table: dict[str, tuple[str, str]], loaded: dict | None = None) -> None:
        self.table = table
        self.loaded = dict(loaded or {})

    def __getitem__(self, name: str):
        if name not in self.loaded:
            if name not in self.table:
                raise KeyError(name)
            self.loaded[name] = build_command(name, *self.table[name])
        return self.loaded[name]

    def __setitem__(self, name: str, cmd) -> None:
        self.loaded[name] = cmd

    def __delitem__(self, name: str) -> None:
        self.loaded.pop(name, None)
        self.table.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        yield from self.table
        yield from (n for n in self.loaded if n not in self.table)

    def __len__(self) -> int:
        return len(set(self.table) | set(self.loaded))


class LazyGroup(ErrorGroup):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(dict(COMMANDS), self.commands)


app = typer.Typer(
    cls=LazyGroup,
    help="Plan, submit, watch and account vision-language pre-training runs on Slurm.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clusterctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    ErrorGroup.debug = debug


def main() -> None:
    app(prog_name="clusterctl")
