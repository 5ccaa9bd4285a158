"""The error types at the CLI boundary (vltrain.common): bad input, config fields named as flags,
outages; each one line with its own exit code."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from vltrain.common.cligroup import ErrorGroup
from vltrain.common.errors import FieldError, ServiceUnavailable, UserError


def test_field_errors_take_the_flags_a_command_took():
    e = FieldError(
        "micro_batch 8 x accumulation 4 x 32 ranks = 1024; allowed: micro x accum = 64", ("micro_batch", "accumulation")
    )
    assert str(e.as_flags({"micro_batch": "--micro-batch", "accumulation": "--accum"})) == (
        "--micro-batch 8 x --accum 4 x 32 ranks = 1024; allowed: micro x accum = 64"
    )
    assert str(e.as_flags({"micro_batch": "--micro-batch"})).startswith("--micro-batch 8 x accumulation 4")
    # only whole field names: a longer name or a dotted path that contains one is left alone
    e = FieldError("optim.lr_accumulation: accumulation_steps and accumulation", ("accumulation",))
    assert str(e.as_flags({"accumulation": "--accum"})) == "optim.lr_accumulation: accumulation_steps and --accum"
    assert isinstance(e, UserError)


def test_outage_reason_is_read_without_parsing_the_message():
    e = ServiceUnavailable("squeue: slurmctld did not answer within 10 s", hint="allowed: retry later")
    assert e.reason == "squeue: slurmctld did not answer within 10 s" and str(e).endswith("; allowed: retry later")


def _app(exc: Exception) -> typer.Typer:
    app = typer.Typer(cls=ErrorGroup)

    @app.command()
    def go() -> None:
        raise exc

    @app.command()
    def other() -> None:  # two commands, so `go` is a subcommand as in the real CLIs
        pass

    return app


def test_boundary_prints_one_line_with_the_exit_code_of_each_kind():
    r = CliRunner().invoke(_app(UserError("--x: 3 is not valid; allowed: 1, 2")), ["go"])
    assert r.exit_code == 2 and r.output.strip() == "error: --x: 3 is not valid; allowed: 1, 2"
    r = CliRunner().invoke(_app(ServiceUnavailable("sacct: slurmdbd did not answer within 2 s")), ["go"])
    assert r.exit_code == 3 and r.output.strip() == "error: sacct: slurmdbd did not answer within 2 s"
    r = CliRunner().invoke(_app(ValueError("a bug")), ["go"])
    assert r.exit_code == 1 and isinstance(r.exception, ValueError)  # programming errors are not dressed up
