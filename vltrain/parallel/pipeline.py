"""Pipeline parallelism of VLModel with torch.distributed.pipelining (PipelineStage + schedules).

The model's transformer blocks, in the order its forward uses them (vltrain.parallel.layout:
`PIPELINE_TOWERS`, split by vltrain.parallel.stage_split.`stage_blocks` into contiguous ranges balanced
by their FLOPs and memory per tensor-parallel rank, embeddings and heads included: the same split the
planner sizes), go to the stages. Each stage module is a deep copy of the whole VLModel with
everything outside the stage deleted or set to None (torchtitan's `pipeline_module_split`), so its
parameters keep their original names and a DCP checkpoint holds the same keys under any layout; it runs
the model's own forward (VLModel._run), which runs whatever the copy holds. Between stages flows the
carry (VLModel's module doc); the first stage embeds, the last computes the three losses and returns
them as [1, 3] = (itc, mlm, caption), which the schedule's loss_fn weights with the loss config.

The integer inputs (ids, mask, masked ids, MLM labels, [B, T]) do not travel by P2P: every stage gets
them as keyword arguments of `schedule.step`, which the runtime splits into microbatches for all stages.
(P2P of them fails: on its first step the runtime runs each stage once on uninitialised receive buffers
to learn the carry's shapes, and garbage labels crash the cross-entropy.) MLM masking therefore runs in
`pipeline_step`, before the schedule, on the rank of stage 0, one microbatch after the other as
DeepSpeed's micro steps draw them, and is broadcast over the pipeline group.

Masked image modelling is not run under a pipeline: vltrain.parallel.layout refuses it (the one place),
and the trainer checks the layout before it builds a pipeline.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.pipelining.stage import _PipelineStageBase
from torch.distributed.tensor import DTensor

from vltrain.common.errors import UserError
from vltrain.config import LossConfig
from vltrain.model import losses
from vltrain.model.vl_model import VLModel
from vltrain.parallel.layout import VIRTUAL_STAGES, microbatch_problem, tower_blocks
from vltrain.parallel.stage_split import stage_blocks

# Where each tower of layout.PIPELINE_TOWERS keeps its blocks in VLModel (ModuleDicts keyed by block
# index), and the norm that ends it (the text tower has none: ITC's head norms it, text.unimodal_norm).
BLOCKS = {"vision": "vision.blocks", "text": "text.blocks", "fusion": "text.fusion", "decoder": "decoder.blocks"}
NORMS = {"vision": "vision.norm", "fusion": "text.norm", "decoder": "decoder.norm"}
TIED = "embed.tok.weight"  # token embedding on stage 0, output head on the last stage
SCHEDULES = tuple(VIRTUAL_STAGES)


def virtual_stages(schedule_name: str) -> int:
    """Stages per rank of the named schedule (layout.VIRTUAL_STAGES: 2 for interleaved 1F1B, else 1)."""
    return VIRTUAL_STAGES[schedule_name]


def _drop(stage: nn.Module, path: str) -> None:
    owner, _, name = path.rpartition(".")
    setattr(stage.get_submodule(owner), name, None)


def _prune(model: VLModel, stage_index: int, num_stages: int, blocks: list[tuple[str, int]]) -> VLModel:
    """A deep copy of `model` that holds stage `stage_index`'s modules only (see the module doc)."""
    stage = copy.deepcopy(model)
    stage.pipeline_stage = True
    for tower, path in BLOCKS.items():
        container = stage.get_submodule(path)
        if not isinstance(container, nn.ModuleDict):
            raise TypeError(f"{path}: {type(container).__name__}, not a ModuleDict keyed by block index")
        for key in [k for k in container if (tower, int(k)) not in blocks]:
            del container[key]
    sizes = tower_blocks(model.cfg)
    ends = {t for t, i in blocks if i == sizes[t] - 1}
    for tower, path in NORMS.items():
        if tower not in ends:
            _drop(stage, path)
    first, last = stage_index == 0, stage_index == num_stages - 1
    if not first:
        for path in ("vision.patch_embed", "vision.cls", "vision.pos"):
            _drop(stage, path)
        _drop(stage, "embed.pos" if last else "embed")  # the head needs only the tied matrix
    if not last:
        for path in ("text.unimodal_norm", "image_proj", "text_proj", "logit_scale"):
            _drop(stage, path)
    return stage


