"""FSDP2 (`torch.distributed.fsdp.fully_shard`) of VLModel over the data-parallel mesh dimension.

One FSDP unit per transformer Block (its all-gather overlaps the previous block's compute and its
parameters are freed after it), and the root unit for the rest (embeddings, norms, projections, the
contrastive temperature); the tied token embedding is used both by the embedding and by the MLM and
caption heads, so it stays in the root unit, gathered for the whole forward.

Precision: fp32 master weights in the sharded parameters, the forward and backward in bf16 / fp16
(`MixedPrecisionPolicy.param_dtype`), gradients reduced and accumulated in fp32 (`reduce_dtype`), as
the DeepSpeed config does (vltrain.dsconfig: bf16 accumulation errs 2.6-3.7x more). fp32 runs without
a policy. The policy does not cast the forward inputs (cast_forward_inputs=False): FSDP would cast every
floating input of every unit, MLM's random draws (bf16 keeps 8 bits: a draw just under mask_prob can
round over it, and the masks differ from DeepSpeed's) and the RoPE tables (cos and sin to ~3 digits)
among them; the images come in
the compute dtype (vltrain.engines.common.model_inputs) and the rest follows the parameters, as under
DeepSpeed, which casts the module and not its inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from vltrain.common.errors import UserError


def reshard_after_forward(zero_stage: int) -> bool:
    """zero_stage 3 = free the gathered parameters after each block's forward (ZeRO-3-like: the least
    memory, one more all-gather per block in backward); 2 = keep them gathered until its backward
    (ZeRO-2-like: gradients and optimizer state sharded, parameters gathered once per step)."""
    if zero_stage not in (2, 3):
        raise UserError(
            f"zero_stage: {zero_stage} under parallel.strategy 'fsdp'; allowed: 2 (parameters kept gathered "
            "from forward to backward) or 3 (resharded after forward): FSDP always shards gradients and "
            "optimizer state"
        )
    return zero_stage == 3


def mixed_precision(precision: str):
    """The MixedPrecisionPolicy of `precision` (None under fp32: nothing to cast)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_model(model: nn.Module, dp_mesh, precision: str, zero_stage: int) -> nn.Module:
    """fully_shard each Block of `model` (a VLModel or a pipeline stage of one), then the root; in place."""
    from torch.distributed.fsdp import fully_shard

    from vltrain.model.layers import Block

    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward(zero_stage)}
    if (policy := mixed_precision(precision)) is not None:
        kwargs["mp_policy"] = policy
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
