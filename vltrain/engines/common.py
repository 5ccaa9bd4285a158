"""What both training engines (vltrain.engines.deepspeed, vltrain.engines.fsdp) build the same way: the
rank's place in the ("pp", "dp", "tp") layout, the seeded model, AdamW's parameter groups and the LR
schedule, the compute dtype, a batch's model inputs. A module of its own so that each engine imports it
without importing the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import torch
from torch import nn

from vltrain.config import LossConfig, TrainConfig
from vltrain.dsconfig import warmup_steps
from vltrain.parallel.layout import data_parallel
from vltrain.presets import resolve_model
from vltrain.schedule import lr_factor


@dataclasses.dataclass(frozen=True)
class RankLayout:
    """Where a rank sits in the ("pp", "dp", "tp") mesh (pure; vltrain.parallel.mesh builds the same).

    `reporter`: one rank per data-parallel replica adds its losses, tokens and FLOPs to the loop's
    per-step sums (the last pipeline stage, which alone computes the loss, at tensor rank 0; its tp
    peers compute the same numbers), so that the sums count each sample once for any layout."""

    world: int
    tp: int = 1
    pp: int = 1
    pp_rank: int = 0
    dp_rank: int = 0
    tp_rank: int = 0

    @property
    def dp(self) -> int:
        return data_parallel(self.world, self.tp, self.pp)

    @property
    def reporter(self) -> bool:
        return self.pp_rank == self.pp - 1 and self.tp_rank == 0

    @classmethod
    def of(cls, rank: int, world: int, tp: int = 1, pp: int = 1) -> RankLayout:
        """rank = (pp_rank * dp + dp_rank) * tp + tp_rank: tp innermost, pp outermost. The trainer checks
        the layout first (vltrain.parallel.layout.layout_problems: world = tp x pp x dp among its rules)."""
        dp = data_parallel(world, tp, pp)
        return cls(world, tp, pp, rank // (dp * tp), (rank // tp) % dp, rank % tp)


class LossScaleAtMinimum(Exception):
    """fp16's dynamic loss scale cannot go lower: every gradient overflows (the loop's divergence)."""


def param_groups(model: nn.Module, weight_decay: float, losses: list[LossConfig] | None = None) -> list[dict[str, Any]]:
    """Weight decay on the weight matrices of Linear and Conv layers only (minGPT's rule).

    Biases, norm gains, embeddings (token, position, cls) and the contrastive temperature are not
    decayed: pulling them towards zero has no regularising meaning and hurts (e.g. a shrinking
    logit_scale raises the temperature).

    `losses`: the run's stage loss weights. Decayed weights that some stage leaves idle (every objective
    they serve weighted 0 there: VLModel.parameter_objectives) go into groups of their own, keyed by
    those objectives ("objectives"), whose decay `set_stage_weight_decay` turns off in such a stage:
    under DeepSpeed's flat buffers an idle parameter gets a zero gradient, and AdamW would still decay
    it (a decoder idle for 90% of a run would shrink to ~2% before its stage). Without idle weights the
    groups are the two above, in that order (the same flat buffers, the same bits as before)."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    objectives_of: dict[str, tuple[str, ...]] = getattr(model, "parameter_objectives", dict)()
    split: dict[tuple[str, ...], list[torch.Tensor]] = {}
    decay: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        objs = objectives_of.get(name, ())
        if id(p) not in decay_ids:
            continue
        if objs and any(all(getattr(lc, o) == 0 for o in objs) for lc in losses or ()):
            split.setdefault(tuple(objs), []).append(p)
        else:
            decay.append(p)
    no_decay = [p for p in model.parameters() if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + [
        {"params": ps, "weight_decay": weight_decay, "objectives": list(objs), "decay_when_used": weight_decay}
        for objs, ps in sorted(split.items())
    ]


def set_stage_weight_decay(groups: list[dict[str, Any]], loss: LossConfig) -> None:
    """A stage's weight decay on `param_groups`' idle-able groups (an optimizer's param_groups, DeepSpeed's
    flat ones alike): 0 where `loss` weights every objective of the group 0, the configured decay otherwise."""
    for group in groups:
        if "objectives" in group:
            idle = all(getattr(loss, o) == 0 for o in group["objectives"])
            group["weight_decay"] = 0.0 if idle else group["decay_when_used"]


def stage_losses(cfg: TrainConfig) -> list[LossConfig]:
    """The loss weights of each stage of the run ([loss] alone without [[stages]])."""
    from vltrain.stages import stage_at, stage_bounds

    return [stage_at(cfg, first)[1] for first, _ in stage_bounds(cfg)]


def build_optimizer(cfg: TrainConfig, model: nn.Module, fused: bool = False):
    """-> (torch AdamW over param_groups, LambdaLR over vltrain.schedule): the same for both strategies."""
    from vltrain.engines.unused_imports import optimizer_without_dynamo

    o = cfg.optim
    with optimizer_without_dynamo():  # torch._dynamo's import: 0.9 s of a rank's start-up
        optimizer = torch.optim.AdamW(
            param_groups(model, o.weight_decay, stage_losses(cfg)),
            lr=o.lr,
            betas=(o.betas[0], o.betas[1]),
            eps=o.eps,
            fused=fused or None,
        )
    # each step decays what the model's loss weights use now (set_loss_config sets them at stage switches)
    if isinstance(getattr(model, "loss_cfg", None), LossConfig):
        optimizer.register_step_pre_hook(lambda opt, *_: set_stage_weight_decay(opt.param_groups, model.loss_cfg))  # type: ignore[arg-type]  # checked above
    schedule = functools.partial(lr_factor, peak=o.lr, min_lr=o.min_lr, warmup=warmup_steps(cfg), total=cfg.steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def retarget_lr(scheduler: Any, peak: float) -> None:
    """After loading a checkpoint written with another peak LR (a fork: `clusterctl submit --from RUN
    --set optim.lr=...`): LambdaLR's state holds the old base LRs, so set this config's, and each
    group's LR at the loaded step from it. The schedule's shape (warm-up, min_lr, total) is this
    config's already (its lambdas are not saved). The same peak touches nothing: an exact resume."""
    if all(base == peak for base in scheduler.base_lrs):
        return
    scheduler.base_lrs = [peak] * len(scheduler.base_lrs)
    for group, fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = peak, peak * fn(scheduler.last_epoch)
    # what get_last_lr says until the next step
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu", *, initialise: bool = False) -> nn.Module:
    """The VLModel of the run, initialised from cfg.seed (identical on every rank), created directly
    on `device`: on a GPU no copy of the weights passes through host memory (a 30.5B model is 114 GiB
    in fp32, x 8 ranks per node), and on the meta device nothing is allocated at all (the planner's
    and the tests' view of a paper-scale model)."""
    from vltrain.model import VLModel
    from vltrain.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID

    torch.manual_seed(cfg.seed)
    device = torch.device(device)
    # off the CPU the weights are born in the training dtype: a 30.5B model is 114 GiB in fp32, more
    # than an 80 GiB GPU holds, and DeepSpeed casts it to bf16 anyway (on the CPU: fp32, then cast)
    dtype = compute_dtype(cfg) if device.type != "cpu" else torch.float32
    with torch.device(device), default_dtype(dtype):
        model = VLModel(
            resolve_model(cfg.model), cfg.loss, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, mask_id=MASK_ID
        )
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    if initialise:  # a fresh run: [init_from] weights before any engine wraps the model
        from vltrain.init_from import apply

        apply(model, cfg.init_from)
    return model


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Tensors created inside are of `dtype` unless told otherwise (the model's weights)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def model_inputs(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
    """VLModel.forward's arguments from a loader batch on `device`: images (in `dtype`), ids, mask,
    MLM's per-sample random numbers (None when the batch has none: masking then uses torch's RNG)."""
    draws = batch.get("mlm_draws")
    return (
        batch["images"].to(device, dtype),
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        None if draws is None else draws.to(device),
    )


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """dtype of the model's inputs under the engine (DeepSpeed casts the module, not the batch)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
