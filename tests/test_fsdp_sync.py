"""FSDP's sharp edges on CPU (gloo, spawned ranks; issue 23, points 4 and 7): gradient sync once per
optimizer step, hybrid sharding (HSDP) training as full sharding does, inputs that keep their dtype."""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import batches, build_engine, full_state, run_ranks
from vltrain.config import parse_train_config

KEYS = ("itc", "mlm", "caption", "mim")


def _cfg(world: int, acc: int, mb: int, steps: int = 3, **top):
    parallel = {"strategy": "fsdp"} | top.pop("parallel", {})
    data = {
        "model": "tiny",
        "global_batch": world * acc * mb,
        "accumulation": acc,
        "steps": steps,
        "precision": "fp32",
        "seed": 0,
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 1},
        "parallel": parallel,
    } | top
    return parse_train_config(data, "test.toml")


# ---------------------------------------------------------------- gradient sync per optimizer step
def _count_syncs(rank: int, world: int, zero_stage: int, acc: int) -> dict:
    """Gradient reductions (FSDP2's reduce-scatters: torch 2.13's reduce_scatter_single; HSDP's
    all-reduces) per micro step of two optimizer steps, and the forward calls of each FSDP unit per micro step."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    cfg = _cfg(world, acc, 1, zero_stage=zero_stage)
    engine = build_engine(rank, world, cfg, 1, acc)
    micro = {"i": -1}
    engine.module.register_forward_pre_hook(lambda *_: micro.__setitem__("i", micro["i"] + 1), prepend=True)
    uses: dict[str, int] = {}
    for name, m in engine.module.named_modules():
        if isinstance(m, FSDPModule):
            m.register_forward_pre_hook(lambda *_, n=name: uses.__setitem__(n, uses.get(n, 0) + 1))
    calls: list[int] = []
    for name in ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce"):
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            calls.append(micro["i"])
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    per_step = []
    for step in range(2):
        micro["i"], calls[:] = -1, []
        engine.train_step(batches(cfg, rank, step, acc, 1), KEYS)
        per_step.append([calls.count(i) for i in range(acc)])
    return {"per_micro": per_step, "units": len(uses), "twice": sum(n > acc * 2 for n in uses.values())}


@pytest.mark.slow
def test_fsdp_reduces_gradients_only_on_the_last_micro_step():
    """zero_stage 2: the micro steps before the last reduce nothing (set_requires_gradient_sync(False)),
    the last reduces each FSDP unit once: as often per optimizer step as with accumulation 1. Each unit
    runs once per forward (the clean and masked text go through the text blocks as one batch: run twice,
    FSDP2 reduced them twice in the last micro step). zero_stage 3 reduces each micro step (no full-size
    unsharded gradient is kept: its memory is why it is chosen)."""
    one = run_ranks(_count_syncs, 2, 2, 1)[0]
    four = run_ranks(_count_syncs, 2, 2, 4)[0]
    units = one["units"]
    assert one["twice"] == four["twice"] == 0, (one, four)
    assert one["per_micro"] == [[units]] * 2, one
    assert four["per_micro"] == [[0, 0, 0, units]] * 2, four
    three = run_ranks(_count_syncs, 2, 3, 4)[0]
    assert three["per_micro"] == [[units] * 4] * 2, three


# ---------------------------------------------------------------- hybrid sharding
def _train(rank: int, world: int, sharding: str, steps: int) -> dict:
    cfg = _cfg(world, 2, 2, steps, parallel={"sharding": sharding})
    engine = build_engine(rank, world, cfg, 2, 2)
    losses = [engine.train_step(batches(cfg, rank, s, 2, 2), KEYS)[0] for s in range(steps)]
    mesh = engine.mesh
    dims = {name: mesh[name].size() for name in mesh.mesh_dim_names}
    shard = engine.module.vision.patch_embed.weight
    return {"losses": torch.stack(losses), "weights": full_state(engine), "dims": dims, "local": shard.to_local().shape}


@pytest.mark.slow
def test_hybrid_sharding_on_two_nodes_of_two_trains_as_full_sharding():
    """4 ranks as 2 "nodes" x 2 (LOCAL_WORLD_SIZE 2): parameters sharded over the 2 ranks of a node,
    replicated across the nodes; the same losses and weights as full sharding over 4 within fp32
    reduction-order rounding (reduce-scatter in the node, then all-reduce across: another summation order)."""
    steps = 3
    hybrid = run_ranks(_train, 4, "hybrid", steps, local_world=2)
    full = run_ranks(_train, 4, "full", steps, local_world=2)
    assert hybrid[0]["dims"]["dp_replicate"] == 2 and hybrid[0]["dims"]["dp_shard"] == 2
    rows = full[0]["weights"]["vision.patch_embed.weight"].shape[0]
    assert hybrid[0]["local"][0] == rows // 2 and full[0]["local"][0] == rows // 4
    for h, f in zip(hybrid, full, strict=True):
        torch.testing.assert_close(h["losses"], f["losses"], rtol=1e-5, atol=1e-6)
    worst = max(float((hybrid[0]["weights"][k] - w).abs().max()) for k, w in full[0]["weights"].items())
    assert worst < 1e-5, worst


# ---------------------------------------------------------------- inputs keep their dtype
def _input_dtypes(rank: int, world: int) -> dict:
    """What the model and a Block receive under bf16 FSDP: MLM's draws and the RoPE tables."""
    import dataclasses

    from vltrain.model.layers import Block
    from vltrain.presets import get_preset

    model = dataclasses.asdict(get_preset("tiny")) | {"pos_embedding": "rope"}
    cfg = _cfg(world, 1, 2, precision="bf16", model=model)
    engine = build_engine(rank, world, cfg, 2, 1)
    seen: dict[str, torch.dtype] = {}

    def root(_module, args, kwargs):
        seen["mlm_draws"] = (args[3] if len(args) > 3 else kwargs["mlm_draws"]).dtype
        seen["images"] = args[0].dtype

    def block(_module, args, kwargs):
        if kwargs.get("rope") is not None:
            seen["rope"] = kwargs["rope"][0].dtype

    engine.module.register_forward_pre_hook(root, with_kwargs=True)
    next(m for m in engine.module.modules() if isinstance(m, Block)).register_forward_pre_hook(block, with_kwargs=True)
    engine.train_step(batches(cfg, rank, 0, 1, 2), KEYS)
    return seen


