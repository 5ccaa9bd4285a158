"""A run's plan: how the global batch splits over the cluster, whether it fits, what a step costs (pure).

`make_plan` is what `clusterctl plan` prints and what `submit` stores with the run: the batch split
(vltrain.batching), the per-GPU and per-node host memory under ZeRO (clusterctl.planning.memory), the
model's size and FLOPs (vltrain.model_math), the step's communication under the DeepSpeed config the
trainer will use (clusterctl.planning.comm, vltrain.dsconfig), the other ZeRO layouts of the same global
batch that would be faster, and the checkpoint's write time against Slurm's signal delay
(clusterctl.planning.checkpoint). Under parallel.strategy "fsdp" the memory and the step time are
clusterctl.planning.fsdp's (FSDP2 x tensor x pipeline parallel, the most loaded pipeline rank).
Layouts the model or the strategy cannot take (vltrain.parallel.layout) are refused first. No I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clusterctl.planning import comm
from clusterctl.planning.advice import plan_warnings
from clusterctl.planning.checkpoint import CheckpointTime, checkpoint_time
from clusterctl.planning.comm import Fabric, StepComm
from clusterctl.planning.host_memory import HostMemory, host_memory, loader_workers
from clusterctl.planning.memory import GIB, MemoryBreakdown, breakdown, comm_buffer_bytes, max_micro_batch
from clusterctl.planning.profiles import ClusterProfile
from vltrain.batching import FIELDS as BATCH_FIELDS
from vltrain.batching import BatchSplit, split_batch
from vltrain.common.errors import FieldError, UserError
from vltrain.config import TrainConfig
from vltrain.model_config import ModelConfig
from vltrain.parallel.layout import data_parallel, layout_problems, microbatch_problem

if TYPE_CHECKING:
    from clusterctl.planning import fsdp

DEFAULT_MFU = 0.40  # FLOPs utilisation of the compute alone; typical of well-tuned A100/H100 runs
RECOMPUTE = 4.0 / 3.0  # hardware over model FLOPs with full activation recomputation (4 forwards for 3)
FASTER_BY = 1.05  # another layout is named faster only when it saves 5%: the models are not finer than that


def train_flops_per_sample(
    model: ModelConfig,
    activation_checkpointing: bool,
    mim_mask_ratio: float = 0.0,
    objectives: tuple[str, ...] | None = None,
) -> float:
    """Forward + backward matmul FLOPs of one sample: 3x forward, 4x with activation recomputation.

    The forward count is per block type (image patches, text tokens, cross-attention to the image,
    the heads): vltrain.model_math.forward_flops_per_sample, of the `objectives` that run (weight > 0:
    `run_objectives`; None: all). Backward costs twice the forward; full recomputation adds one more
    forward, hence the "8ND-equivalent" of Narayanan et al. 2021. `mim_mask_ratio` > 0 adds masked
    image modelling's forward (the visible patches and its decoder).
    """
    from vltrain.model_math import forward_flops_per_sample

    fwd = forward_flops_per_sample(model, mim_mask_ratio=mim_mask_ratio, objectives=objectives)
    return (4.0 if activation_checkpointing else 3.0) * fwd


def stage_objectives(cfg: TrainConfig) -> tuple[tuple[str, ...], ...]:
    """The objectives each curriculum stage weights > 0 (one stage, [loss], without [[stages]])."""
    from vltrain.config import stage_loss
    from vltrain.model_math import active_objectives

    losses = [stage_loss(cfg.loss, st.loss, i) for i, st in enumerate(cfg.stages)] or [cfg.loss]
    return tuple(active_objectives(loss) for loss in losses)


def run_objectives(cfg: TrainConfig) -> tuple[str, ...]:
    """The objectives the run's first stage weights > 0: the work a step does, hence its FLOPs (the
    trainer runs no head or loss weighted 0)."""
    return stage_objectives(cfg)[0]


def mim_ratio(cfg: TrainConfig) -> float:
    """The mask ratio whose MIM cost the plan counts: the run's base loss (a staged recipe's first stage)."""
    return cfg.loss.mim_mask_ratio if cfg.loss.mim > 0 else 0.0


@dataclass(frozen=True)
class ZeroAlternative:
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
    memory_gib: float = 0.0  # per GPU (the most loaded one), as the plan's memory.total_gib
    sharding: str | None = None  # FSDP: parallel.sharding ("full" | "hybrid"); None under DeepSpeed

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
    comm: StepComm  # (a field named like the module: the annotations name its classes directly)
    fabric: Fabric
    checkpoint: CheckpointTime
    alternatives: tuple[ZeroAlternative, ...] = ()
    strategy: str = "deepspeed"
    pp_schedule: str = "1f1b"
    parallel: fsdp.ParallelTime | None = None  # what tp x pp add to the step (strategy "fsdp")
    sharding: str | None = None  # FSDP's parallel.sharding; None under DeepSpeed
    objectives: tuple[str, ...] = ()  # those whose FLOPs count (run_objectives)
    precision: str = "bf16"  # the run's: what the memory table's labels name

    def step_time_s(self, mfu: float = DEFAULT_MFU) -> float:
        """Seconds of compute per optimizer step at `mfu` of the profile's bf16 peak (no communication)."""
        flops = self.flops_per_sample * self.split.global_batch
        return flops / (self.world_size * self.peak_tflops_per_gpu * 1e12 * mfu)

    def parallel_s(self) -> float:
        """Tensor-parallel all-reduces, pipeline sends, bubble and stage imbalance (0 without tp x pp)."""
        return self.parallel.total_s if self.parallel else 0.0

    def total_step_s(self) -> float:
        """Compute plus the communication that compute does not hide, plus what tp x pp add."""
        return self.step_time_s() + self.comm.exposed_s + self.parallel_s()

    def mfu_expected(self) -> float:
        """FLOPs that run (recomputation included: HFU) over (GPUs x peak x total step time): DEFAULT_MFU
        lowered by exposed communication. JSON `mfu_expected`, kept as it was for scripts."""
        return DEFAULT_MFU * self.step_time_s() / self.total_step_s()

    def model_flops_per_sample(self) -> float:
        """The model's FLOPs per sample, recomputation excluded (what MFU counts, PaLM's definition)."""
        return self.flops_per_sample / (RECOMPUTE if self.activation_checkpointing else 1.0)

    def model_mfu_expected(self) -> float:
        """Expected MFU in model FLOPs: mfu_expected without the recomputation (3/4 of it with it)."""
        return self.mfu_expected() * self.model_flops_per_sample() / self.flops_per_sample

    def faster_layout(self) -> ZeroAlternative | None:
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
            "strategy": self.strategy,
            "pp_schedule": self.pp_schedule,
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
                "parallel_s": round(self.parallel_s(), 4),
                "total_s": round(self.total_step_s(), 4),
            },
            "parallel": self.parallel.to_dict() if self.parallel else None,
            "mfu_expected": round(self.mfu_expected(), 4),
            "model_mfu_expected": round(self.model_mfu_expected(), 4),  # recomputation excluded
            "model_flops_per_sample": self.model_flops_per_sample(),
            "precision": self.precision,
            "communication": self.comm.to_dict() | {"fabric": self.fabric.to_dict()},
            "alternatives": [a.to_dict() for a in self.alternatives],
            "faster_layout": faster.to_dict() if faster else None,
            "checkpoint": self.checkpoint.to_dict() | {"too_costly": self.checkpoint.too_costly},
            "sharding": self.sharding,
            "objectives": list(self.objectives),
            "warnings": plan_warnings(self),
        }