def split_stages(
    model: VLModel, pp_rank: int, pp_size: int, virtual_per_rank: int = 1, tp: int = 1
) -> list[tuple[int, VLModel]]:
    """This rank's (stage index, stage module) pairs; stage s runs on pp rank s % pp_size (looped).
    `virtual_per_rank`: `virtual_stages(schedule)`; `tp`: the tensor-parallel degree the split balances for.

    Build `model` the same way on every rank (same seed) before splitting, so the stages hold the
    weights a single-process model would, and the tied embedding starts identical on both ends.
    """
    n = pp_size * virtual_per_rank
    plan = stage_blocks(model.cfg, n, tp)
    return [(s, _prune(model, s, n, plan[s])) for s in range(pp_rank, n, pp_size)]


def make_loss_fn(weights: LossConfig | VLModel) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """The schedule's loss: the last stage's (itc, mlm, caption) weighted as in VLModel's forward.

    `weights`: a LossConfig, or the last stage module, whose `loss_cfg` is then read at every call (the
    loop may swap it between training stages). The schedule averages gradients over microbatches
    (scale_grads), like DeepSpeed's accumulation.
    """

    def loss_fn(parts: torch.Tensor, _target: object) -> torch.Tensor:
        lc = weights.loss_cfg if isinstance(weights, VLModel) else weights
        p = parts[0]
        return losses.weighted(lc, p[0], p[1], p[2])

    return loss_fn


@dataclass
class Pipeline:
    """A built schedule with what pipeline_step needs to drive it on this rank."""

    schedule: _PipelineSchedule
    modules: list[nn.Module]  # this rank's stage modules (possibly wrapped by TP / FSDP afterwards)
    has_first: bool
    has_last: bool
    n_microbatches: int
    pp_group: dist.ProcessGroup
    tied_group: dist.ProcessGroup | None
    mask_args: dict  # VLModel's masking settings (mask_prob, ids)


