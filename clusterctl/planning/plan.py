"""A run's plan: how the global batch splits over the cluster, whether it fits, what a step costs (pure).

`make_plan` is what `clusterctl plan` prints and what `submit` stores with the run: the batch split
(vltrain.batching), the per-GPU and per-node host memory under ZeRO (clusterctl.planning.memory), the
model's size and FLOPs (vltrain.model_math), the step's communication under the DeepSpeed config the
trainer will use (clusterctl.planning.comm, vltrain.dsconfig), the other ZeRO layouts of the same global
batch that would be faster, and the checkpoint's write time against Slurm's signal delay
(clusterctl.planning.checkpoint). No I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from clusterctl.planning import comm
from clusterctl.planning.checkpoint import CheckpointTime, checkpoint_time
from clusterctl.planning.memory import (
    GIB,
    HostMemory,
    MemoryBreakdown,
    breakdown,
    host_memory,
    loader_workers,
    max_micro_batch,
)
from clusterctl.planning.profiles import ClusterProfile
from vltrain.batching import FIELDS as BATCH_FIELDS
from vltrain.batching import BatchSplit, divisors, split_batch
from vltrain.common.errors import FieldError, UserError
from vltrain.config import TrainConfig
from vltrain.model_config import ModelConfig

DEFAULT_MFU = 0.40  # model FLOPs utilisation of the compute alone; typical of well-tuned A100/H100 runs
FASTER_BY = 1.05  # another layout is named faster only when it saves 5%: the models are not finer than that


def train_flops_per_sample(model: ModelConfig, activation_checkpointing: bool) -> float:
    """Forward + backward matmul FLOPs of one sample: 3x forward, 4x with activation recomputation.

    The forward count is per block type (image patches, text tokens, cross-attention to the image,
    the heads): vltrain.model_math.forward_flops_per_sample. Backward costs twice the forward; full
    recomputation adds one more forward, hence the "8ND-equivalent" of Narayanan et al. 2021.
    """
    from vltrain.model_math import forward_flops_per_sample

    return (4.0 if activation_checkpointing else 3.0) * forward_flops_per_sample(model)


@dataclass(frozen=True)
class Layout:
    """Another ZeRO stage for the same global batch, with the largest micro batch that fits in GPU memory."""

    zero_stage: int
    micro_batch: int
    accumulation: int
    compute_s: float
    communication_s: float
    exposed_communication_s: float
    total_s: float
    speedup: float  # the plan's total_s / this one's
    trainer_runs: bool = True  # False: vltrain.support says the trainer does not run this ZeRO stage yet

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


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
    host: HostMemory
    comm: comm.StepComm
    fabric: comm.Fabric
    checkpoint: CheckpointTime
    alternatives: tuple[Layout, ...] = ()

    def step_time_s(self, mfu: float = DEFAULT_MFU) -> float:
        """Seconds of compute per optimizer step at `mfu` of the profile's bf16 peak (no communication)."""
        flops = self.flops_per_sample * self.split.global_batch
        return flops / (self.world_size * self.peak_tflops_per_gpu * 1e12 * mfu)

    def total_step_s(self) -> float:
        """Compute plus the communication that compute does not hide."""
        return self.step_time_s() + self.comm.exposed_s

    def mfu_expected(self) -> float:
        """Model FLOPs over (GPUs x peak x total step time): DEFAULT_MFU lowered by exposed communication."""
        return DEFAULT_MFU * self.step_time_s() / self.total_step_s()

    def faster_layout(self) -> Layout | None:
        """The layout to suggest: among those faster than this one by FASTER_BY, the lowest ZeRO stage
        (then the fewest accumulation steps) within FASTER_BY of the fastest. Why not simply the
        fastest: the bandwidth model leaves out per-collective latency, which ZeRO-3's per-layer
        gathers pay most, so a near tie goes to the simpler layout. None when no layout is faster."""
        faster = [a for a in self.alternatives if a.speedup >= FASTER_BY]
        if not faster:
            return None
        best = min(a.total_s for a in faster)
        return min((a for a in faster if a.total_s <= best * FASTER_BY), key=lambda a: (a.zero_stage, a.accumulation))

    def to_dict(self) -> dict[str, Any]:
        """The JSON of `clusterctl plan --json` (scripts depend on these key names: extend, never rename)."""
        s = self.split
        faster = self.faster_layout()
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
            "host_memory": self.host.to_dict(),
            "step_time": {
                "compute_s": round(self.step_time_s(), 4),
                "communication_s": round(self.comm.communication_s, 4),
                "exposed_communication_s": round(self.comm.exposed_s, 4),
                "total_s": round(self.total_step_s(), 4),
            },
            "mfu_expected": round(self.mfu_expected(), 4),
            "communication": self.comm.to_dict() | {"fabric": self.fabric.to_dict()},
            "alternatives": [a.to_dict() for a in self.alternatives],
            "faster_layout": faster.to_dict() if faster else None,
            "checkpoint": self.checkpoint.to_dict(),
        }


PLAN_FIELDS = ("tp", "pp", "zero_stage", *BATCH_FIELDS)  # what a plan's FieldErrors may name


def _degree(name: str, value: int, world: int) -> int:
    if value < 1 or world % value:
        ok = ", ".join(map(str, divisors(world)))
        raise FieldError(f"{name}: {value} does not divide the world size {world}; allowed: {ok}", PLAN_FIELDS)
    return value