PLAN_FIELDS = ("tp", "pp", "zero_stage", *BATCH_FIELDS)  # what a plan's FieldErrors may name
LAYOUT_FIELDS = ("parallel.tp", "parallel.pp", "zero_stage", "accumulation")


class LayoutError(FieldError):
    """A layout rule broken (vltrain.parallel.layout), its message naming config fields (`parallel.tp`).
    The CLIs key their flags by the plan's short names (`tp` -> `--tp`): mapped here before renaming."""

    def __init__(self, message: str) -> None:
        super().__init__(message, LAYOUT_FIELDS)

    def as_flags(self, flags: dict[str, str]) -> UserError:
        long = {(f"parallel.{k}" if k in ("tp", "pp") else k): v for k, v in flags.items()}
        return FieldError(str(self), self.fields).as_flags(long)


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
    strategy: str | None = None,
    pp_schedule: str | None = None,
) -> Plan:
    """Split the batch and size the memory; without fixed values take the largest micro batch that fits.

    A layout the model or the strategy cannot take is a LayoutError (vltrain.parallel.layout); a fixed
    micro batch (or accumulation) that does not fit is a UserError naming those that do. When not even
    a micro batch of 1 fits, the plan is still returned with `memory.fits = False` so the caller can
    show the breakdown (submit refuses it, see `require_fit`). `train_config` gives the settings that
    shape the trainer's engine and data loader (strategy, pipeline schedule, precision, data.workers,
    loss.mim); without it, the defaults. `strategy` and `pp_schedule` override the config's.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise FieldError(f"zero_stage: {zero_stage} is not valid; allowed: 0, 1, 2, 3", PLAN_FIELDS)
    cfg = train_config or TrainConfig(zero_stage=zero_stage, activation_checkpointing=activation_checkpointing)
    par = dataclasses.replace(
        cfg.parallel,
        tp=tp,
        pp=pp,
        strategy=strategy or cfg.parallel.strategy,
        pp_schedule=pp_schedule or cfg.parallel.pp_schedule,
    )
    cfg = dataclasses.replace(
        cfg,
        zero_stage=zero_stage,
        activation_checkpointing=activation_checkpointing,
        parallel=par,
        accumulation=accumulation or 0,
    )
    world = profile.world_size
    problems = layout_problems(dataclasses.replace(cfg, model=model), world, profile.nodes.gpus_per_node)
    if problems:
        raise LayoutError(problems[0])
    dp = data_parallel(world, tp, pp)  # layout_problems has checked that tp x pp divides the world
    build = _fsdp_plan if par.strategy == "fsdp" else _deepspeed_plan
    return build(profile, model, global_batch, micro_batch, accumulation, cfg, dp)


def _deepspeed_plan(
    profile: ClusterProfile,
    model: ModelConfig,
    global_batch: int,
    micro_batch: int | None,
    accumulation: int | None,
    cfg: TrainConfig,
    dp: int,
) -> Plan:
    """DeepSpeed ZeRO data parallel (tp = pp = 1): clusterctl.planning.memory and comm."""
    from vltrain.model_math import activation_bytes_per_sample, largest_layer_params, param_count
    from vltrain.support import not_run_yet

    zero_stage, activation_checkpointing = cfg.zero_stage, cfg.activation_checkpointing
    tp, pp, world = cfg.parallel.tp, cfg.parallel.pp, profile.world_size
    params = param_count(model, mim=cfg.uses_mim())  # the MIM decoder exists when any stage uses it
    act = activation_bytes_per_sample(model, activation_checkpointing)
    cuda = profile.gpu.kind == "cuda"
    device = "cuda" if cuda else "cpu"

    def mem_args(stage: int) -> dict[str, Any]:
        ds = _deepspeed(cfg, stage, split_batch(global_batch, dp), world, device, params)
        buffers = comm_buffer_bytes(stage, params / (tp * pp), ds)
        return dict(data_parallel=dp, capacity_gib=profile.gpu.capacity_gib, tp=tp, pp=pp, comm_buffers=buffers)

    limit = max_micro_batch(params, act, zero_stage=zero_stage, **mem_args(zero_stage))
    if limit == 0:  # not even a micro batch of 1 fits: split as asked (or by 1) and let the breakdown say so
        split = split_batch(global_batch, dp, micro_batch or (None if accumulation else 1), accumulation)
    else:
        split = split_batch(global_batch, dp, micro_batch, accumulation, max_micro_batch=limit)
    mem = breakdown(params, act, split.micro_batch, zero_stage=zero_stage, **mem_args(zero_stage))

    param_bytes = 2 if cfg.precision in ("bf16", "fp16") else 4
    objectives = run_objectives(cfg)
    flops = train_flops_per_sample(model, activation_checkpointing, mim_ratio(cfg), objectives)
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
        gpu_gib=mem.capacity_gib,
        dataset_samples=cfg.data.samples or cfg.steps * global_batch,  # the loader's index: one pass when unset
    )
    ckpt = checkpoint_time(profile, params, zero_stage, dp, total_s, tp * pp, param_bytes, cfg.checkpoint_every)

    alternatives = []
    for stage in (0, 1, 2, 3):
        if stage == 3 and not cuda:  # plan_for_run refuses ZeRO-3 on CPU profiles
            continue
        stage_limit = (
            limit if stage == zero_stage else max_micro_batch(params, act, zero_stage=stage, **mem_args(stage))
        )
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
            ZeroAlternative(
                stage,
                alt.micro_batch,
                alt.accumulation,
                compute_s,
                c.communication_s,
                c.exposed_s,
                t,
                total_s / t,
                runs,
                breakdown(params, act, alt.micro_batch, zero_stage=stage, **mem_args(stage)).total_gib,
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
        strategy=cfg.parallel.strategy,
        pp_schedule=cfg.parallel.pp_schedule,
        objectives=objectives,
        precision=cfg.precision,
    )


def _fsdp_plan(
    profile: ClusterProfile,
    model: ModelConfig,
    global_batch: int,
    micro_batch: int | None,
    accumulation: int | None,
    cfg: TrainConfig,
    dp: int,
) -> Plan:
    """FSDP2 x tensor x pipeline parallel: clusterctl.planning.fsdp, the most loaded pipeline rank."""
    from clusterctl.planning import fsdp  # on use: DeepSpeed plans (and their `plan`) never need it
    from clusterctl.planning.stages import rank_shares
    from vltrain.model_math import param_count

    par, world, cap = cfg.parallel, profile.world_size, profile.gpu.capacity_gib
    gpn = profile.nodes.gpus_per_node
    ckpt_on, cuda = cfg.activation_checkpointing, profile.gpu.kind == "cuda"
    param_bytes = 2 if cfg.precision in ("bf16", "fp16") else 4
    split_batch(global_batch, dp)  # the global batch's own errors first
    per_rank = global_batch // dp

    def schedule_takes(n: int) -> bool:
        return microbatch_problem(n, par.pp, par.pp_schedule) is None

    idle = tuple(fsdp.idle_kinds(o) for o in stage_objectives(cfg))  # the first stage's first: its traffic

    def layout(stage: int, sharding: str = par.sharding) -> fsdp.ParallelLayout:
        return fsdp.ParallelLayout(
            par.tp, par.pp, dp, stage, par.pp_schedule, param_bytes, ckpt_on, sharding, gpn, idle
        )

    def choose(stage: int, fixed: bool, sharding: str = par.sharding) -> tuple[BatchSplit, int]:
        """The split (the largest micro batch that fits and the schedule takes, unless fixed) and the limit."""
        lay = layout(stage, sharding)
        fits = fsdp.max_micro_batch(model, lay, per_rank, cap)
        limit = fits if fixed else fsdp.max_micro_batch(model, lay, per_rank, cap, schedule_takes)
        if fixed or limit == 0:  # not even a micro batch of 1 fits: split as asked (or by 1)
            s = split_batch(global_batch, dp, micro_batch or (None if accumulation else 1), accumulation, fits or None)
        else:
            s = split_batch(global_batch, dp, max_micro_batch=limit)
        if why := microbatch_problem(s.accumulation, par.pp, par.pp_schedule):
            raise LayoutError(why)
        return s, limit

    objectives = run_objectives(cfg)
    flops = train_flops_per_sample(model, ckpt_on, mim_ratio(cfg), objectives)
    compute_s = flops * global_batch / (world * profile.gpu.peak_bf16_tflops * 1e12 * DEFAULT_MFU)
    fab = comm.fabric(profile)
    backward = comm.BACKWARD_SHARE_RECOMPUTE if ckpt_on else comm.BACKWARD_SHARE
    shares = rank_shares(model, par.tp, par.pp, par.pp_schedule, ckpt_on)
    heaviest = max(shares, key=lambda s: s.params)  # its collectives are the longest

    def timing(stage: int, s: BatchSplit, sharding: str = par.sharding) -> tuple[comm.StepComm, fsdp.ParallelTime]:
        lay = layout(stage, sharding)
        running = fsdp.run_share(model, heaviest, lay, idle[0])[0]
        return (
            fsdp.step_comm(heaviest, lay, s.accumulation, compute_s, fab, backward, running),
            fsdp.parallel_time(model, lay, s.micro_batch, s.accumulation, compute_s, fab),
        )

    split, limit = choose(cfg.zero_stage, bool(micro_batch or accumulation))
    mem, worst = fsdp.memory(model, layout(cfg.zero_stage), split.micro_batch, split.accumulation, cap)
    step, ptime = timing(cfg.zero_stage, split)
    ptime = dataclasses.replace(ptime, most_loaded_rank=worst)
    total_s = compute_s + step.exposed_s + ptime.total_s
    params = param_count(model, mim=cfg.uses_mim())  # the MIM decoder exists when any stage uses it
    nodes = profile.nodes
    # host memory and checkpoints: DCP's sharded fp32 weights + AdamW m, v are ZeRO-3's 12 bytes per
    # parameter over the ranks, with nothing whole on the host (the heaviest rank's share, resharded)
    host = host_memory(
        int(heaviest.params),
        int(heaviest.largest_unit),
        zero_stage=3,
        data_parallel=dp,
        gpus_per_node=nodes.gpus_per_node,
        capacity_gib=nodes.memory_gib,
        workers=loader_workers(cfg.data.workers, cuda, nodes.cpus_per_node, nodes.gpus_per_node),
        cuda=cuda,
        model_on_host_bytes=0.0 if cuda else (mem.total_gib - mem.buffers_gib) * GIB,
        param_bytes=param_bytes,
        dataset_samples=cfg.data.samples or cfg.steps * global_batch,  # the loader's index: one pass when unset
        deepspeed=False,
        rank0_build_params=params,  # a new run: rank 0's whole seeded model, built on the CPU (fp32)
    )
    ckpt = checkpoint_time(profile, params, 3, dp, total_s, par.tp * par.pp, param_bytes, cfg.checkpoint_every)
    alternatives = []
    for stage, sharding in ((2, "full"), (3, "full"), (2, "hybrid"), (3, "hybrid")):
        try:
            alt, _ = choose(stage, False, sharding)
        except UserError:
            continue
        same = (stage, sharding, alt.micro_batch) == (cfg.zero_stage, par.sharding, split.micro_batch)
        alt_mem = fsdp.memory(model, layout(stage, sharding), alt.micro_batch, alt.accumulation, cap)[0]
        if same or not alt_mem.fits or (sharding == "hybrid" and layout(stage, sharding).shard_group == dp):
            continue  # the plan itself, one that does not fit, or hybrid that is full sharding on one node
        c, pt = timing(stage, alt, sharding)
        t = compute_s + c.exposed_s + pt.total_s
        alternatives.append(
            ZeroAlternative(
                stage,
                alt.micro_batch,
                alt.accumulation,
                compute_s,
                c.communication_s,
                c.exposed_s,
                t,
                total_s / t,
                memory_gib=alt_mem.total_gib,
                sharding=sharding,
            )
        )
    return Plan(
        profile=profile.name,
        model=model.name,
        world_size=world,
        tensor_parallel=par.tp,
        pipeline_parallel=par.pp,
        split=split,
        zero_stage=cfg.zero_stage,
        activation_checkpointing=ckpt_on,
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
        strategy="fsdp",
        pp_schedule=par.pp_schedule,
        parallel=ptime,
        sharding=par.sharding,
        objectives=objectives,
        precision=cfg.precision,
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

    if profile.gpu.kind == "cpu" and cfg.zero_stage == 3 and cfg.parallel.strategy == "deepspeed":
        raise UserError(
            "zero_stage: 3 is not supported under DeepSpeed on CPU profiles; allowed: 0, 1, 2, "
            "or --set parallel.strategy=fsdp"
        )
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
