"""parallel.strategy = "deepspeed": DeepSpeed ZeRO 0-2 data parallel behind vltrain.engines.api.TrainEngine.

The DeepSpeed config comes from `vltrain.dsconfig.deepspeed_config` (what the planner planned is what
runs); its "vltrain" section is ours and is removed before DeepSpeed sees it. The optimizer is torch's
AdamW (no JIT-compiled op on CPU) and the schedule a LambdaLR over `vltrain.schedule`, both handed to
deepspeed.initialize so that DeepSpeed steps, clips and checkpoints them. Checkpoints are DeepSpeed's
save_checkpoint under the tag `ds/` of the checkpoint directory (vltrain.checkpoint writes the rest);
ZeRO 0-2 keep full weights on every rank, so rank 0 evaluates its module in place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from vltrain.common.errors import UserError
from vltrain.config import LossConfig, TrainConfig
from vltrain.distenv import DistEnv, backend
from vltrain.dsconfig import deepspeed_config
from vltrain.engines import zero_collectives
from vltrain.engines.api import TrainEngine
from vltrain.engines.common import (
    LossScaleAtMinimum,
    RankLayout,
    build_model,
    build_optimizer,
    compute_dtype,
    model_inputs,
    retarget_lr,
)
from vltrain.engines.process_group import init_torch_process_group, start_timeout
from vltrain.evaluate import EvalShare
from vltrain.presets import resolve_model
from vltrain.rundir import GRAD_REDUCTION

TAG = "ds"  # DeepSpeed's checkpoint tag: the subdirectory of a vltrain checkpoint it writes

REDUCTIONS = ("auto", "coalesced", "per_micro_step")


def grad_reduction(cfg: TrainConfig, device: str, override: str | None = None, *, stage: int | None = None) -> str:
    """How ZeRO-2 reduces the accumulation's gradients: "coalesced" or "per_micro_step"; pure. `stage`:
    the one DeepSpeed runs (vltrain.dsconfig.hookless_zero: stage 1 without hooks), cfg.zero_stage if None.

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


