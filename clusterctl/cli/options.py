"""Options and arguments more than one command takes, defined once so the commands cannot drift;
and the one place where config-field errors are renamed to the flags a command took."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from vltrain.common.errors import FieldError

PROFILE = typer.Option(..., "--profile", "-p", help="Cluster profile name or path.")
JSON = typer.Option(False, "--json", help="Print JSON.")
RUN = typer.Argument(..., help="Run id, id prefix or name.")
MODEL = typer.Option(None, "--model", "-m", help="Model preset (clusterctl plan --help lists them in errors).")
GLOBAL_BATCH = typer.Option(None, "--global-batch", "-b", help="Samples per optimizer step.")
SET = typer.Option([], "--set", help="Config override key=value, repeatable (e.g. optim.lr=3e-4).")

# The plan's config fields and the flags `plan` and `submit` take for them.
PLAN_FLAGS = {
    "global_batch": "--global-batch",
    "micro_batch": "--micro-batch",
    "accumulation": "--accum",
    "zero_stage": "--zero-stage",
    "tp": "--tp",
    "pp": "--pp",
}


@contextlib.contextmanager
def fields_as_flags(given: set[str] | None = None) -> Iterator[None]:
    """Errors about plan fields name this command's flags (of those `given` as flags, or all)."""
    try:
        yield
    except FieldError as e:
        flags = {k: v for k, v in PLAN_FLAGS.items() if given is None or k in given}
        raise e.as_flags(flags) from None
