"""The training engine of a run: process group, model, AdamW parameter groups, LR schedule, and one
interface (`TrainEngine`) over the two strategies the loop runs. What both engines build the same
way (the rank's layout, the seeded model, AdamW groups and schedule) is in vltrain.engine_common.

parallel.strategy = "deepspeed": `DeepSpeedEngine`, DeepSpeed ZeRO 0-2 data parallel. The DeepSpeed
config comes from `vltrain.dsconfig.deepspeed_config` (what the planner planned is what runs); its
"vltrain" section is ours and is removed before DeepSpeed sees it. The optimizer is torch's AdamW (no
JIT-compiled op on CPU) and the schedule a LambdaLR over `vltrain.schedule`, both handed to
deepspeed.initialize so that DeepSpeed steps, clips and checkpoints them.
parallel.strategy = "fsdp": `vltrain.parallel.engine_torch.TorchEngine`, PyTorch FSDP2 (+ tensor and
pipeline parallel) with the same AdamW groups and schedule, checkpointed with torch.distributed.checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Protocol

import torch

from vltrain.common.errors import UserError
from vltrain.config import TrainConfig
from vltrain.distenv import DistEnv, backend, cuda_index, export
from vltrain.dsconfig import deepspeed_config
from vltrain.engine_common import (  # the pieces both engines share, re-exported for the loop and tests
    Layout,
    LossScaleAtMinimum,
    build_model,
    build_optimizer,
    compute_dtype,
    model_inputs,
)
from vltrain.engine_common import param_groups as param_groups
from vltrain.presets import resolve_model
from vltrain.rundir import DIST_TIMEOUT_S, GRAD_REDUCTION, STEP_DIST_TIMEOUT_S


def init_process_group(dist: DistEnv, device: str, strategy: str = "deepspeed") -> torch.device:
    """The default process group from the detected layout (gloo on CPU, nccl on CUDA); returns the
    rank's device. deepspeed.init_distributed under "deepspeed"; torch's own under "fsdp" (DeepSpeed
    is not imported there: it takes seconds and sets up nothing FSDP uses). VLTRAIN_DIST_TIMEOUT_S bounds how long a collective waits for a lost peer until
    the first step (start-up is slow: 30 min by default); `shorten_timeout` tightens it after. The
    loop turns a timed-out collective into exit code 75, which clusterctl retries."""
    export(dist, device)
    rank_device = torch.device("cpu")
    if device == "cuda":
        rank_device = torch.device("cuda", cuda_index(dist.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(rank_device)
    timeout = timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_S, 1800)))
    if strategy != "deepspeed":
        import torch.distributed as tdist

        if not tdist.is_initialized():
            tdist.init_process_group(backend(device), timeout=timeout)
        return rank_device
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend(device), auto_mpi_discovery=False, verbose=False, timeout=timeout)
    return rank_device


def shorten_timeout() -> None:
    """Once a step has run, a collective that waits long means a lost peer: VLTRAIN_STEP_DIST_TIMEOUT_S
    (10 min by default) instead of the start-up's 30."""
    import torch.distributed as dist

    seconds = float(os.environ.get(STEP_DIST_TIMEOUT_S, 600))
    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.distributed_c10d import _get_default_group, _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=seconds), _get_default_group())