class DeepSpeedEngine(TrainEngine):
    """`ds` is DeepSpeed's own engine; `module` the plain VLModel (ZeRO 0-2 keep full weights on every
    rank: rank 0 evaluates it in place)."""

    strategy = "deepspeed"
    checkpoint_format = TAG

    def __init__(
        self, ds, layout: RankLayout, dtype: torch.dtype, cfg: TrainConfig, reduction: str | None = None
    ) -> None:
        self.ds, self.layout, self.dtype, self.cfg = ds, layout, dtype, cfg
        self.device, self.module = ds.device, ds.module
        self.stage = int(ds.zero_optimization_stage())  # the one DeepSpeed runs (dsconfig.hookless_zero)
        self.reduction = grad_reduction(cfg, self.device.type, reduction, stage=self.stage)
        self.direct_micro_steps = direct_micro_steps(ds)
        self.pipelined = zero_collectives.applies(ds)  # the step's per-group collectives waited on together

    @classmethod
    def init_process_group(cls, dist: DistEnv, device: str) -> torch.device:
        """torch's default process group on the rank's bound GPU (gloo on CPU, nccl on CUDA), then
        deepspeed.init_distributed over it. DeepSpeed's own start would bind cuda:LOCAL_RANK (its
        TorchBackend's device_id), a device that does not exist where Slurm binds one GPU per task (each
        rank sees one, cuda:0); started by torch, init_distributed only wraps the group."""
        import deepspeed

        chosen = init_torch_process_group(dist, device)
        deepspeed.init_distributed(
            dist_backend=backend(device), auto_mpi_discovery=False, verbose=False, timeout=start_timeout()
        )
        return chosen

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        micro_batch: int,
        accumulation: int,
        layout: RankLayout,
        device: torch.device,
        *,
        initialise: bool = True,
    ) -> DeepSpeedEngine:
        reduction = os.environ.get(GRAD_REDUCTION)  # read once: the DeepSpeed config and the engine both follow it
        engine, _ = build_engine(cfg, micro_batch, accumulation, layout.world, device, reduction, initialise)
        return cls(engine, layout, compute_dtype(cfg), cfg, reduction)

    @property
    def skipped_steps(self) -> int:
        return int(getattr(self.ds, "skipped_steps", 0))  # DeepSpeed's own engine: 0 before its first skip

    def get_global_grad_norm(self) -> float | None:
        return self.ds.get_global_grad_norm()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def set_loss_config(self, loss: LossConfig) -> None:
        self.module.loss_cfg = loss

    def train_step(self, batches: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[torch.Tensor, float]:
        eng, last = self.ds, len(batches) - 1
        losses: list[torch.Tensor] = []
        coalesce = last > 0 and self.reduction == "coalesced"
        with eng.coalesce_grad_reduction() if coalesce else contextlib.nullcontext():
            for i, batch in enumerate(batches):
                inputs = model_inputs(batch, self.device, self.dtype)
                if self.direct_micro_steps and i < last:
                    out = self.accumulate(inputs)
                else:
                    out = eng(*inputs)
                    eng.backward(out["loss"])
                    if not coalesce and i < last:
                        eng.step()  # between micro steps: DeepSpeed only counts them
                losses.append(torch.stack([out[k].detach().float() for k in keys]))
        lr = eng.get_lr()[0]  # the LR this step uses; the boundary's engine.step() moves the schedule on
        if coalesce:
            for _ in batches[1:]:  # the micro steps' count, as above (step() is refused inside the block)
                eng.step()
        try:
            with zero_collectives.pipelined_step(eng.optimizer) if self.pipelined else contextlib.nullcontext():
                eng.step()  # the accumulation boundary: clip, AdamW, schedule
        except Exception as e:  # fp16: DeepSpeed gives up when the loss scale cannot go lower
            if "loss scale already at minimum" not in str(e):
                raise
            raise LossScaleAtMinimum() from None
        return torch.stack(losses).cpu(), lr

    def accumulate(self, inputs: tuple[torch.Tensor | None, ...]) -> dict[str, torch.Tensor]:
        """A micro step before the boundary on the module itself (direct_micro_steps): what DeepSpeed's
        forward, backward and step do there, without their Python. The gradient is engine.backward's (the
        loss over the accumulation, then ZeRO's loss scaling: 1 in fp32), summed by autograd in
        param.grad as DeepSpeed's stage 1 leaves it, and the micro step is counted as step() counts it
        (its boundary test reads the count)."""
        eng = self.ds
        out = self.module(*inputs)  # DeepSpeed's forward hooks on the module (timers) still run
        eng.optimizer.scale_if_loss(out["loss"] / eng.gradient_accumulation_steps()).backward()
        eng.micro_steps += 1
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: Path, errors: list[BaseException]) -> dict[str, Any]:
        with keep_going(self.ds, errors):  # a failed write inside DeepSpeed must not skip its collectives
            self.ds.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        return {}

    def load(self, directory: Path) -> None:
        with mmap_loads(self.ds):
            load_path, _ = self.ds.load_checkpoint(
                str(directory), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if load_path is None:
            raise UserError(
                f"{directory}: DeepSpeed found no checkpoint under {TAG}/; allowed: a directory written by vltrain"
            )
        if self.ds.lr_scheduler is not None:  # None: DeepSpeed built without one
            retarget_lr(self.ds.lr_scheduler, self.cfg.optim.lr)  # a fork with another LR (clusterctl submit --from)

    def checkpoint_bytes(self) -> int:
        """The model in its dtype plus ZeRO's fp32 master weights and Adam's two moments (12 bytes a parameter)."""
        return sum(p.numel() * (p.element_size() + 12) for p in self.module.parameters())

    @classmethod
    def read_module_state(cls, directory: Path) -> dict[str, torch.Tensor]:
        files = sorted((directory / TAG).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{directory}: no model states under {TAG}/; allowed: a complete vltrain checkpoint")
        return torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)["module"]

    @classmethod
    def is_module_file(cls, relative: str) -> bool:
        return "model_states" in relative

    # ------------------------------------------------------------------ evaluate, describe
    def eval_model(self, checkpoint: Path | None) -> tuple[nn.Module, EvalShare]:
        """The module in place (ZeRO 0-2 keep whole weights on every rank); each rank evaluates its slice
        of the pairs, and its forward is its own (no lockstep)."""
        return self.module, EvalShare(self.layout.dp_rank, self.layout.dp, None, lockstep=False)

    def describe(self) -> dict[str, Any]:
        """The ZeRO stage DeepSpeed runs and how it reduces gradients."""
        return {"zero_stage_run": self.stage, "grad_reduction": self.reduction}


ENGINE = DeepSpeedEngine


@contextlib.contextmanager
def mmap_loads(ds) -> Iterator[None]:
    """DeepSpeed's checkpoint engine with torch.load(mmap=True) for the duration: under ZeRO 0-2 every
    rank reads the whole module file (mp_rank_00_model_states.pt, 61 GB for a 30B model in bf16);
    mapped, the 8 ranks of a node share one copy in the page cache instead of 8 in their heaps."""
    ce = ds.checkpoint_engine
    original = ce.load

    def load(path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)

    ce.load = load
    try:
        yield
    finally:
        ce.load = original


_UNSET = object()


@contextlib.contextmanager
def keep_going(ds, errors: list[BaseException]) -> Iterator[None]:
    """For the duration, DeepSpeed's file writes (its checkpoint engine's save, the recovery scripts it
    copies) record a write error in `errors` instead of raising it: DeepSpeed's save_checkpoint holds
    barriers, and a rank that left it early would leave the others waiting in them."""
    from vltrain.diskspace import is_write_error

    patched = []
    for owner, name in ((getattr(ds, "checkpoint_engine", None), "save"), (ds, "_copy_recovery_script")):
        fn = getattr(owner, name, None) if owner is not None else None
        if not callable(fn):
            continue

        def wrapper(*args, _fn=fn, **kwargs):
            try:
                return _fn(*args, **kwargs)
            except Exception as e:
                if not is_write_error(e):
                    raise
                errors.append(e)
                return None

        patched.append((owner, name, vars(owner).get(name, _UNSET)))
        setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for owner, name, before in patched:
            if before is _UNSET:
                delattr(owner, name)
            else:
                setattr(owner, name, before)


def direct_micro_steps(ds) -> bool:
    """Whether the micro steps before the accumulation boundary may run on the module directly
    (DeepSpeedEngine.accumulate) rather than through DeepSpeed's forward, backward and step.

    There, in stage 1 without gradient hooks (vltrain.dsconfig.hookless_zero), DeepSpeed does nothing
    but its own bookkeeping: forward registers backward hooks on every output tensor, backward runs a
    prologue and an epilogue that set flags, step() counts the micro step. ~1 ms of Python per micro step
    on CPU, 1.06x a bare DDP loop's step on 2 ranks at accumulation 16 (micro steps of ~24 ms;
    bench/bench_step.py --ranks 2). Checked on DeepSpeed's own objects, not on our config: its ZeRO
    stage 1 optimizer with no gradient hooks, no separate accumulation buffer (fp32), no gradient
    partitioning, no overlap, a static loss scale of 1, and the engine's managed accumulation; anything
    else goes through DeepSpeed's API. Bit-identical (tests/test_deepspeed_micro_steps.py)."""
    opt = getattr(ds, "optimizer", None)
    scaler = getattr(opt, "loss_scaler", None)
    return (
        opt is not None
        and int(ds.zero_optimization_stage()) == 1
        and ds.managed_gradient_accumulation()
        and not getattr(opt, "_grad_acc_hooks", [None])
        and getattr(opt, "use_grad_accum_attribute", True) is False
        and getattr(opt, "partition_gradients", True) is False
        and getattr(opt, "overlap_comm", True) is False
        and not opt.needs_scaler()
        and float(getattr(scaler, "cur_scale", 0.0)) == 1.0
        and not ds.bfloat16_enabled()
        and not ds.fp16_enabled()
    )


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
    initialise: bool = False,
):
    """-> (DeepSpeed engine, ds_config) for an initialised process group; the engine owns model, AdamW and
    schedule. `reduction`: VLTRAIN_GRAD_REDUCTION's value (grad_reduction), None for the trainer's choice."""
    import deepspeed

    from vltrain.engines.unused_imports import import_muon_lazily
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
    model = build_model(cfg, device, initialise=initialise)  # a resume overwrites the weights: no [init_from]
    optimizer, lr_scheduler = build_optimizer(cfg, model, fused)
    lr_scheduler = split_param_groups(optimizer, lr_scheduler, FLAT_GROUP_BYTES // compute_dtype(cfg).itemsize)
    import_muon_lazily()  # ZeRO imports DeepSpeed's Muon whatever the optimizer: 0.8 s of torch.compile's imports
    engine, _, _, _ = deepspeed.initialize(
        args=SimpleNamespace(device_rank=device.index or 0),  # the trainer's GPU, not the raw LOCAL_RANK
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    return engine, ds_config


# --- parameter groups DeepSpeed can flatten on the GPU ------------------------------------------------
# ZeRO 1-2 flattens each optimizer parameter group into one buffer as it starts
# (stage_1_and_2.DeepSpeedZeroOptimizer.__init__): on the GPU when its free memory holds the group's flat
# copy, otherwise through the host (a CPU copy of the group's 16-bit weights and the flat buffer built
# from it: 2 copies of the group in host RAM). A group holding most of a 30.5B model (61 GB of bf16
# beside its 61 GB copy on an 80 GB GPU) always took the host path: ~113 GiB per rank, ~900 GiB per node
# of 8 ranks. Groups of at most FLAT_GROUP_BYTES flatten on the GPU wherever it has that much free beside
# the weights (clusterctl.planning.host_memory models both paths; preflight refuses a start-up that does
# not fit), and bound the host path to 2 x 1 GiB per rank otherwise. Chosen over building one local rank
# at a time behind a barrier: deepspeed.initialize broadcasts the weights over the data-parallel group,
# whose other ranks would be waiting at that barrier on their nodes. AdamW is per element, so splitting
# its groups changes no update; the gradient norm sums the groups in another order (fp32 rounding).
FLAT_GROUP_BYTES = 1 << 30  # clusterctl.planning.host_memory.FLAT_GROUP_BYTES (a test keeps them equal)


def chunk_params(params: list[torch.Tensor], max_numel: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of `params` of at most `max_numel` elements each (a larger parameter alone)."""
    chunks: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in params:
        if chunks[-1] and size + p.numel() > max_numel:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += p.numel()
    return chunks


def split_param_groups(optimizer: torch.optim.Optimizer, scheduler, max_numel: int):
    """Cut the optimizer's groups into groups of at most `max_numel` elements (same settings) before
    DeepSpeed wraps it; -> the LambdaLR over the new groups (each its group's schedule). Groups that
    fit stay as they are, and so does the scheduler: a model under the limit trains bit-identically."""
    chunks = [chunk_params(list(g["params"]), max_numel) for g in optimizer.param_groups]
    if all(len(c) == 1 for c in chunks):
        return scheduler
    lambdas = [fn for fn, c in zip(scheduler.lr_lambdas, chunks, strict=True) for _ in c]
    optimizer.param_groups[:] = [{**g, "params": c} for g, cs in zip(optimizer.param_groups, chunks) for c in cs]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
