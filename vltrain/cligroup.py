"""The root typer group both CLIs (clusterctl, vltrain) use: the one place where a `UserError`
becomes one line `error: ...` on stderr and its exit code (2); `--debug` re-raises it instead."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from vltrain.errors import UserError


class ErrorGroup(TyperGroup):
    debug = False  # set by the root callback's --debug

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except UserError as e:
            if ErrorGroup.debug:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
