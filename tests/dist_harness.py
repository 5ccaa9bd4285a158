"""In-process multi-rank runs of the training engines on CPU (gloo): spawned ranks that build an engine
the way the loop does (the engine class's process-group start, RankLayout, build) and train on
synthetic batches. Used by the engine-level tests (test_fsdp_sync, test_idle_heads); the processes are
stopped also when a test fails or times out."""

from __future__ import annotations

import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from tests.conftest import deadline
from vltrain.distenv import free_port


def _child(fn: Callable[..., Any], rank: int, world: int, env: dict[str, str], args: tuple, out) -> None:
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        out.put((rank, True, pickle.dumps(fn(rank, world, *args))))  # plain pickle: no shared-memory tensors
    except BaseException:  # the parent reports it
        out.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 400, local_world: int = 0) -> list[Any]:
    """fn(rank, world, *args) on `world` spawned processes (a picklable, module-level fn); -> results by rank.
    local_world: ranks per simulated node (LOCAL_WORLD_SIZE; default: all on one node)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    lw = local_world or world
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_WORLD_SIZE": str(lw)}
    procs = []
    for r in range(world):
        e = env | {"LOCAL_RANK": str(r % lw), "GROUP_RANK": str(r // lw)}
        procs.append(ctx.Process(target=_child, args=(fn, r, world, e, args, out), daemon=True))
    results: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        limit = deadline(timeout)
        while len(results) < world:
            try:
                rank, ok, value = out.get(timeout=limit)
            except queue.Empty:
                raise AssertionError(
                    f"ranks {sorted(set(range(world)) - results.keys())} gave no result in {limit:.0f} s"
                ) from None
            assert ok, f"rank {rank} failed:\n{value}"
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]


def build_engine(rank: int, world: int, cfg, micro_batch: int, accumulation: int):
    """The engine of `cfg.parallel.strategy` on this rank, as vltrain.loop builds it (CPU, gloo)."""
    from vltrain.distenv import DistEnv
    from vltrain.engines import engine_class
    from vltrain.engines.common import RankLayout

    lw = int(os.environ["LOCAL_WORLD_SIZE"])
    d = DistEnv(rank, world, rank % lw, lw, rank // lw, "127.0.0.1", int(os.environ["MASTER_PORT"]), "torchrun")
    cls = engine_class(cfg.parallel.strategy)
    device = cls.init_process_group(d, "cpu")
    layout = RankLayout.of(rank, world, cfg.parallel.tp, cfg.parallel.pp)
    return cls.build(cfg, micro_batch, accumulation, layout, device)


def batches(cfg, rank: int, step: int, accumulation: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
    """Synthetic loader batches of this rank at `step` (bos, tokens, eos, padding; MLM draws)."""
    from vltrain.presets import resolve_model

    m = resolve_model(cfg.model)
    out = []
    for micro in range(accumulation):
        g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
        t = 12
        ids = torch.randint(5, m.vocab_size, (micro_batch, t), generator=g)
        lengths = torch.randint(4, t + 1, (micro_batch,), generator=g)
        mask = torch.arange(t)[None] < lengths[:, None]
        ids[:, 0] = 2
        ids[torch.arange(micro_batch), lengths - 1] = 3
        ids[~mask] = 0
        images = torch.randn(micro_batch, 3, m.image_size, m.image_size, generator=g)
        draws = torch.rand(3, micro_batch, t, generator=g)
        out.append({"images": images, "input_ids": ids, "attention_mask": mask, "mlm_draws": draws})
    return out


def full_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's model, whole (FSDP's DTensors gathered), on the CPU, by name."""
    from torch.distributed.tensor import DTensor

    module = engine.module
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()
        for n, p in module.named_parameters()
    }


def optimizer_moments(ds) -> dict[str, torch.Tensor]:
    """Every tensor of the AdamW state under a DeepSpeed engine (its ZeRO optimizer's inner one; stage 0's
    is torch's own), by "group-entry.key"."""
    inner = getattr(ds.optimizer, "optimizer", ds.optimizer)
    return {
        f"{i}.{k}": v.clone() for i, s in enumerate(inner.state.values()) for k, v in s.items() if torch.is_tensor(v)
    }


def assert_same_weights_and_moments(a: dict, b: dict) -> None:
    """Two runs' "weights" and "moments" (full_state, optimizer_moments) equal bit for bit."""
    assert a["weights"].keys() == b["weights"].keys() and a["moments"].keys() == b["moments"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert all(torch.equal(a["moments"][k], b["moments"][k]) for k in a["moments"])