def _tied_group(pp_group: dist.ProcessGroup) -> dist.ProcessGroup | None:
    """The (first, last) pp-rank pair of this rank's pipeline, created collectively over the world."""
    size = dist.get_world_size(pp_group)
    if size <= 2:
        return pp_group if size == 2 else None
    mine = dist.get_process_group_ranks(pp_group)
    every: list[list[int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(every, mine)
    found = None
    for ranks in sorted({tuple(r) for r in every}):  # same order on every rank, as new_group requires
        group = dist.new_group([ranks[0], ranks[-1]])
        if list(ranks) == mine:
            found = group
    return found


def build_schedule(
    stages: list[tuple[int, nn.Module]],
    pp_group: dist.ProcessGroup,
    n_microbatches: int,
    schedule_name: str,
    loss_fn: Callable,
    device: torch.device,
) -> Pipeline:
    """Wrap this rank's stage modules in PipelineStages and the named schedule.

    `stages` are split_stages' pairs, after tensor parallelism / FSDP were applied to the modules.
    Collective over the world when pp > 2 (creates the tied-embedding groups).
    """
    if schedule_name not in SCHEDULES:
        raise UserError(f"parallel.pp_schedule: {schedule_name!r}; allowed: {', '.join(SCHEDULES)}")
    pp_size = dist.get_world_size(pp_group)
    num_stages = pp_size * len(stages)
    if len(stages) != virtual_stages(schedule_name):
        raise UserError(
            f"parallel.pp_schedule: {schedule_name!r} runs {virtual_stages(schedule_name)} stage(s) per rank, "
            f"got {len(stages)}; allowed: split_stages(..., virtual_per_rank=virtual_stages(schedule))"
        )
    if problem := microbatch_problem(n_microbatches, pp_size, schedule_name):
        raise UserError(problem)
    pstages: list[_PipelineStageBase] = [
        PipelineStage(mod, idx, num_stages, device, group=pp_group) for idx, mod in stages
    ]
    schedule: _PipelineSchedule
    if schedule_name == "interleaved1f1b":
        schedule = ScheduleInterleaved1F1B(pstages, n_microbatches, loss_fn=loss_fn)
    else:
        cls = Schedule1F1B if schedule_name == "1f1b" else ScheduleGPipe
        schedule = cls(pstages[0], n_microbatches, loss_fn=loss_fn)
    model = _unwrap(stages[0][1])
    return Pipeline(
        schedule=schedule,
        modules=[m for _, m in stages],
        has_first=any(i == 0 for i, _ in stages),
        has_last=any(i == num_stages - 1 for i, _ in stages),
        n_microbatches=n_microbatches,
        pp_group=pp_group,
        tied_group=_tied_group(pp_group),
        mask_args={
            "mask_prob": model.loss_cfg.mask_prob,
            "mask_id": model.mask_id,
            "vocab_size": model.cfg.vocab_size,
            "special_ids": (model.pad_id, model.bos_id, model.eos_id, model.mask_id),
        },
    )


def _unwrap(module: nn.Module) -> VLModel:
    return module if isinstance(module, VLModel) else module.module  # type: ignore[return-value]


def pipeline_step(pipe: Pipeline, images, ids, mask, draws=None) -> dict[str, torch.Tensor] | None:
    """Forward + backward of every microbatch of this rank's local batch; grads are left in .grad.

    images [B, 3, S, S], ids [B, T], mask [B, T] (B = microbatch x n_microbatches; T fixed per run),
    draws [3, B, T] MLM's per-sample random numbers (the loader's; None: torch's RNG on stage 0).
    Returns, on the rank that holds the last stage, per-microbatch {"loss", "itc", "mlm", "caption",
    "mim" (zeros: VLModel.forward's keys)} (detached, [n_microbatches]); None elsewhere. Gradients are
    averaged over the microbatches and the tied embedding/head gradient is summed over its two stages.
    """
    n = pipe.n_microbatches
    if ids.shape[0] % n:
        raise UserError(f"micro_batch: local batch {ids.shape[0]} does not split into {n} microbatches")
    mask = mask.bool()
    if pipe.has_first:
        # One masking call per microbatch in order, as DeepSpeed's micro steps draw them.
        parts = draws.chunk(n, dim=1) if draws is not None else [None] * n
        drawn = [
            losses.mask_tokens(i, m, **pipe.mask_args, draws=d)
            for i, m, d in zip(ids.chunk(n), mask.chunk(n), parts, strict=True)
        ]
        both = torch.stack([torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])])  # [2, B, T]
    else:
        both = torch.empty((2, *ids.shape), dtype=ids.dtype, device=ids.device)
    if dist.get_world_size(pipe.pp_group) > 1:
        dist.broadcast(both, group=pipe.pp_group, group_src=0)
    args = (images,) if pipe.has_first else ()
    # The runtime needs a target on the last stage; the losses need none (labels come as kwargs).
    target = ids if pipe.has_last else None
    # The stages' call form of VLModel.forward (VLModel.stage_forward)
    kwargs = {"input_ids": ids, "attention_mask": mask, "masked": both[0], "labels": both[1]}
    out = pipe.schedule.step(*args, target=target, **kwargs)
    sync_tied_grads(pipe)
    if not pipe.has_last:
        return None
    parts = out.detach()  # [n, 3]
    loss = losses.weighted(_unwrap(pipe.modules[-1]).loss_cfg, parts[:, 0], parts[:, 1], parts[:, 2])
    return {"loss": loss, "itc": parts[:, 0], "mlm": parts[:, 1], "caption": parts[:, 2], "mim": torch.zeros_like(loss)}


def _tied_params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for name, p in m.named_parameters() if name == TIED]


def sync_tied_grads(pipe: Pipeline) -> None:
    """Sum the tied embedding/head gradient over the first and last stage.

    The two stages hold copies of one weight: its gradient is the embedding's plus the head's, and
    both copies must take the same optimizer step to stay equal, so each gets the sum. (Deep-copied
    at split time, so the copies start equal; AdamW on equal inputs keeps them equal.)
    """
    params = _tied_params(pipe.modules)
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    if len(grads) == 2:  # both ends on this rank (one pipeline rank, interleaved)
        total = grads[0] + grads[1]
        for g in grads:
            g.copy_(total)
    if pipe.tied_group is not None and grads:
        dist.all_reduce(grads[0], group=pipe.tied_group)


def tied_copies(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The last stage's copy of the tied weight (when there are several stages), else nothing.

    Its gradient equals stage 0's after sync_tied_grads, so a global grad norm must count it once:
    pass these as `duplicates` to clip_grad_norm_.
    """
    lasts = [m for m in modules if _unwrap(m).holds_heads and not _unwrap(m).embeds]
    return _tied_params(lasts)