def _deepspeed(cfg: TrainConfig, stage: int, split: BatchSplit, world: int, device: str, params: int):
    """The communication settings of the DeepSpeed config the trainer would build for this layout."""
    from vltrain.dsconfig import deepspeed_config

    ds = deepspeed_config(
        dataclasses.replace(cfg, zero_stage=stage),
        split.micro_batch,
        split.accumulation,
        world,
        device=device,
        params=params,
    )
    return comm.from_deepspeed_config(ds)


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
    train_config: TrainConfig | None = None,
) -> Plan:
    """Split the batch and size the memory; without fixed values take the largest micro batch that fits.

    A fixed micro batch (or accumulation) that does not fit is a UserError naming those that do.
    When not even a micro batch of 1 fits, the plan is still returned with `memory.fits = False` so
    the caller can show the breakdown (submit refuses it, see `require_fit`). `train_config` gives the
    settings that shape the DeepSpeed config and the data loader (precision, data.workers); without it,
    the defaults.
    """
    from vltrain.model_math import activation_bytes_per_sample, largest_layer_params, param_count
    from vltrain.support import not_run_yet

    if zero_stage not in (0, 1, 2, 3):
        raise FieldError(f"zero_stage: {zero_stage} is not valid; allowed: 0, 1, 2, 3", PLAN_FIELDS)
    world = profile.world_size
    _degree("tp", tp, world)
    _degree("pp", pp, world // tp)
    dp = world // (tp * pp)
    params = param_count(model)
    act = activation_bytes_per_sample(model, activation_checkpointing)
    mem_args = dict(data_parallel=dp, capacity_gib=profile.gpu.memory_gib, tp=tp, pp=pp)
    limit = max_micro_batch(params, act, zero_stage=zero_stage, **mem_args)
    if limit == 0:  # not even a micro batch of 1 fits: split as asked (or by 1) and let the breakdown say so
        split = split_batch(global_batch, dp, micro_batch or (None if accumulation else 1), accumulation)
    else:
        split = split_batch(global_batch, dp, micro_batch, accumulation, max_micro_batch=limit)
    mem = breakdown(params, act, split.micro_batch, zero_stage=zero_stage, **mem_args)

    cfg = train_config or TrainConfig(zero_stage=zero_stage, activation_checkpointing=activation_checkpointing)
    cuda = profile.gpu.kind == "cuda"
    device = "cuda" if cuda else "cpu"
    param_bytes = 2 if cfg.precision in ("bf16", "fp16") else 4
    flops = train_flops_per_sample(model, activation_checkpointing)
    compute_s = flops * global_batch / (world * profile.gpu.peak_bf16_tflops * 1e12 * DEFAULT_MFU)
    fab = comm.fabric(profile)
    backward = comm.BACKWARD_SHARE_RECOMPUTE if activation_checkpointing else comm.BACKWARD_SHARE

    def step_comm(stage: int, s: BatchSplit) -> comm.StepComm:
        ds = _deepspeed(cfg, stage, s, world, device, params)
        return comm.step_comm(params / (tp * pp), stage, dp, s.accumulation, compute_s, fab, ds, backward)

    step = step_comm(zero_stage, split)
    total_s = compute_s + step.exposed_s
    nodes = profile.nodes
    host = host_memory(
        params,
        largest_layer_params(model),
        zero_stage=zero_stage,
        data_parallel=dp,
        gpus_per_node=nodes.gpus_per_node,
        capacity_gib=nodes.memory_gib,
        workers=loader_workers(cfg.data.workers, cuda, nodes.cpus_per_node, nodes.gpus_per_node),
        cuda=cuda,
        model_on_host_bytes=0.0 if cuda else (mem.total_gib - mem.buffers_gib) * GIB,
        tp=tp,
        pp=pp,
        param_bytes=param_bytes,
    )
    ckpt = checkpoint_time(profile, params, zero_stage, dp, total_s, tp * pp, param_bytes)

    alternatives = []
    for stage in (0, 1, 2, 3):
        if stage == 3 and not cuda:  # plan_for_run refuses ZeRO-3 on CPU profiles
            continue
        stage_limit = limit if stage == zero_stage else max_micro_batch(params, act, zero_stage=stage, **mem_args)
        if stage_limit == 0:
            continue
        alt = split_batch(global_batch, dp, max_micro_batch=stage_limit)
        if (stage, alt.micro_batch) == (zero_stage, split.micro_batch):
            continue
        if comm.deepspeed_refuses(stage, _deepspeed(cfg, stage, alt, world, device, params)):
            continue
        c = step_comm(stage, alt)
        t = compute_s + c.exposed_s
        runs = not any(x.startswith("zero_stage:") for x in not_run_yet(dataclasses.replace(cfg, zero_stage=stage)))
        alternatives.append(
            Layout(
                stage,
                alt.micro_batch,
                alt.accumulation,
                compute_s,
                c.communication_s,
                c.exposed_s,
                t,
                total_s / t,
                runs,
            )
        )
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
        flops_per_sample=flops,
        peak_tflops_per_gpu=profile.gpu.peak_bf16_tflops,
        host=host,
        comm=step,
        fabric=fab,
        checkpoint=ckpt,
        alternatives=tuple(sorted(alternatives, key=lambda a: a.total_s)),
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
        train_config=cfg,
    )
    filled = dataclasses.replace(
        cfg, model=model, micro_batch=plan.split.micro_batch, accumulation=plan.split.accumulation
    )
    return plan, filled
