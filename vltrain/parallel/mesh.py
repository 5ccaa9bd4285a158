"""The device mesh of a run: dims ("pp", "dp", "tp"), tp innermost so tensor-parallel peers are
adjacent ranks (same node, fastest links) and pipeline stages outermost (point-to-point only).

Rank r sits at (pp, dp, tp) = divmod chains of r: r = (pp * dp_size + dp) * tp_size + tp.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from vltrain.common.errors import UserError
from vltrain.parallel.layout import data_parallel

MESH_DIMS = ("pp", "dp", "tp")
# hybrid sharding (parallel.sharding "hybrid", HSDP): dp split into replicas across nodes x shards in a node
HYBRID_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def build_mesh(world: int, tp: int, pp: int, device_type: str, shard: int = 0) -> DeviceMesh:
    """A 3-D DeviceMesh (pp, dp, tp) over the initialised default process group; dp = world / (tp x pp)
    (vltrain.parallel.layout.data_parallel). shard > 0 (hybrid sharding: vltrain.parallel.layout.hybrid_shard)
    splits dp into (dp_replicate, dp_shard) with dp_shard = `shard` innermost, so that a shard group is
    adjacent ranks of one node, and flattens the two back into "dp" (the ITC gather, the loader's share)."""
    try:
        dp = data_parallel(world, tp, pp)
    except ValueError as e:
        raise UserError(f"parallel: {e}; allowed: a world size that is a multiple of tp x pp") from e
    if shard <= 0:
        return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=MESH_DIMS)
    mesh = init_device_mesh(device_type, (pp, dp // shard, shard, tp), mesh_dim_names=HYBRID_DIMS)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: "dp" (1-D: full sharding), or (dp_replicate, dp_shard) (2-D: HSDP,
    fully_shard replicates over the first dimension and shards over the second)."""
    names = mesh.mesh_dim_names or ()
    return mesh["dp_replicate", "dp_shard"] if "dp_shard" in names else mesh["dp"]


def dp_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """Ranks that hold the same model part and different samples (the ITC gather, the loader's shards)."""
    return mesh["dp"].get_group()


def dp_rank(mesh: DeviceMesh) -> int:
    return mesh["dp"].get_local_rank()


def pp_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    return mesh["pp"].get_group()


def pp_rank(mesh: DeviceMesh) -> int:
    return mesh["pp"].get_local_rank()


def clip_grad_norm_(
    params: Iterable[torch.Tensor],
    max_norm: float,
    pp_group: dist.ProcessGroup | None = None,
    duplicates: Iterable[torch.Tensor] = (),
    norm_type: float = 2.0,
) -> float:
    """Clip gradients to a global norm over the whole mesh (max_norm 0: no clipping); returns that norm
    (before clipping; inf or NaN when a gradient is not finite, and then nothing is clipped).

    torch's get_total_norm / clip_grads_with_norm_ (torchtitan's dist_utils.clip_grad_norm_) per group
    of gradients on one mesh with one placement: under FSDP + TP the blocks' weights are 2-D DTensors
    and the rest 1-D ones (plain tensors without FSDP), which one foreach call cannot mix. A group's
    norm over DTensor shards is reduced by full_tensor(); replicated plain tensors count once. Pipeline
    stages hold disjoint parameters, so their p-th powers are summed over pp. `duplicates` (the head's
    copy of the tied embedding, pipeline.tied_copies) are clipped but not counted twice.
    """
    skip = {id(p) for p in duplicates}
    params = [p for p in params if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p)
    powers = []
    for ps in groups.values():
        grads = [p.grad for p in ps if id(p) not in skip and p.grad is not None]
        if not grads:
            continue
        n = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite=False)
        n = n.full_tensor() if isinstance(n, DTensor) else n
        powers.append(n.float() if math.isinf(norm_type) else n.float() ** norm_type)
    dev = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
    local = (torch.stack(powers).max() if math.isinf(norm_type) else torch.stack(powers).sum()) if powers else None
    total = local if local is not None else torch.zeros((), device=dev)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM, group=pp_group)
    total = total if math.isinf(norm_type) else total ** (1.0 / norm_type)
    if max_norm > 0 and torch.isfinite(total):
        for ps in groups.values():
            torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total)
    return float(total)
