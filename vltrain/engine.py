"""The DeepSpeed ZeRO engine of a run: process group, model, AdamW parameter groups, LR schedule.

The DeepSpeed config comes from `vltrain.dsconfig.deepspeed_config` (what the planner planned is
what runs); its "vltrain" section is ours and is removed before DeepSpeed sees it. The optimizer is
torch's AdamW (no JIT-compiled op on CPU) and the schedule a LambdaLR over `vltrain.schedule`, both
handed to deepspeed.initialize so that DeepSpeed steps, clips and checkpoints them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from vltrain.config import TrainConfig
from vltrain.distenv import DistEnv, backend, cuda_index, export
from vltrain.dsconfig import deepspeed_config, warmup_steps
from vltrain.presets import resolve_model
from vltrain.rundir import DIST_TIMEOUT_S, STEP_DIST_TIMEOUT_S
from vltrain.schedule import lr_factor


def init_process_group(dist: DistEnv, device: str) -> torch.device:
    """deepspeed.init_distributed from the detected layout (gloo on CPU, nccl on CUDA); returns the
    rank's device. VLTRAIN_DIST_TIMEOUT_S bounds how long a collective waits for a lost peer until
    the first step (start-up is slow: 30 min by default); `shorten_timeout` tightens it after. The
    loop turns a timed-out collective into exit code 75, which clusterctl retries."""
    export(dist, device)
    rank_device = torch.device("cpu")
    if device == "cuda":
        rank_device = torch.device("cuda", cuda_index(dist.local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(rank_device)
    import deepspeed

    timeout = timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_S, 1800)))
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


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu") -> nn.Module:
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
    with torch.device(device), _default_dtype(dtype):
        model = VLModel(
            resolve_model(cfg.model), cfg.loss, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, mask_id=MASK_ID
        )
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_engine(
    cfg: TrainConfig, micro_batch: int, accumulation: int, world_size: int, device: torch.device | str = "cpu"
):
    """-> (engine, ds_config) for an initialised process group; the engine owns model, AdamW and schedule."""
    import deepspeed

    from vltrain.model_math import param_count

    device = torch.device(device)
    ds_config = deepspeed_config(
        cfg, micro_batch, accumulation, world_size, device=device.type, params=param_count(resolve_model(cfg.model))
    )
    fused = ds_config.pop("vltrain")["optimizer"]["fused"]  # ours, not DeepSpeed's (it refuses unknown keys)
    model = build_model(cfg, device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None
    )
    schedule = functools.partial(lr_factor, peak=o.lr, min_lr=o.min_lr, warmup=warmup_steps(cfg), total=cfg.steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config, dist_init_required=False
    )
    return engine, ds_config


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """dtype of the model's inputs under the engine (DeepSpeed casts the module, not the batch)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