def test_fsdp_mixed_precision_keeps_mlm_draws_and_rope_tables_in_fp32():
    seen = run_ranks(_input_dtypes, 1)[0]
    assert seen == {"mlm_draws": torch.float32, "rope": torch.float32, "images": torch.bfloat16}, seen


# ---------------------------------------------------------------- the hybrid-sharding rule
def test_hybrid_sharding_is_refused_under_deepspeed_and_where_a_node_does_not_divide_dp():
    from vltrain.parallel.layout import hybrid_shard, layout_problems

    def problems(world: int, node: int | None, **parallel):
        cfg = _cfg(world, 1, 1, parallel={"sharding": "hybrid"} | parallel)
        return [p for p in layout_problems(cfg, world, node) if p.startswith("parallel.sharding")]

    (ds,) = problems(16, 8, strategy="deepspeed")
    assert '"hybrid" under parallel.strategy "deepspeed"' in ds and 'allowed: "full"' in ds
    assert problems(16, 8) == [] and problems(16, None) == []  # 2 nodes x 8: shards of 8, 2 replicas
    (odd,) = problems(12, 8)  # dp 12 over shards of 8
    assert "shards over 8 data-parallel ranks per node" in odd and "does not divide dp 12" in odd
    assert problems(16, 8, tp=2) == [] and hybrid_shard(8, 2, 1, 8) == 4  # a node's 8 ranks / tp 2
    assert problems(8, 8) == []  # one node: shards of 8 = dp, replicated once