class TrainEngine(Protocol):
    """What the loop, checkpoints and evaluation use of an engine, for both strategies.

    `train_step` runs one optimizer step over the accumulation micro batches (the loss of each scaled
    by 1 / accumulation, as DeepSpeed does) and returns each micro batch's loss terms (detached; zeros
    on ranks that compute no loss: pipeline stages before the last) and the LR that step used.
    `skipped_steps` counts optimizer steps skipped for a non-finite gradient (fp16's loss scaler
    settling, or divergence), as DeepSpeed's attribute does."""

    layout: Layout
    device: torch.device
    skipped_steps: int
    checkpoint_format: str  # "ds" (DeepSpeed's files) | "dcp" (torch.distributed.checkpoint)

    def train_step(self, batches: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[torch.Tensor, float]: ...

    def get_global_grad_norm(self) -> float | None: ...

    def num_params(self) -> int: ...


REDUCTIONS = ("auto", "coalesced", "per_micro_step")


def grad_reduction(cfg: TrainConfig, device: str, override: str | None = None, *, stage: int | None = None) -> str:
    """How ZeRO-2 reduces the accumulation's gradients: "coalesced" or "per_micro_step"; pure. `stage`:
    the one DeepSpeed runs (vltrain.dsconfig.one_rank_zero: stage 1 on one fp32 rank), cfg.zero_stage if None.

    DeepSpeed's ZeRO-2 reduces every micro step's gradients (copies into buckets, a reduction, a sum
    into the rank's partition: at accumulation 4 ~1.2x a bare loop's step on CPU, bench/bench_step.py).
    `engine.coalesce_grad_reduction()` lets autograd sum the micro steps in param.grad and reduces
    once. Chosen only where that sum is as exact and nothing is lost:
    - fp32 weights: param.grad is fp32, as the partition DeepSpeed sums into; under bf16 and fp16 it is
      16-bit, and the fp32 accumulation the config asks for (vltrain.dsconfig) would be lost;
    - CPU: on CUDA, overlap_comm hides each micro step's reduction behind backward, and one
      reduction after the last backward would be exposed;
    - ZeRO stage 2: stages 0 and 1 already reduce once, at the boundary.
    Rank sums are then added in another order (each rank's micro steps first): bit-identical on one
    rank, within fp32 rounding on several (tests/test_trainer_run.py)."""
    choice = override or "auto"
    if choice not in REDUCTIONS:
        raise UserError(f"{GRAD_REDUCTION}: {choice!r} is not valid; allowed: {', '.join(REDUCTIONS)}")
    stage = cfg.zero_stage if stage is None else stage
    if choice != "auto":
        return choice if stage == 2 else "per_micro_step"  # stages 0 and 1 reduce once anyway
    exact = cfg.precision == "fp32" and device == "cpu" and stage == 2
    return "coalesced" if exact else "per_micro_step"


class DeepSpeedEngine:
    """parallel.strategy "deepspeed": today's DeepSpeed engine behind the TrainEngine interface.

    `ds` is DeepSpeed's own engine (checkpoint.py saves and loads through it); `module` the plain
    VLModel (ZeRO 0-2 keep full weights on every rank: rank 0 evaluates it in place)."""

    checkpoint_format = "ds"

    def __init__(self, ds, layout: Layout, dtype: torch.dtype, cfg: TrainConfig, reduction: str | None = None) -> None:
        self.ds, self.layout, self.dtype, self.cfg = ds, layout, dtype, cfg
        self.device, self.module = ds.device, ds.module
        self.stage = int(ds.zero_optimization_stage())  # the one DeepSpeed runs (dsconfig.one_rank_zero)
        self.reduction = grad_reduction(cfg, self.device.type, reduction, stage=self.stage)

    @property
    def skipped_steps(self) -> int:
        return getattr(self.ds, "skipped_steps", 0)

    def get_global_grad_norm(self):
        return self.ds.get_global_grad_norm()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def train_step(self, batches: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[torch.Tensor, float]:
        eng, losses = self.ds, []
        coalesce = len(batches) > 1 and self.reduction == "coalesced"
        with eng.coalesce_grad_reduction() if coalesce else contextlib.nullcontext():
            for batch in batches:
                out = eng(*model_inputs(batch, self.device, self.dtype))
                eng.backward(out["loss"])
                losses.append(torch.stack([out[k].detach().float() for k in keys]))
                if not coalesce and len(losses) < len(batches):
                    eng.step()  # between micro steps: DeepSpeed only counts them
        lr = eng.get_lr()[0]  # the LR this step uses; the boundary's engine.step() moves the schedule on
        if coalesce:
            for _ in batches[1:]:  # the micro steps' count, as above (step() is refused inside the block)
                eng.step()
        try:
            eng.step()  # the accumulation boundary: clip, AdamW, schedule
        except Exception as e:  # fp16: DeepSpeed gives up when the loss scale cannot go lower
            if "loss scale already at minimum" not in str(e):
                raise
            raise LossScaleAtMinimum() from None
        return torch.stack(losses).cpu(), lr


def make_engine(
    cfg: TrainConfig,
    micro_batch: int,
    accumulation: int,
    layout: Layout,
    device: torch.device | str = "cpu",
    *,
    initialise: bool = True,
) -> TrainEngine:
    """The engine of `cfg.parallel.strategy` for an initialised process group; it owns model, AdamW and
    schedule. initialise=False: a checkpoint will be loaded (FSDP then skips building the seeded weights)."""
    if cfg.parallel.strategy == "fsdp":
        from vltrain.parallel.engine_torch import TorchEngine

        return TorchEngine(cfg, micro_batch, accumulation, layout, torch.device(device), initialise=initialise)
    reduction = os.environ.get(GRAD_REDUCTION)  # read once: the DeepSpeed config and the engine both follow it
    engine, _ = build_engine(cfg, micro_batch, accumulation, layout.world, device, reduction)
    return DeepSpeedEngine(engine, layout, compute_dtype(cfg), cfg, reduction)


def check_deepspeed_fp16(cfg: TrainConfig, device: str) -> None:
    """fp16 under DeepSpeed needs an accelerator DeepSpeed runs fp16 on: its CPU accelerator does only
    on CPUs with AVX512-FP16 (oneDNN), and refuses with a ValueError deep in initialize otherwise."""
    if cfg.precision != "fp16" or device == "cuda" or cfg.parallel.strategy != "deepspeed":
        return
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        raise UserError(
            "precision: fp16 under parallel.strategy 'deepspeed' needs CUDA (DeepSpeed runs fp16 on this CPU "
            "only with AVX512-FP16, which it lacks); allowed: bf16 or fp32, or parallel.strategy = 'fsdp' "
            "(torch's loss scaler runs fp16 on CPU)"
        )


def build_engine(
    cfg: TrainConfig,
    micro_batch: int,
    accumulation: int,
    world_size: int,
    device: torch.device | str = "cpu",
    reduction: str | None = None,
):
    """-> (DeepSpeed engine, ds_config) for an initialised process group; the engine owns model, AdamW and
    schedule. `reduction`: VLTRAIN_GRAD_REDUCTION's value (grad_reduction), None for the trainer's choice."""
    import deepspeed

    from vltrain.model_math import param_count

    device = torch.device(device)
    check_deepspeed_fp16(cfg, device.type)
    grad_reduction(cfg, device.type, reduction)  # refuses an unknown value before anything is built
    ds_config = deepspeed_config(
        cfg,
        micro_batch,
        accumulation,
        world_size,
        device=device.type,
        params=param_count(resolve_model(cfg.model)),
        reduction=reduction,
    )
    fused = ds_config.pop("vltrain")["optimizer"]["fused"]  # ours, not DeepSpeed's (it refuses unknown keys)
    model = build_model(cfg, device)
    optimizer, lr_scheduler = build_optimizer(cfg, model, fused)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config, dist_init_required=False
    )
    return engine, ds_config
