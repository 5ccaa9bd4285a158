"""`clusterctl plan`: split the global batch over a profile's GPUs and check it fits under ZeRO.

What it plans is what `submit` would run: the profile's recipe (or --config), with --model, --set
and the planning flags on top (the same options as submit, from cli/options.py). The flag names
and JSON keys are a public interface (scripts depend on them).
"""

from __future__ import annotations

from pathlib import Path

import typer

from clusterctl.cli.options import (
    ACCUM,
    ACTIVATION_CHECKPOINTING,
    ALLOW_ENV,
    CONFIG,
    GLOBAL_BATCH,
    JSON,
    MICRO_BATCH,
    MODEL,
    PP,
    PROFILE,
    SET,
    TP,
    ZERO_STAGE,
    config_layers,
    fields_as_flags,
    flag_fields,
)
from clusterctl.render.output import print_json


def plan(
    profile: str = PROFILE,
    config: Path = CONFIG,
    model: str = MODEL,
    global_batch: int = GLOBAL_BATCH,
    micro_batch: int = MICRO_BATCH,
    accum: int = ACCUM,
    zero_stage: int = ZERO_STAGE,
    activation_checkpointing: bool = ACTIVATION_CHECKPOINTING,
    tp: int = TP,
    pp: int = PP,
    set_: list[str] = SET,
    allow_env: bool = ALLOW_ENV,
    json_: bool = JSON,
) -> None:
    """Split the global batch over the profile's GPUs and check it fits in GPU memory under ZeRO."""
    from clusterctl.runs.preflight import trainer_support
    from clusterctl.runs.submit import prepare

    layers = config_layers(
        model,
        set_,
        global_batch=global_batch,
        micro_batch=micro_batch,
        accum=accum,
        zero_stage=zero_stage,
        activation_checkpointing=activation_checkpointing,
        tp=tp,
        pp=pp,
    )
    with fields_as_flags(flag_fields(layers)):
        # data checks are submit's; the estimate of the whole run is `estimate`'s and submit's
        p = prepare(profile, config, layers, check=False, allow_env=allow_env, estimate=False)
    d = {k: v for k, v in p.plan.items() if k != "steps"} | {"profile_source": p.profile_source}
    if json_:
        print_json(d)
    else:
        from clusterctl.render.plan_view import print_plan
        from clusterctl.render.safe import printable
        from clusterctl.render.text import say

        say(f"profile {printable(p.profile.name)} from {printable(p.profile_source)}")
        print_plan(d)
        for line in trainer_support(p.config):
            say(f"note: {printable(line)}")
    if not p.plan["memory"]["fits"]:
        raise typer.Exit(1)
