"""The trainer's own collectives (stop flags, log sums, the stop decision, barriers), on the right device.

An NCCL process group has no CPU backend: a CPU tensor in `all_reduce` fails with "No backend type
associated with device type cpu" on every attempt, and it is not a cluster failure that a retry
fixes. So every collective the trainer itself issues goes through `Collectives`, bound once to the
device its process group communicates on (the rank's GPU under NCCL, the CPU under gloo), which
moves tensors there and results back. DeepSpeed's own collectives are DeepSpeed's business.
`tests/test_scale_guards.py` checks that no other trainer module calls torch.distributed directly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def comm_device(backend: str, local_rank: int = 0) -> torch.device:
    """The device a process group of `backend` communicates on (pure): NCCL needs the rank's GPU."""
    if backend == "nccl":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return torch.device("cuda", local_rank % count if count else 0)
    return torch.device("cpu")


class Collectives:
    """Collectives over the default process group, every tensor placed on `device` first."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.device = torch.device(device)
        self.world_size = world_size

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, returned on the caller's device (with one rank: `t` itself)."""
        if not self.active:
            return t
        on = t.to(self.device)
        dist.all_reduce(on)
        return on.to(t.device)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if not self.active:
            return t
        on = t.to(self.device)
        dist.broadcast(on, src=src)
        return on.to(t.device)

    def broadcast_objects(self, objects: list[Any], src: int = 0) -> list[Any]:
        """Picklable objects from `src` to every rank (in place, like torch's), through `device`."""
        if self.active:
            dist.broadcast_object_list(objects, src=src, device=self.device)
        return objects

    def barrier(self) -> None:
        if self.active:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """x [B, ...] of every rank of `group` (None: the world), concatenated in rank order, with autograd:
    the backward reduce-scatters (sums) the gradients of the gathered rows back to the ranks that own them.

    torch's functional collectives (all_gather_single_autograd) name the group's own ranks, so they work
    on a subgroup (the data-parallel one under tp or pp); the deprecated torch.distributed.nn all_gather
    does not: its backward reduces to global rank 0, a rank the second data-parallel group lacks.
    """
    from torch.distributed import _functional_collectives as funcol

    pg = group or dist.group.WORLD
    if pg is None:
        raise RuntimeError("all_gather_rows: torch.distributed is not initialised")
    return funcol.wait_tensor(funcol.all_gather_single_autograd(x.contiguous(), gather_dim=0, group=pg))


def group_all_reduce(t: torch.Tensor, group: Any, device: torch.device, op: str = "sum") -> torch.Tensor:
    """`t` reduced over `group` ("sum" or "max"), sent from `device` (the one the group communicates on:
    under NCCL a CPU tensor fails) and returned on the caller's device."""
    on = t.to(device)
    dist.all_reduce(on, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return on.to(t.device)


def group_gather_rows(t: torch.Tensor, group: Any, device: torch.device, size: int) -> list[torch.Tensor]:
    """Every rank's rows of `t` [n, ...] (n may differ by rank), in rank order, on the caller's device:
    the counts first, then rows padded to the largest count (all_gather needs equal shapes)."""
    on = t.to(device)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([on.shape[0]], device=device), group=group)
    n = [int(c) for c in counts]
    padded = torch.zeros(max(n), *on.shape[1:], dtype=on.dtype, device=device)
    padded[: on.shape[0]] = on
    parts = [torch.empty_like(padded) for _ in n]
    dist.all_gather(parts, padded, group=group)
    return [p[:k].to(t.device) for p, k in zip(parts, n)]


def group_gather_objects(obj: Any, group: Any, size: int) -> list[Any]:
    """Every rank's picklable `obj` over `group`, in rank order (torch pickles through the current device)."""
    every: list[Any] = [None] * size
    dist.all_gather_object(every, obj, group=group)
    return every
