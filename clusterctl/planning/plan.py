"""A run's plan: how the global batch splits over the cluster, whether it fits, what a step costs (pure).

`make_plan` is what `clusterctl plan` prints and what `submit` stores with the run: the batch split
(vltrain.batching), the per-GPU memory under ZeRO (clusterctl.planning.memory), the model's size and FLOPs
(vltrain.model_math) and the DeepSpeed config the trainer will use (vltrain.dsconfig). No I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from clusterctl.planning.memory import MemoryBreakdown, breakdown, max_micro_batch
from clusterctl.planning.profiles import ClusterProfile
from vltrain.batching import FIELDS as BATCH_FIELDS
from vltrain.batching import BatchSplit, divisors, split_batch
from vltrain.common.errors import FieldError, UserError
from vltrain.config import TrainConfig
from vltrain.model_config import ModelConfig

DEFAULT_MFU = 0.40  # model FLOPs utilisation assumed for estimates; typical of well-tuned A100/H100 runs


def train_flops_per_sample(model: ModelConfig, activation_checkpointing: bool) -> float:
    """Forward + backward matmul FLOPs of one sample: 3x forward, 4x with activation recomputation.

    The forward count is per block type (image patches, text tokens, cross-attention to the image,
    the heads): vltrain.model_math.forward_flops_per_sample. Backward costs twice the forward; full
    recomputation adds one more forward, hence the "8ND-equivalent" of Narayanan et al. 2021.
    """
    from vltrain.model_math import forward_flops_per_sample

    return (4.0 if activation_checkpointing else 3.0) * forward_flops_per_sample(model)


@dataclass(frozen=True)
class Plan:
    profile: str
    model: str
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    split: BatchSplit
    zero_stage: int
    activation_checkpointing: bool
    params: int
    memory: MemoryBreakdown
    max_micro_batch: int
    flops_per_sample: float
    peak_tflops_per_gpu: float

    def step_time_s(self, mfu: float = DEFAULT_MFU) -> float:
        """Seconds per optimizer step at `mfu` of the profile's bf16 peak."""
        flops = self.flops_per_sample * self.split.global_batch
        return flops / (self.world_size * self.peak_tflops_per_gpu * 1e12 * mfu)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of `clusterctl plan --json` (scripts depend on these key names)."""
        s = self.split
        return {
            "profile": self.profile,
            "model": self.model,
            "world_size": self.world_size,
            "tensor_parallel": self.tensor_parallel,
            "pipeline_parallel": self.pipeline_parallel,
            "data_parallel": s.data_parallel,
            "micro_batch": s.micro_batch,
            "accumulation": s.accumulation,
            "global_batch": s.global_batch,
            "samples_per_gpu_per_step": s.per_rank,
            "zero_stage": self.zero_stage,
            "activation_checkpointing": self.activation_checkpointing,
            "params": self.params,
            "max_micro_batch": self.max_micro_batch,
            "memory": self.memory.to_dict(),
            "flops_per_sample": self.flops_per_sample,
            "mfu_assumed": DEFAULT_MFU,
            "step_time_s": round(self.step_time_s(), 4),
        }


PLAN_FIELDS = ("tp", "pp", "zero_stage", *BATCH_FIELDS)  # what a plan's FieldErrors may name


def _degree(name: str, value: int, world: int) -> int:
    if value < 1 or world % value:
        ok = ", ".join(map(str, divisors(world)))
        raise FieldError(f"{name}: {value} does not divide the world size {world}; allowed: {ok}", PLAN_FIELDS)
    return value


def make_plan(
    profile: ClusterProfile,
    model: ModelConfig,
    global_batch: int,
    *,
    micro_batch: int | None = None,
    accumulation: int | None = None,
    zero_stage: int = 2,
    activation_checkpointing: bool = False,
    tp: int = 1,
    pp: int = 1,
) -> Plan:
    """Split the batch and size the memory; without fixed values take the largest micro batch that fits.

    A fixed micro batch (or accumulation) that does not fit is a UserError naming those that do.
    When not even a micro batch of 1 fits, the plan is still returned with `memory.fits = False` so
    the caller can show the breakdown (submit refuses it, see `require_fit`).
    """
    from vltrain.model_math import activation_bytes_per_sample, param_count

    if zero_stage not in (0, 1, 2, 3):
        raise FieldError(f"zero_stage: {zero_stage} is not valid; allowed: 0, 1, 2, 3", PLAN_FIELDS)
    world = profile.world_size
    _degree("tp", tp, world)
    _degree("pp", pp, world // tp)
    dp = world // (tp * pp)
    params = param_count(model)
    act = activation_bytes_per_sample(model, activation_checkpointing)
    mem_args = dict(zero_stage=zero_stage, data_parallel=dp, capacity_gib=profile.gpu.memory_gib, tp=tp, pp=pp)
    limit = max_micro_batch(params, act, **mem_args)
    if limit == 0:  # not even a micro batch of 1 fits: split as asked (or by 1) and let the breakdown say so
        split = split_batch(global_batch, dp, micro_batch or (None if accumulation else 1), accumulation)
    else:
        split = split_batch(global_batch, dp, micro_batch, accumulation, max_micro_batch=limit)
    mem = breakdown(params, act, split.micro_batch, **mem_args)
    return Plan(
        profile=profile.name,
        model=model.name,
        world_size=world,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        split=split,
        zero_stage=zero_stage,
        activation_checkpointing=activation_checkpointing,
        params=params,
        memory=mem,
        max_micro_batch=limit,
        flops_per_sample=train_flops_per_sample(model, activation_checkpointing),
        peak_tflops_per_gpu=profile.gpu.peak_bf16_tflops,
    )


def require_fit(plan: Plan) -> Plan:
    """Refuse a plan that does not fit, in one line with the figures and what would help."""
    m = plan.memory
    if not m.fits:
        raise UserError(
            f"plan: {plan.model} needs {m.total_gib:.1f} GiB per GPU with micro batch {plan.split.micro_batch} "
            f"on {plan.profile} ({m.capacity_gib:g} GiB); allowed: a higher --zero-stage, "
            f"--activation-checkpointing, more GPUs or a smaller model"
        )
    return plan


def plan_for_run(profile: ClusterProfile, cfg: TrainConfig) -> tuple[Plan, TrainConfig]:
    """The plan for a train config on a profile, and the resolved config: micro batch and accumulation
    filled in, the model as its full table (every figure the trainer will use, preset or not).
    Whether the plan fits is the caller's to check (`require_fit`): a dry run shows the breakdown."""
    from vltrain.presets import resolve_model

    if profile.gpu.kind == "cpu" and cfg.zero_stage == 3:
        raise UserError("zero_stage: 3 is not supported on CPU profiles; allowed: 0, 1, 2")
    model = resolve_model(cfg.model)
    plan = make_plan(
        profile,
        model,
        cfg.global_batch,
        micro_batch=cfg.micro_batch or None,
        accumulation=cfg.accumulation or None,
        zero_stage=cfg.zero_stage,
        activation_checkpointing=cfg.activation_checkpointing,
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
    )
    filled = dataclasses.replace(
        cfg, model=model, micro_batch=plan.split.micro_batch, accumulation=plan.split.accumulation
    )
    return plan, filled
