"""The DeepSpeed config of a run, generated from its train config and its batch split.

One source of truth: `clusterctl plan/submit` writes this dict into the run directory and the
trainer passes the same dict to `deepspeed.initialize`, so what was planned is what runs.
The optimizer and LR schedule are built by the trainer (torch AdamW + vltrain.schedule) rather than
by DeepSpeed's config: torch AdamW needs no JIT-compiled op on CPU, and our schedule supports a
warm-up fraction and a cosine floor that DeepSpeed's WarmupCosineLR expresses differently. They are
recorded here under "vltrain" for the record and for the planner.
"""

from __future__ import annotations

from typing import Any

from vltrain.config import TrainConfig

# DeepSpeed's reduce and all-gather bucket sizes (elements) under ZeRO 1-2 for large models (its own
# default); the planner's memory model (clusterctl.planning.memory) counts the same buckets.
BUCKET_ELEMENTS = 5e8
MIN_BUCKET_ELEMENTS = 2e7  # 80 MB in fp32: messages this large run NVLink and InfiniBand at full speed


# fp16's dynamic loss scaling, DeepSpeed's defaults written out (the FSDP engine's GradScaler takes the same
# initial scale and growth window, vltrain.engines.fsdp): loss_scale 0 = dynamic, from 2^16,
# halved after `hysteresis` overflows in a row, doubled after loss_scale_window steps without one, never
# below min_loss_scale (DeepSpeed then stops the run: the loop's TrainingDiverged).
FP16_DYNAMIC_LOSS_SCALE = {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


def bucket_elements(params: int | None) -> int:
    """Reduce / all-gather bucket size for a model of `params`: a quarter of the model, between 20M
    elements (smaller messages waste bandwidth) and DeepSpeed's 500M (larger ones hold too much
    memory), so that a bucket is reduced while backward runs on the rest (overlap_comm)."""
    if params is None:
        return int(BUCKET_ELEMENTS)
    return int(min(BUCKET_ELEMENTS, max(MIN_BUCKET_ELEMENTS, params / 4)))


def warmup_steps(cfg: TrainConfig) -> int:
    """Warm-up in optimizer steps, from either warmup_steps or warmup_fraction."""
    if cfg.optim.warmup_steps:
        return min(cfg.optim.warmup_steps, cfg.steps)
    return round(cfg.optim.warmup_fraction * cfg.steps)


def hookless_zero(cfg: TrainConfig, world_size: int, reduction: str | None = None, device: str = "cpu") -> bool:
    """Whether ZeRO 1-2 runs as DeepSpeed's stage 1 without gradient hooks: fp32 on one rank (any device)
    or on CPU ranks (gloo); pure.

    ZeRO-2 (and stage 1 with contiguous gradients or overlap_comm) hooks every parameter's gradient:
    copy into a bucket, walk the autograd graph to count the parameters taking part in backward, reduce
    when a bucket fills. One rank partitions nothing and reduces with no one: 117 hooks and ~2 ms of
    Python per micro step on the tiny model, 1.13x a bare PyTorch loop at accumulation 16 against 1.05x
    without (bench/bench_step.py). On CPU ranks in fp32 ZeRO-2 already lets autograd sum the micro steps
    in full-size param.grad and reduces once (vltrain.engines.deepspeed.grad_reduction, coalesced), which
    is what stage 1 does without hooks: the same reduction (DeepSpeed's reduce_independent_p_g_buckets_
    and_remove_grads over every parameter at the boundary) minus the hooks' counting walk at every micro
    step (~45 ms a step of 750 at accumulation 16 on 2 ranks: 1.12x a bare DDP loop; bench/bench_step.py
    --ranks 2 --profile). Stage 1 keeps DeepSpeed's ZeRO optimizer, its fp32 partitions, AdamW and
    checkpoint files (only the stage recorded in them differs, and ZeRO-2 checkpoints resume into it),
    and trains bit-identically (tests/test_trainer_run.py). fp32 only: under bf16 DeepSpeed runs stage 1
    through another optimizer (BF16_Optimizer) with another checkpoint layout. Not on several GPUs:
    there overlap_comm hides ZeRO-2's per-bucket reductions behind backward. An explicit reduction
    (VLTRAIN_GRAD_REDUCTION coalesced or per_micro_step) keeps ZeRO-2's hooks, to compare them."""
    where = world_size == 1 or device == "cpu"
    return where and cfg.precision == "fp32" and cfg.zero_stage in (1, 2) and reduction in (None, "", "auto")


def deepspeed_config(
    cfg: TrainConfig,
    micro_batch: int,
    accumulation: int,
    world_size: int,
    *,
    device: str = "cpu",
    params: int | None = None,
    reduction: str | None = None,
) -> dict[str, Any]:
    """DeepSpeed JSON config (plain dict) for this run's batch split on `device` ('cuda' | 'cpu'); pure.

    On CUDA, gradient reduction overlaps backward (overlap_comm; it needs CUDA streams). Gradients are
    accumulated and reduced in fp32 under bf16 and fp16: bf16 keeps 8 bits of mantissa, and summing the
    seeds' 8-16 micro steps in it errs by 0.4-0.5% of the gradient, 2.6-3.7x what fp32 accumulation of
    the same bf16 gradients does, growing with the steps (tests/test_dsconfig.py measures it). One fp32
    rank and fp32 CPU ranks run ZeRO 1-2 as stage 1 without gradient hooks (hookless_zero). torch's AdamW is in
    DeepSpeed's list of ZeRO-supported optimizers, so no "untested optimizer" flag is needed.
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        **precision_section(cfg),
        "zero_optimization": zero_section(cfg, world_size, device=device, params=params, reduction=reduction),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "vltrain": vltrain_section(cfg, device),
    }


def precision_section(cfg: TrainConfig) -> dict[str, Any]:
    """The keys that set the training precision: bf16, fp16's loss scaling, and fp32 gradient accumulation."""
    # DeepSpeed accumulates in fp32 only under ZeRO (stage 0 with bf16 and fp32 accumulation is its
    # NotImplementedError): at stage 0 it stays bf16, which the planner's memory model knows
    mixed = cfg.precision in ("bf16", "fp16") and cfg.zero_stage >= 1
    return {
        "bf16": {"enabled": cfg.precision == "bf16"},
        **({"fp16": dict(FP16_DYNAMIC_LOSS_SCALE)} if cfg.precision == "fp16" else {}),
        **({"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}} if mixed else {}),
    }


def zero_section(
    cfg: TrainConfig, world_size: int, *, device: str, params: int | None, reduction: str | None
) -> dict[str, Any]:
    """The "zero_optimization" section: the stage (1 without gradient hooks: hookless_zero), and
    from stage 1 on the buckets (bucket_elements) and whether their reduction overlaps backward (CUDA)."""
    bucket = bucket_elements(params)
    hookless = hookless_zero(cfg, world_size, reduction, device)
    zero: dict[str, Any] = {"stage": 1 if hookless else cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(
            {
                "overlap_comm": device == "cuda" and not hookless,
                "contiguous_gradients": not hookless,  # avoids fragmentation at scale
                "reduce_bucket_size": bucket,
                "allgather_bucket_size": bucket,
            }
        )
    return zero


def vltrain_section(cfg: TrainConfig, device: str) -> dict[str, Any]:
    """The "vltrain" section (DeepSpeed ignores it): the optimizer and LR schedule the trainer builds
    itself, recorded for the run's record and the planner."""
    return {
        "optimizer": {
            "type": "AdamW",
            "fused": device == "cuda",  # torch's fused CUDA kernel: one launch for all parameters
            "lr": cfg.optim.lr,
            "betas": list(cfg.optim.betas),
            "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay,
        },
        "schedule": {
            "type": "linear_warmup_cosine",
            "warmup_steps": warmup_steps(cfg),
            "total_steps": cfg.steps,
            "min_lr": cfg.optim.min_lr,
        },
        "activation_checkpointing": cfg.activation_checkpointing,
    }
