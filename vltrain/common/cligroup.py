"""The root typer group both CLIs (clusterctl, vltrain) use: the one place where errors meet the
user. A `UserError` (or `ServiceUnavailable`) becomes one line `error: ...` on stderr and its exit
code (2, or 3 for an outage); `--debug` re-raises it instead. A usage error found while parsing
(unknown option, value out of range, missing argument) is one line too, naming the flag and pointing
at `--help`, in place of click's framed usage block, so every bad input reads the same way and
scripts can grep one line."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from vltrain.common.errors import ServiceUnavailable, UserError


class ErrorGroup(TyperGroup):
    debug = False  # set by the root callback's --debug

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (UserError, ServiceUnavailable) as e:
            if ErrorGroup.debug:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(
                args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
            )
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
        from typer.exceptions import Abort

        try:  # click's own standalone handling, with usage errors as one line
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:  # typer's rich help is printed already; click's plain help is here
            if e.format_message().strip():
                typer.echo(e.format_message())
            sys.exit(e.exit_code)
        except UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "")
            typer.echo(f"error: {e.format_message()} (see '{where} --help')", err=True)
            sys.exit(e.exit_code)
        except ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        # non-standalone click returns an Exit's code, or the command's return value (None here)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)
