"""Options and arguments more than one command takes, defined once so the commands cannot drift;
and the one place where config-field errors are renamed to the flags a command took."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from vltrain.common.errors import FieldError

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
