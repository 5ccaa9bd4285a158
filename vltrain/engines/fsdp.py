"""parallel.strategy = "fsdp": the PyTorch-native engine (FSDP2 over the "dp" mesh dimension).

Behind vltrain.engines.api.TrainEngine, as the DeepSpeed engine is, with the same model initialisation, AdamW
parameter groups, LR schedule, gradient clipping and loss scaling 1 / accumulation, so that the two
strategies train the same run (tests/test_fsdp_engine.py compares them).

Model: built on the meta device (nothing allocated), sharded (`vltrain.parallel.fsdp.shard_model`),
then materialised shard by shard on the rank's device (`to_empty`). A new run's weights are rank 0's
`build_model` (the DeepSpeed path's init, seeded), broadcast and sharded by torch's
`set_model_state_dict(broadcast_from_rank0=True)`: the only full copy is rank 0's, in host memory; a
resumed run skips it and reads its shards from the checkpoint.

Activation checkpointing: the model's own (`VLModel.set_activation_checkpointing`: torch.utils.checkpoint,
non-reentrant, inside each Block's forward) rather than torch's checkpoint_wrapper: it is the code the
DeepSpeed path runs (same recomputation, same RNG replay), and it adds no `_checkpoint_wrapped_module`
level to the parameter names, so checkpoints have the same keys with and without it.

Gradient accumulation: under zero_stage 2 the micro steps before the last skip the reduce-scatter
(`set_requires_gradient_sync(False)`; FSDP2 accumulates the unsharded gradients in fp32, reduce_dtype)
and the last reduces the sum once. DeepSpeed reduces every micro step and sums the reduced shards:
the same sum in another order, equal up to fp32 rounding (not bit-identical). Under zero_stage 3 every
micro step is reduced (no full-size unsharded gradient is kept: memory is why stage 3 was chosen).

fp16: `ShardedGradScaler` (torch.amp's GradScaler whose found-inf flag is all-reduced over a process
group; here the world, so that pipeline stages and tensor-parallel peers skip the same steps), initial
scale 2^16 and growth x2 after 1000 steps without overflow as DeepSpeed's dynamic scaler (which also has
a hysteresis of 2 that torch's has not). Under every precision a step whose gradient norm is not finite
is skipped and counted (`skipped_steps`) without moving the LR schedule, as DeepSpeed does.

Pipeline parallel (pp > 1, vltrain.parallel.pipeline): the meta model is split into this rank's stage
modules (pruned copies keeping the original parameter names), each tensor-parallelised and sharded as
the whole model is otherwise; one AdamW (the same groups) and LR schedule per stage module, as
torchtitan keeps one per model part, since torch's state-dict API takes one module per optimizer. A
step runs the schedule over the rank's local batch cut into `accumulation` microbatches; the tied
token embedding / output head copies of the first and last stage get the sum of their gradients and
are counted once in the gradient norm. Checkpoints merge the stage modules' state dicts (flattened
optimizer state, keyed by parameter name), so a checkpoint of any layout loads into any other.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from vltrain.common.errors import UserError
from vltrain.config import LossConfig, TrainConfig
from vltrain.dsconfig import FP16_DYNAMIC_LOSS_SCALE
from vltrain.engines.api import TrainEngine
from vltrain.engines.common import (
    LossScaleAtMinimum,
    RankLayout,
    build_model,
    build_optimizer,
    compute_dtype,
    default_dtype,
    model_inputs,
    retarget_lr,
)
from vltrain.presets import resolve_model

if TYPE_CHECKING:
    from vltrain.evaluate import EvalShare
    from vltrain.model import VLModel

DCP_DIR = "dcp"  # the checkpoint subdirectory DCP writes (per-rank __R_0.distcp files and .metadata)
# the DeepSpeed engine's fp16 scaler settings, one source for both engines
FP16_INIT_SCALE = 2.0 ** FP16_DYNAMIC_LOSS_SCALE["initial_scale_power"]
FP16_GROWTH_INTERVAL = FP16_DYNAMIC_LOSS_SCALE["loss_scale_window"]


def build_device_mesh(layout: RankLayout, device_type: str, sharding: str = "full", ranks_per_node: int = 0):
    """The ("pp", "dp", "tp") mesh (vltrain.parallel.mesh); under hybrid sharding dp is split into
    (dp_replicate, dp_shard), the shard group being a node's data-parallel ranks (`ranks_per_node`: the
    launcher's LOCAL_WORLD_SIZE, vltrain.distenv; 0 = the whole world on one node)."""
    from vltrain.parallel.layout import hybrid_shard
    from vltrain.parallel.mesh import build_mesh

    shard = 0
    if sharding == "hybrid":
        shard = hybrid_shard(ranks_per_node or layout.world, layout.tp, layout.pp, layout.dp)
    return build_mesh(layout.world, layout.tp, layout.pp, device_type, shard)


