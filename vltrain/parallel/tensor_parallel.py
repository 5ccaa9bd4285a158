"""Tensor parallelism of VLModel's transformer blocks with DTensor's `parallelize_module`.

Megatron-LM's split (Shoeybi et al. 2019): in every Block of the three towers, q, k, v and the MLP's
fc1 are column-parallel (each rank holds whole heads / a slice of the hidden units and computes them
from the replicated input), `out` and fc2 are row-parallel (the partial products are summed by one
all-reduce, so the block's output is replicated again). Cross-attention's k and v read the replicated
image features. Embeddings, norms, projections and the tied head stay replicated (plain tensors,
computed identically by every tensor-parallel rank, so their gradients agree without communication).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from vltrain.model.layers import Block


def block_plan(block: Block) -> dict[str, ParallelStyle]:
    """The parallelize_module plan of one Block (self-attention, optional cross-attention, MLP)."""
    plan: dict[str, ParallelStyle] = {}
    for attn in ("attn", "cross") if hasattr(block, "cross") else ("attn",):
        plan |= {f"{attn}.{n}": ColwiseParallel() for n in ("q", "k", "v")}
        plan[f"{attn}.out"] = RowwiseParallel()
    plan |= {"mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}
    return plan


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard every Block of `module` (a VLModel or a pipeline stage of one) over the 1-D `tp_mesh`, in place.

    The heads and MLP hidden size must be divisible by the mesh size (vltrain.parallel.layout checks it).
    Returns `module`.
    """
    if tp_mesh.size() == 1:
        return module
    for block in [m for m in module.modules() if isinstance(m, Block)]:
        parallelize_module(block, tp_mesh, block_plan(block))
    return module
