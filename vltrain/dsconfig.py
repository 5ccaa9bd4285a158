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

# DeepSpeed's reduce and all-gather bucket sizes (elements) under ZeRO 1-2; the planner's memory model
# (clusterctl.planning.memory) counts the same buckets.
BUCKET_ELEMENTS = 5e8


def warmup_steps(cfg: TrainConfig) -> int:
    """Warm-up in optimizer steps, from either warmup_steps or warmup_fraction."""
    if cfg.optim.warmup_steps:
        return min(cfg.optim.warmup_steps, cfg.steps)
    return round(cfg.optim.warmup_fraction * cfg.steps)


def deepspeed_config(cfg: TrainConfig, micro_batch: int, accumulation: int, world_size: int) -> dict[str, Any]:
    """DeepSpeed JSON config (plain dict) for this run's batch split; pure."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        # overlap_comm needs CUDA streams; contiguous gradients avoid fragmentation at scale.
        zero.update(
            {
                "overlap_comm": False,
                "contiguous_gradients": True,
                "reduce_bucket_size": BUCKET_ELEMENTS,
                "allgather_bucket_size": BUCKET_ELEMENTS,
            }
        )
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW, see module docstring
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "vltrain": {
            "optimizer": {
                "type": "AdamW",
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
        },
    }