def ranks_per_node(world: int) -> int:
    """The ranks of this rank's node, as the launcher says (LOCAL_WORLD_SIZE, which vltrain.distenv.export
    writes from torchrun's, Slurm's or submitit's variables); the world when unset."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or world)


def meta_model(cfg: TrainConfig) -> VLModel:
    """The run's VLModel on the meta device, fp32 (FSDP's master weights): no memory, no init."""
    from vltrain.model import VLModel
    from vltrain.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID

    with torch.device("meta"), default_dtype(torch.float32):
        model = VLModel(
            resolve_model(cfg.model), cfg.loss, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, mask_id=MASK_ID
        )
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    return model


class FSDPEngine(TrainEngine):
    """FSDP2 (+ TP / PP when the layout has them) training engine of one rank.

    `modules`: this rank's model parts (the whole VLModel, or its pipeline stage modules), each with
    its optimizer and schedule in `optimizers` / `schedulers` (they take the same steps). `module` is
    the whole model when there is no pipeline (None otherwise)."""

    strategy = "fsdp"
    checkpoint_format = DCP_DIR

    def __init__(
        self,
        cfg: TrainConfig,
        micro_batch: int,
        accumulation: int,
        layout: RankLayout,
        device: torch.device,
        *,
        initialise: bool = True,
    ) -> None:
        from vltrain.model import losses
        from vltrain.parallel.fsdp import reshard_after_forward, shard_model

        self.cfg, self.layout, self.device = cfg, layout, device
        self.dtype = compute_dtype(cfg)
        self.accumulation = accumulation
        self.sync_every_micro = reshard_after_forward(cfg.zero_stage)  # also refuses zero_stage 0 and 1
        from vltrain.parallel.layout import sharding_problem
        from vltrain.parallel.mesh import fsdp_mesh

        node = ranks_per_node(layout.world)
        if problem := sharding_problem(cfg, layout.world, node):
            raise UserError(problem)
        self.mesh = build_device_mesh(layout, device.type, cfg.parallel.sharding, node)
        dp_mesh = self.mesh["dp"]
        losses.set_data_parallel_group(dp_mesh.get_group() if layout.world > 1 else None)
        parts: list[tuple[int, VLModel]] = [(0, meta_model(cfg))]
        if layout.pp > 1:
            from vltrain.parallel.pipeline import split_stages, virtual_stages

            schedule = virtual_stages(cfg.parallel.pp_schedule)
            parts = split_stages(parts[0][1], layout.pp_rank, layout.pp, schedule, tp=layout.tp)
        full = build_model(self.cfg, "cpu", initialise=True).state_dict() if initialise and dist.get_rank() == 0 else {}
        for _, model in parts:
            if layout.tp > 1:  # first: FSDP then shards the TP shards over "dp" (2-D DTensors)
                from vltrain.parallel.tensor_parallel import apply_tensor_parallel

                apply_tensor_parallel(model, self.mesh["tp"])
            shard_model(model, fsdp_mesh(self.mesh), cfg.precision, cfg.zero_stage)
            model.to_empty(device=device)
            if initialise:
                self._initialise(model, full)
        del full
        self.modules: list[nn.Module] = [m for _, m in parts]
        # the whole model as fully_shard made it (an FSDPModule: set_requires_gradient_sync), None under a pipeline
        self.module: Any = self.modules[0] if layout.pp == 1 else None
        self.params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        built = [build_optimizer(cfg, m, fused=device.type == "cuda") for m in self.modules]
        self.optimizers, self.schedulers = [o for o, _ in built], [s for _, s in built]
        self.scaler = fp16_scaler(device) if cfg.precision == "fp16" else None
        self.pipe = self._pipeline(parts) if layout.pp > 1 else None
        self.duplicates: list[nn.Parameter] = []
        if self.pipe is not None:
            from vltrain.parallel.pipeline import tied_copies

            self.duplicates = tied_copies(self.modules)
        self.skipped = 0
        self.global_steps = 0
        self._grad_norm: float | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The first model part's AdamW (the only one without a pipeline); its LR is every part's."""
        return self.optimizers[0]

    @property
    def scheduler(self):
        return self.schedulers[0]

    def _initialise(self, model: nn.Module, full: dict[str, torch.Tensor]) -> None:
        """Rank 0's seeded full model (build_model: the DeepSpeed path's weights), broadcast and sharded.
        A pipeline stage takes the entries of its own parameters (strict=False: the others belong to
        other stages)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=self.layout.pp == 1)
        set_model_state_dict(model, dict(full), options=options)  # a copy: torch adds the local entries to it

    def _pipeline(self, parts: list[tuple[int, VLModel]]) -> Any:
        """The schedule of this rank's stages; its loss reads the last stage's loss weights at each call."""
        from vltrain.parallel.pipeline import build_schedule, make_loss_fn

        weighted = make_loss_fn(parts[-1][1])
        scaler = self.scaler

        def loss_fn(out: torch.Tensor, target: object) -> torch.Tensor:
            loss = weighted(out, target)
            return scaler.scale(loss) if scaler is not None else loss

        group = self.mesh["pp"].get_group()
        stages: list[tuple[int, nn.Module]] = list(parts)
        return build_schedule(stages, group, self.accumulation, self.cfg.parallel.pp_schedule, loss_fn, self.device)

    def set_loss_config(self, loss: LossConfig) -> None:
        """A curriculum stage's loss weights (and MLM mask rate) for the next steps, on every model part."""
        for m in self.modules:
            cast("VLModel", m).loss_cfg = loss  # each part is the model or a pruned copy of it (pipeline stages)
        if self.pipe is not None:
            self.pipe.mask_args["mask_prob"] = loss.mask_prob

    @property
    def skipped_steps(self) -> int:
        return self.skipped

    def num_params(self) -> int:
        from vltrain.model_math import param_count

        return param_count(resolve_model(self.cfg.model))

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm

    @property
    def loss_scale(self) -> float | None:
        return None if self.scaler is None else float(self.scaler.get_scale())

    def train_step(self, batches: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[torch.Tensor, float]:
        if self.pipe is not None:
            return self._pipeline_step(self.pipe, batches, keys)
        model, n = self.module, len(batches)
        losses = []
        for micro, batch in enumerate(batches):
            model.set_requires_gradient_sync(self.sync_every_micro or micro == n - 1)
            out = model(*model_inputs(batch, self.device, self.dtype))
            loss = out["loss"] / n  # the mean over micro steps, as DeepSpeed's scale_wrt_gas
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses.append(torch.stack([out[k].detach().float() for k in keys]))
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses
        self._optimizer_step()
        return torch.stack(losses).cpu(), lr

    def _pipeline_step(
        self, pipe: Any, batches: list[dict[str, Any]], keys: tuple[str, ...]
    ) -> tuple[torch.Tensor, float]:
        """The accumulation micro batches as the schedule's microbatches (in order: the same samples
        per microbatch as DeepSpeed's micro steps). Loss terms [micro, keys] on the last stage; zeros
        elsewhere (not a reporter rank: vltrain.engines.common.RankLayout.reporter)."""
        from vltrain.parallel.pipeline import pipeline_step

        lengths = {b["input_ids"].shape[1] for b in batches}
        if len(lengths) > 1:
            raise UserError(
                f"parallel.pp: micro batches of text lengths {sorted(lengths)}; allowed: one length "
                "(the loader pads to model.max_text_len under pipeline parallel)"
            )
        images = torch.cat([b["images"] for b in batches]).to(self.device, self.dtype)
        ids = torch.cat([b["input_ids"] for b in batches]).to(self.device)
        mask = torch.cat([b["attention_mask"] for b in batches]).to(self.device)
        parts = [b.get("mlm_draws") for b in batches]
        draws = None if any(d is None for d in parts) else torch.cat([d for d in parts if d is not None], dim=1)
        draws = None if draws is None else draws.to(self.device)
        out = pipeline_step(pipe, images, ids, mask, draws)
        if out is None:
            losses = torch.zeros(len(batches), len(keys), device="cpu")  # as the last stage's, .cpu()
        else:
            losses = torch.stack([out[k].float() for k in keys], dim=1).cpu()
        lr = self.optimizer.param_groups[0]["lr"]
        self._optimizer_step()
        return losses, lr

    def _optimizer_step(self) -> None:
        """Unscale (fp16), clip, step; a non-finite gradient skips the step (and, under fp16, halves
        the loss scale), counted in skipped_steps; the schedule moves only on applied steps."""
        from vltrain.parallel.mesh import clip_grad_norm_

        if self.scaler is not None:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
        pp_group = self.pipe.pp_group if self.pipe is not None else None
        self._grad_norm = clip_grad_norm_(self.params, self.cfg.optim.grad_clip, pp_group, self.duplicates)
        finite = math.isfinite(self._grad_norm)
        if self.scaler is not None:
            before = self.scaler.get_scale()
            for optimizer in self.optimizers:  # skips the step when a gradient overflowed (on any rank)
                self.scaler.step(optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
            if skipped and before <= 1.0:
                raise LossScaleAtMinimum()
        else:
            skipped = not finite
            if not skipped:
                for optimizer in self.optimizers:
                    optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        if skipped:
            self.skipped += 1
        else:
            for scheduler in self.schedulers:
                scheduler.step()

    # ------------------------------------------------------------------ checkpoints (DCP)
    def _state(self) -> dict[str, Any]:
        """{"model", "optim"}: the model parts' entries merged, keyed by the original parameter names
        (optimizer state flattened per parameter), so that every layout writes and reads the same keys."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        for m, o in zip(self.modules, self.optimizers, strict=True):
            ms, os_ = get_state_dict(m, o, options=_options(strict=True))
            model |= ms  # the tied weight's two copies (first and last stage) are equal
            optim |= os_
        return {"model": model, "optim": optim}

    def save(self, directory: Path, errors: list[BaseException]) -> dict[str, Any]:
        """Collective: model and optimizer shards of every rank into `directory`/dcp (DCP, resharded on load).
        DCP gathers every rank's write result to rank 0 and raises the same CheckpointException on every
        rank when one failed: its first write error goes to `errors` (the ranks then agree on it as on any
        other), anything else is raised."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import CheckpointException

        from vltrain.diskspace import is_write_error

        try:
            dcp.save(self._state(), checkpoint_id=str(directory / DCP_DIR))
        except CheckpointException as e:
            inner = [getattr(f, "exc", f) for _, f in sorted(e.failures.items())]
            write = [x for x in inner if isinstance(x, BaseException) and is_write_error(x)]
            if not write:
                raise
            errors.append(write[0])
        return self.extra_state()

    def load(self, directory: Path) -> None:
        """Collective: this rank's shards of a DCP checkpoint of any rank count or layout."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
        for m, o in zip(self.modules, self.optimizers, strict=True):  # each part picks its own entries
            set_state_dict(
                m,
                o,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
                options=_options(strict=self.layout.pp == 1),
            )

    def extra_state(self) -> dict[str, Any]:
        """What is the same on every rank and not in DCP: schedule, loss scaler, step counters."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "skipped_steps": self.skipped,
            "global_steps": self.global_steps,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state["scheduler"])
            retarget_lr(scheduler, self.cfg.optim.lr)  # a fork with another LR (clusterctl submit --from)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped, self.global_steps = int(state["skipped_steps"]), int(state["global_steps"])

    def checkpoint_bytes(self) -> int:
        """The model plus AdamW's fp32 master weights and two moments (12 bytes a parameter); 0 under a
        pipeline (no rank's modules are the whole model)."""
        if self.module is None:
            return 0
        return sum(p.numel() * (p.element_size() + 12) for p in self.module.parameters())

    @classmethod
    def read_module_state(cls, directory: Path) -> dict[str, torch.Tensor]:
        """Full tensors of every `model.` entry the DCP metadata lists, read with no_dist=True (whatever
        rank count and layout wrote them)."""
        return dcp_module_state(directory / DCP_DIR)

    @classmethod
    def is_module_file(cls, relative: str) -> bool:
        return relative.startswith(f"{DCP_DIR}/")

    # ------------------------------------------------------------------ evaluate, describe
    @property
    def eval_reads_checkpoint(self) -> bool:
        """Under a pipeline no rank's modules make the whole model: evaluation reads this step's checkpoint."""
        return self.module is None

    def eval_model(self, checkpoint: Path | None) -> tuple[nn.Module, EvalShare]:
        """The training module, sharded as it trains (FSDP gathers one block at a time), each data-parallel
        rank evaluating its slice of the pairs (its tensor-parallel peers the same slice), in lockstep;
        under a pipeline, a model sharded over every rank (FSDP over world / tp, tensor parallel as in
        training) with the weights of `checkpoint`. Never the whole model on one device."""
        from torch.distributed.fsdp import register_fsdp_forward_method

        from vltrain.evaluate import EvalShare

        if self.module is not None:
            model, dp_mesh = self.module, self.mesh["dp"]
        elif checkpoint is None:
            raise ValueError("the FSDP engine under a pipeline evaluates a checkpoint: the loop saves one first")
        else:
            model, dp_mesh = self._checkpoint_eval_model(checkpoint)
        if not getattr(model, "_vltrain_eval_methods", False):  # FSDP's forward hooks around these methods too
            for name in ("encode_image", "encode_text"):
                register_fsdp_forward_method(model, name)
            model._vltrain_eval_methods = True
        model.set_reshard_after_forward(True)  # no backward follows: one block gathered at a time, root included
        share = EvalShare(dp_mesh.get_local_rank(), dp_mesh.size(), dp_mesh.get_group(), lockstep=True)
        return model, share

    def eval_finished(self) -> None:
        """Training's resharding again (zero_stage 2 keeps blocks gathered from forward to backward; the
        root never reshards after forward, FSDP's default)."""
        if self.module is not None:
            self.module.set_reshard_after_forward(self.sync_every_micro)
            self.module.set_reshard_after_forward(False, recurse=False)

    def _checkpoint_eval_model(self, checkpoint: Path) -> tuple[nn.Module, Any]:
        """The pipeline's evaluation model (built once: FSDP over a ("pp" 1, "dp", "tp") mesh of every
        rank, resharded after each block) with this checkpoint's weights, read by DCP into its shards."""
        import dataclasses

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        from vltrain.parallel.fsdp import shard_model
        from vltrain.parallel.mesh import build_mesh

        if getattr(self, "_eval_parts", None) is None:
            mesh = build_mesh(self.layout.world, self.layout.tp, 1, self.device.type)
            model = meta_model(dataclasses.replace(self.cfg, activation_checkpointing=False))
            if self.layout.tp > 1:
                from vltrain.parallel.tensor_parallel import apply_tensor_parallel

                apply_tensor_parallel(model, mesh["tp"])
            shard_model(model, mesh["dp"], self.cfg.precision, zero_stage=3)
            model.to_empty(device=self.device)
            self._eval_parts = (model, mesh["dp"])
        model, dp_mesh = self._eval_parts
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(checkpoint / DCP_DIR))
        set_model_state_dict(model, state["model"])
        return model, dp_mesh

    def banner(self) -> str:
        p = self.cfg.parallel
        return f" | {p.strategy} tp {p.tp} x pp {p.pp} x dp {self.layout.dp}"

    def close(self) -> None:
        from vltrain.model import losses

        with contextlib.suppress(Exception):
            losses.set_data_parallel_group(None)


def _options(strict: bool):
    """DCP state-dict options: optimizer state keyed by parameter name (flattened), so that it does not
    depend on how parameters are grouped into optimizers (one per pipeline stage module, or one)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True, strict=strict)


ENGINE = FSDPEngine


def fp16_scaler(device: torch.device):
    """torch's loss scaler with its found-inf flag all-reduced over the world (pipeline stages and
    tensor-parallel peers skip the same steps), set as DeepSpeed's dynamic scaler (vltrain.dsconfig)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    scaler = ShardedGradScaler(
        device.type,
        init_scale=FP16_INIT_SCALE,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=FP16_GROWTH_INTERVAL,
        process_group=dist.group.WORLD,
    )
    scaler.scale(torch.zeros((), device=device))  # creates the scale on stages that compute no loss
    return scaler


def dcp_module_state(directory: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    try:
        entries = reader.read_metadata().state_dict_metadata
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(
            f"{directory}: DCP metadata cannot be read ({e}); allowed: a complete vltrain checkpoint"
        ) from None
    model = {
        key.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in entries.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    if not model:
        raise UserError(f"{directory}: no model states in the DCP checkpoint; allowed: a complete vltrain checkpoint")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model
