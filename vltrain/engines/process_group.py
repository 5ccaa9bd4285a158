"""The default process group of a run (both engines start it here) and the time-outs of every group."""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from vltrain.distenv import DistEnv, backend, cuda_index, export
from vltrain.rundir import DIST_TIMEOUT_S, STEP_DIST_TIMEOUT_S


def start_timeout() -> timedelta:
    """How long a collective waits for a lost peer until the first step (start-up is slow): the variable
    DIST_TIMEOUT_S names, 30 min by default; `shorten_timeout` tightens it after. The loop turns a
    timed-out collective into exit code 75, which clusterctl retries."""
    return timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_S, 1800)))


def rank_device(dist: DistEnv, device: str) -> torch.device:
    """Export the launcher variables of the detected layout and pick the rank's device (its GPU on CUDA)."""
    export(dist, device)
    if device != "cuda":
        return torch.device("cpu")
    chosen = torch.device("cuda", cuda_index(dist.local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(chosen)
    return chosen


def init_torch_process_group(dist: DistEnv, device: str) -> torch.device:
    """torch's default process group (gloo on CPU, nccl on CUDA); returns the rank's device."""
    import torch.distributed as tdist

    chosen = rank_device(dist, device)
    if not tdist.is_initialized():
        tdist.init_process_group(backend(device), timeout=start_timeout())
    set_collective_timeout(start_timeout())  # and every group the engine makes (mesh dims, DeepSpeed's)
    return chosen


def set_collective_timeout(timeout: timedelta) -> None:
    """Every process group of this process waits `timeout` for a lost peer: those that exist, and those
    made later without a time-out of their own (DeviceMesh's dimension groups, DeepSpeed's data-parallel
    groups): torch gives these its module default (10 min under NCCL, 30 under gloo), which no public API
    changes, so that default is set too. `_set_pg_timeout` is torch's own setter for an existing group."""
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    if not c10d.is_initialized():
        return
    for group in list(c10d._world.pg_map):
        c10d._set_pg_timeout(timeout, group)


def shorten_timeout() -> None:
    """Once a step has run, a collective that waits long means a lost peer: the variable STEP_DIST_TIMEOUT_S
    names (10 min by default) instead of the start-up's 30."""
    import torch.distributed as dist

    seconds = float(os.environ.get(STEP_DIST_TIMEOUT_S, 600))
    if dist.is_initialized() and dist.get_world_size() > 1:
        set_collective_timeout(timedelta(seconds=seconds))  # every group: the mesh's and DeepSpeed's too
