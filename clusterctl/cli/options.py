"""Options and arguments more than one command takes, defined once so the commands cannot drift;
and the one place where config-field errors are renamed to the flags a command took.

The twelve planning flags `plan` and `submit` share are one value, `PlanningFlags`: its fields are
the flags (each attribute's value its typer.Option) and `planning_flags` gives a command all of them,
before its own parameters, so that neither command lists them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from vltrain.common.errors import FieldError

if TYPE_CHECKING:
    from clusterctl.runs.submit import Prepared

PROFILE = typer.Option(..., "--profile", "-p", help="Cluster profile name or path.")
CONFIG = typer.Option(None, "--config", "-c", help="Train config TOML (default: the profile's recipe).")
JSON = typer.Option(False, "--json", help="Print JSON.")
RUN = typer.Argument(..., help="Run id, id prefix or name.")
MODEL = typer.Option(
    None, "--model", "-m", help="Model preset (clusterctl presets lists them); overrides the config's."
)
GLOBAL_BATCH = typer.Option(None, "--global-batch", "-b", help="Samples per optimizer step.")
MICRO_BATCH = typer.Option(None, "--micro-batch", help="Fix the per-GPU micro batch (default: the largest that fits).")
ACCUM = typer.Option(None, "--accum", help="Fix the gradient accumulation steps.")
ZERO_STAGE = typer.Option(None, "--zero-stage", help="DeepSpeed ZeRO stage 0-3 (default: the config's, else 2).")
ACTIVATION_CHECKPOINTING = typer.Option(
    None, "--activation-checkpointing/--no-activation-checkpointing", help="Recompute activations in backward."
)
TP = typer.Option(None, "--tp", help="Tensor-parallel degree (parallel.tp; needs parallel.strategy fsdp).")
PP = typer.Option(None, "--pp", help="Pipeline-parallel degree (parallel.pp; needs parallel.strategy fsdp).")
SET = typer.Option([], "--set", help="Config override key=value, repeatable (e.g. optim.lr=3e-4).")
ALLOW_ENV = typer.Option(
    False,
    "--allow-env",
    help="Accept a profile's code-loading environment (LD_PRELOAD, PYTHONPATH...) wherever it comes from.",
)

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


# flag -> config field, for the planning flags plan and submit share
FLAG_FIELDS = {
    "--global-batch": "global_batch",
    "--micro-batch": "micro_batch",
    "--accum": "accumulation",
    "--zero-stage": "zero_stage",
    "--activation-checkpointing": "activation_checkpointing",
    "--tp": "parallel.tp",
    "--pp": "parallel.pp",
    "--steps": "steps",
}


def config_layers(model: str | None, set_: list[str], **flags: object) -> list[tuple[str, dict[str, object]]]:
    """The overrides a command took, in the order they apply: --model, then --set, then each planning
    flag given (`flags` by flag name without dashes: global_batch=..., tp=...)."""
    from vltrain.config import parse_overrides

    layers: list[tuple[str, dict[str, object]]] = [("--model", {"model": model})] if model is not None else []
    layers.append(("--set", parse_overrides(set_)))
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is not None:
            layers.append((flag, {FLAG_FIELDS[flag]: value}))
    return layers


def flag_fields(layers: list[tuple[str, dict[str, object]]]) -> set[str]:
    """The plan fields (as plan errors name them) that came from a flag: those errors name the flag."""
    return {key.rpartition(".")[2] for flag, values in layers if flag in FLAG_FIELDS for key in values}


class PlanningFlags:
    """The flags `plan` and `submit` take to plan a run, declared once (planning_flags gives them to a
    command): the profile, the train config and what overrides it, in the order --help lists them.
    Each annotated attribute is a flag, its value its typer.Option (as a typer command's parameter
    default); an instance holds what typer parsed. A plain class: every command that imports this
    module pays for making it, and a NamedTuple or a dataclass costs 30-200 times more."""

    profile: str = PROFILE
    config: Path | None = CONFIG
    model: str | None = MODEL
    global_batch: int | None = GLOBAL_BATCH
    micro_batch: int | None = MICRO_BATCH
    accum: int | None = ACCUM
    zero_stage: int | None = ZERO_STAGE
    activation_checkpointing: bool | None = ACTIVATION_CHECKPOINTING
    tp: int | None = TP
    pp: int | None = PP
    set_: list[str] = SET
    allow_env: bool = ALLOW_ENV

    def __init__(self, **parsed: Any) -> None:
        if set(parsed) != set(PlanningFlags.__annotations__):  # every flag, each a value, not its option
            raise TypeError(f"PlanningFlags: {sorted(parsed)} are not its flags {list(PlanningFlags.__annotations__)}")
        vars(self).update(parsed)

    def layers(self, steps: int | None = None) -> list[tuple[str, dict[str, object]]]:
        """The overrides these flags make (config_layers), and submit's --steps."""
        return config_layers(
            self.model,
            self.set_,
            global_batch=self.global_batch,
            micro_batch=self.micro_batch,
            accum=self.accum,
            zero_stage=self.zero_stage,
            activation_checkpointing=self.activation_checkpointing,
            tp=self.tp,
            pp=self.pp,
            steps=steps,
        )

    def prepare(self, steps: int | None = None, extra: list | None = None, **kwargs: Any) -> Prepared:
        """runs.submit.prepare of the run these flags describe (`kwargs`: its own: name, check,
        estimate); an error about a plan field names the flag that set it (fields_as_flags). With the
        checks (submit), also what the trainer refuses on the profile's device (preflight.device) and a
        warning for each shipped profile or recipe that a file found by name shadows. `extra`: layers
        after the flags' (a sweep's point: runs.sweep)."""
        from clusterctl.runs.submit import prepare

        layers = self.layers(steps) + (extra or [])
        with fields_as_flags(flag_fields(layers)):
            p = prepare(self.profile, self.config, layers, allow_env=self.allow_env, **kwargs)
        if kwargs.get("check", True):
            from clusterctl.planning.recipes import shadowing
            from clusterctl.runs.preflight import device

            p.checks.problems[:0] = device(p.config, p.profile)
            p.checks.warnings[:0] = shadowing(self.profile, None if self.config else p.profile.recipe)
        return p


def planning_flags(command: Callable[..., None]) -> Callable[..., None]:
    """`command(flags: PlanningFlags, **own)` as typer sees it: every PlanningFlags field as an option
    (its typer.Option, in field order), then the command's own parameters; typer parses them all and
    the command gets the planning ones as one PlanningFlags."""
    types = typing.get_type_hints(PlanningFlags)  # the flags, in their order
    kw = inspect.Parameter.KEYWORD_ONLY
    shared = [inspect.Parameter(n, kw, default=vars(PlanningFlags)[n], annotation=t) for n, t in types.items()]
    own = [p.replace(kind=kw) for p in list(inspect.signature(command, eval_str=True).parameters.values())[1:]]

    @functools.wraps(command)
    def parsed(**given: Any) -> None:
        command(PlanningFlags(**{n: given.pop(n) for n in types}), **given)

    params = shared + own
    # what typer reads: the signature, and the annotations as objects (no strings left to resolve)
    vars(parsed)["__signature__"] = inspect.Signature(params, return_annotation=None)
    parsed.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return parsed
