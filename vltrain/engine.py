"""The DeepSpeed ZeRO engine of a run: process group, model, AdamW parameter groups, LR schedule.

The DeepSpeed config comes from `vltrain.dsconfig.deepspeed_config` (what the planner planned is
what runs); its "vltrain" section is ours and is removed before DeepSpeed sees it. The optimizer is
torch's AdamW (no JIT-compiled op on CPU) and the schedule a LambdaLR over `vltrain.schedule`, both
handed to deepspeed.initialize so that DeepSpeed steps, clips and checkpoints them.
"""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from vltrain.config import TrainConfig
from vltrain.distenv import DistEnv, backend, export
from vltrain.dsconfig import deepspeed_config, warmup_steps
from vltrain.presets import resolve_model
from vltrain.rundir import DIST_TIMEOUT_S
from vltrain.schedule import lr_factor


def init_process_group(dist: DistEnv) -> None:
    """deepspeed.init_distributed from the detected layout; gloo on CPU, nccl on CUDA.

    VLTRAIN_DIST_TIMEOUT_S bounds how long a collective waits for a lost peer (default 30 min, as
    torch's); the loop turns the resulting error into exit code 75 so that clusterctl retries.
    """
    export(dist)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
    import deepspeed

    timeout = timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_S, 1800)))
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False, verbose=False, timeout=timeout)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the weight matrices of Linear and Conv layers only (minGPT's rule).

    Biases, norm gains, embeddings (token, position, cls) and the contrastive temperature are not
    decayed: pulling them towards zero has no regularising meaning and hurts (e.g. a shrinking
    logit_scale raises the temperature).
    """
    decay: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            decay.append(module.weight)
    decay_ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in decay_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(cfg: TrainConfig) -> nn.Module:
    """The VLModel of the run, initialised from cfg.seed (identical on every rank)."""
    from vltrain.model import VLModel
    from vltrain.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID

    torch.manual_seed(cfg.seed)
    model = VLModel(resolve_model(cfg.model), cfg.loss, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, mask_id=MASK_ID)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    return model


def build_engine(cfg: TrainConfig, micro_batch: int, accumulation: int, world_size: int):
    """-> (engine, ds_config) for an initialised process group; the engine owns model, AdamW and schedule."""
    import deepspeed

    ds_config = deepspeed_config(cfg, micro_batch, accumulation, world_size)
    ds_config.pop("vltrain", None)  # ours, not DeepSpeed's (it would warn or refuse unknown keys)
    model = build_model(cfg)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    schedule = functools.partial(lr_factor, peak=o.lr, min_lr=o.min_lr, warmup=warmup_steps(cfg), total=cfg.steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config, dist_init_required=False
    )
    return engine, ds_config


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """dtype of the model's inputs under the engine (DeepSpeed casts the module, not the batch)."""
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32
