"""What a plan should warn about before the allocation is spent (pure): `plan --json`'s `warnings`,
printed by `plan` and `submit`.

Each warning is one line naming the figure, the threshold and what to change:
  * memory at NEAR_CAPACITY (95%) or more of what PyTorch can allocate (clusterctl.planning.memory);
  * expected MFU (model FLOPs) under MFU_WARNING (15%): the allocation mostly waits on communication;
  * a layout that fits and is FASTER_WARNING (2x) or more faster (the plan's alternatives, which all fit);
  * checkpoint writing above checkpoint.OVERHEAD_WARNING (5%) of the run's time, with a cadence within it.
  * an ITC pool (micro batch x dp) under contrastive.MIN_POOL (16) candidates per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clusterctl.planning.checkpoint import OVERHEAD_WARNING
from clusterctl.planning.contrastive import pool_warning
from clusterctl.planning.memory import NEAR_CAPACITY

if TYPE_CHECKING:
    from clusterctl.planning.plan import Plan, ZeroAlternative

MFU_WARNING = 0.15
FASTER_WARNING = 2.0


def layout_words(strategy: str, a: ZeroAlternative) -> str:
    """'FSDP zero_stage 3 (hybrid) with micro batch 16 x accumulation 1' and its flags."""
    if strategy == "fsdp":
        engine = f"FSDP zero_stage {a.zero_stage}" + (f" ({a.sharding} sharding)" if a.sharding else "")
        sharding = f" --set parallel.sharding={a.sharding}" if a.sharding else ""
    else:
        engine, sharding = f"ZeRO-{a.zero_stage}", ""
    return (
        f"{engine} with micro batch {a.micro_batch} x accumulation {a.accumulation} "
        f"(--zero-stage {a.zero_stage} --micro-batch {a.micro_batch} --accum {a.accumulation}{sharding})"
    )


def plan_warnings(plan: Plan) -> list[str]:
    """The plan's warnings, in the order above (an empty list when none applies)."""
    out = []
    m = plan.memory
    if m.fits and m.near_capacity:
        out.append(
            f"memory: {m.total_gib:.1f} of {m.capacity_gib:g} GiB per GPU ({m.share:.0%}) is at or over "
            f"{NEAR_CAPACITY:.0%} of what PyTorch can allocate; allowed: a smaller --micro-batch, "
            "--activation-checkpointing or a higher --zero-stage"
        )
    mfu, hfu = plan.model_mfu_expected(), plan.mfu_expected()  # MFU in model FLOPs, as `plan` prints it
    if mfu < MFU_WARNING:
        recompute = f" ({hfu:.1%} HFU with recomputation)" if plan.activation_checkpointing else ""
        out.append(
            f"mfu: expected MFU {mfu:.1%}{recompute} is under {MFU_WARNING:.0%} ({plan.total_step_s():.2f} s per "
            f"step, {plan.step_time_s():.2f} s of it compute); see faster_layout and alternatives"
        )
    fastest = max(plan.alternatives, key=lambda a: a.speedup, default=None)
    if fastest is not None and fastest.speedup >= FASTER_WARNING:
        out.append(
            f"layout: {layout_words(plan.strategy, fastest)} is {fastest.speedup:.1f}x faster "
            f"({fastest.total_s:.2f} s per step) and fits ({fastest.memory_gib:.1f} GiB per GPU)"
        )
    k = plan.checkpoint
    if k.overhead > OVERHEAD_WARNING:
        out.append(
            f"checkpoint: writing one every {k.checkpoint_every} steps takes {k.overhead:.1%} of the run "
            f"({k.write_s:.0f} s per {k.checkpoint_every * k.step_s:.0f} s of training), over "
            f"{OVERHEAD_WARNING:.0%}; allowed: checkpoint_every >= {k.cadence_within()} "
            f"(--set checkpoint_every={k.cadence_within()})"
        )
    if pool := pool_warning(plan.objectives, plan.split):
        out.append(pool)
    return out
