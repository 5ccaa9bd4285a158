"""`clusterctl plan`: split the global batch over a profile's GPUs and check it fits under ZeRO.

The flag names and JSON keys are a public interface (scripts depend on them).
"""

from __future__ import annotations

from typing import Optional

import typer

from clusterctl.cli.options import JSON, PROFILE, fields_as_flags
from clusterctl.render.output import print_json


def plan(
    profile: str = PROFILE,
    model: str = typer.Option(..., "--model", "-m", help="Model preset (vltrain.presets)."),
    global_batch: int = typer.Option(..., "--global-batch", "-b", help="Samples per optimizer step."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Fix the per-GPU micro batch."),
    accum: Optional[int] = typer.Option(None, "--accum", help="Fix the gradient accumulation steps."),
    zero_stage: int = typer.Option(2, "--zero-stage", help="DeepSpeed ZeRO stage 0-3."),
    activation_checkpointing: bool = typer.Option(
        False, "--activation-checkpointing", help="Recompute activations in backward."
    ),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel degree."),
    json_: bool = JSON,
) -> None:
    """Split the global batch over the profile's GPUs and check it fits in GPU memory under ZeRO."""
    from clusterctl.planning.plan import make_plan
    from clusterctl.planning.profiles import load_profile
    from vltrain.presets import get_preset

    prof = load_profile(profile, flag="--profile")
    with fields_as_flags():
        p = make_plan(
            prof,
            get_preset(model, "--model"),
            global_batch,
            micro_batch=micro_batch,
            accumulation=accum,
            zero_stage=zero_stage,
            activation_checkpointing=activation_checkpointing,
            tp=tp,
            pp=pp,
        )
    d = p.to_dict()
    if json_:
        print_json(d)
    else:
        from clusterctl.render.plan_view import print_plan

        print_plan(d)
    if not p.memory.fits:
        raise typer.Exit(1)
