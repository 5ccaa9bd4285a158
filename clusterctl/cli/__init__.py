"""The clusterctl command line: one typer app, one module per command (cli/cmd_*.py), imported on use.

Commands are thin: parse flags -> call the runs or planning layer -> render -> exit code. They never
import each other; what two share lives in cli/options.py (flags) or cli/live.py (the watch loop).

The root group turns a `UserError` from any command into one line on stderr and exit code 2;
`--debug` shows the traceback instead. Each command's module is imported, and its click command
built, only when that command runs: `clusterctl status` pays for status alone, not for planning,
reports or the live view; `--help` lists them from the table below without building any, and
help is click's plain text (typer's rich help would import rich's markdown and pygments). Heavy
modules (torch, deepspeed, webdataset) are imported only inside the commands that train.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperCommand, TyperGroup

from clusterctl import __version__
from vltrain.common.cligroup import ErrorGroup

if TYPE_CHECKING:
    from typer import _click as click  # the click typer 0.28 vendors (and builds every command with)

# name -> (module, attribute, help): a command function, or a typer.Typer of subcommands, and the
# first paragraph of its help, which `clusterctl --help` lists without importing any command
# (tests/test_import_hygiene.py checks each against the command's own). Help order.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "profiles": ("clusterctl.cli.cmd_profiles", "app", "List, show, validate and calibrate cluster profiles."),
    "presets": ("clusterctl.cli.cmd_presets", "app", "List and show the model presets (named sizes, tiny to the seeds' 30B)."),
    "recipes": ("clusterctl.cli.cmd_recipes", "app", "List and show the recipes (train configs: one per seed, its twin, the demo)."),
    "plan": ("clusterctl.cli.cmd_plan", "plan", "Split the global batch over the profile's GPUs and check it fits in GPU memory under ZeRO."),
    "estimate": ("clusterctl.cli.cmd_estimate", "estimate", "Time, GPU-hours, energy and CO2 for a run, and an audit of claimed figures against them."),
    "submit": ("clusterctl.cli.cmd_submit", "submit", "Plan a run for a profile (its recipe, or --config) and submit it (Slurm via submitit, or a local process)."),
    "status": ("clusterctl.cli.cmd_status", "status", "Where runs stand: state, requeues, step, loss, throughput, ETA, elapsed, GPU-hours."),
    "watch": ("clusterctl.cli.cmd_watch", "watch", "Live view of runs: state, nodes, requeues, steps with ETA, loss sparklines, speed, GPU-hours, energy, log."),
    "logs": ("clusterctl.cli.cmd_runs", "logs", "Print a rank's log of a run's latest job (requeued attempts append to the same file)."),
    "cancel": ("clusterctl.cli.cmd_runs", "cancel", "Cancel a run's active job (scancel on Slurm; SIGTERM to the local job's trainer processes)."),
    "resume": ("clusterctl.cli.cmd_runs", "resume", "Resubmit a stopped run; the trainer continues from the newest complete checkpoint."),
    "report": ("clusterctl.cli.cmd_report", "app", "Energy, carbon, GPU-hour, loss and evaluation reports."),
    "compare": ("clusterctl.cli.cmd_compare", "compare", "Compare runs: config differences, final and best figures, loss curves (--plot PNG)."),
    "registry": ("clusterctl.cli.cmd_registry", "app", "Check the run registry, or rebuild it from the run directories."),
}  # fmt: skip


def build_command(name: str, module: str, attr: str, help: str = "") -> click.Command:
    """The click command for one table entry (imports its module), with plain help like the root's."""
    import importlib

    obj = getattr(importlib.import_module(module), attr)
    cmd: click.Command
    if isinstance(obj, typer.Typer):
        cmd = typer.main.get_group(obj)
        cmd.name = name
    else:
        single = typer.Typer(add_completion=False)
        single.command(name)(obj)
        cmd = typer.main.get_command(single)
    _plain_help(cmd)
    return cmd


def _plain_help(cmd: click.Command) -> None:
    """click's plain help for a command and its subcommands: typer's rich help imports rich's
    markdown and pygments (~55 ms) to draw boxes around the same text."""
    if isinstance(cmd, (TyperCommand, TyperGroup)):  # what typer builds: every command here
        cmd.rich_markup_mode = None
    for sub in getattr(cmd, "commands", {}).values():
        _plain_help(sub)


class LazyCommands(MutableMapping[str, "click.Command"]):
    """click's `group.commands` mapping, filled on first lookup of each name. Listing the names
    (typo suggestions, completion of names) imports nothing; listing items (--help) builds all."""

    def __init__(
        self, table: dict[str, tuple[str, str, str]], loaded: Mapping[str, click.Command] | None = None
    ) -> None:
        self.table = table
        self.loaded = dict(loaded or {})

    def __getitem__(self, name: str) -> click.Command:
        if name not in self.loaded:
            if name not in self.table:
                raise KeyError(name)
            self.loaded[name] = build_command(name, *self.table[name])
        return self.loaded[name]

    def __setitem__(self, name: str, cmd: click.Command) -> None:
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
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = LazyCommands(dict(COMMANDS), self.commands)
        self.commands = self.lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The names, in help order, without building the commands (typer's reads the items)."""
        return list(self.commands)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of --help from the table: no command is imported or built to list it.
        Each help is whole (click would cut it at 45 characters), wrapped to the terminal."""
        rows = []
        for name in self.list_commands(ctx):
            if name in COMMANDS and name not in self.lazy.loaded:
                rows.append((name, COMMANDS[name][2]))
            elif (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=1_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    cls=LazyGroup,
    help="Plan, submit, watch and account vision-language pre-training runs on Slurm.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,  # click's plain help: no rich markdown or pygments at start-up
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
