"""DeepSpeed's micro steps before the accumulation boundary run on the module directly where its stage 1
has no gradient hooks (vltrain.engines.deepspeed.direct_micro_steps; issue 29, point 1): bit-identical
to DeepSpeed's own forward, backward and step, on spawned gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import (
    assert_same_weights_and_moments,
    batches,
    build_engine,
    full_state,
    optimizer_moments,
    run_ranks,
)
from vltrain.config import parse_train_config

KEYS = ("itc", "mlm", "caption", "mim")


def _cfg(world: int, acc: int, precision: str = "fp32"):
    data = {
        "model": "tiny",
        "global_batch": world * acc * 2,
        "accumulation": acc,
        "steps": 3,
        "precision": precision,
        "seed": 0,
        "zero_stage": 2,
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 1},
    }
    return parse_train_config(data, "test.toml")


def _train(rank: int, world: int, direct: bool, acc: int, steps: int, precision: str = "fp32") -> dict:
    """`steps` optimizer steps with the micro steps direct or through DeepSpeed's API; everything a step
    leaves behind: losses, LRs, weights, AdamW's moments, DeepSpeed's counters, and how many forwards
    went through DeepSpeed's engine."""
    cfg = _cfg(world, acc, precision)
    engine = build_engine(rank, world, cfg, 2, acc)
    chosen = engine.direct_micro_steps
    engine.direct_micro_steps = direct and chosen
    ds, through_engine = engine.ds, []
    original = type(ds).forward
    ds.forward = lambda *a, **k: (through_engine.append(1), original(ds, *a, **k))[1]
    initial, losses, lrs = full_state(engine), [], []
    for step in range(steps):
        loss, lr = engine.train_step(batches(cfg, rank, step, acc, 2), KEYS)
        losses.append(loss)
        lrs.append(lr)
    moments = optimizer_moments(ds)
    final = full_state(engine)
    counters = {k: int(getattr(ds, k)) for k in ("micro_steps", "global_steps", "global_samples", "skipped_steps")}
    return {
        "chosen": chosen,
        "losses": torch.stack(losses),
        "lrs": lrs,
        "weights": final,
        "moved": sum(not torch.equal(v, final[k]) for k, v in initial.items()),
        "moments": moments,
        "grad_norm": engine.get_global_grad_norm(),
        "counters": counters,
        "engine_forwards": len(through_engine),
    }


def _assert_identical(a: dict, b: dict) -> None:
    assert torch.equal(a["losses"], b["losses"])
    assert a["lrs"] == b["lrs"] and a["counters"] == b["counters"] and a["grad_norm"] == b["grad_norm"]
    assert_same_weights_and_moments(a, b)


@pytest.mark.slow
def test_direct_micro_steps_train_bit_identically_on_two_ranks():
    """fp32 ZeRO-2 on two CPU ranks (run as stage 1 without hooks), accumulation 4, 3 steps: the direct
    micro steps and DeepSpeed's API give the same losses, LRs, gradient norm, weights, AdamW moments and
    DeepSpeed counters bit for bit, and only the boundary's forward goes through DeepSpeed's engine. A
    lost 1/accumulation, an uncounted micro step (DeepSpeed then steps at the wrong boundary) or a
    gradient left out of the sum changes the weights by >= 1e-4."""
    direct = run_ranks(_train, 2, True, 4, 3)
    api = run_ranks(_train, 2, False, 4, 3)
    for d, a in zip(direct, api, strict=True):
        assert d["chosen"] and d["engine_forwards"] == 3 and a["engine_forwards"] == 12
        assert d["counters"] == {"micro_steps": 12, "global_steps": 3, "global_samples": 3 * 16, "skipped_steps": 0}
        _assert_identical(d, a)
        assert d["moved"] >= len(d["weights"]) // 2  # the steps trained (else identical proves nothing)


def test_one_rank_direct_micro_steps_match_deepspeeds_api():
    """One fp32 rank, accumulation 3, 2 steps: the same check in one process, and accumulation 1 (no
    micro step before the boundary) goes through DeepSpeed's engine alone."""
    direct = run_ranks(_train, 1, True, 3, 2)[0]
    api = run_ranks(_train, 1, False, 3, 2)[0]
    assert direct["chosen"] and (direct["engine_forwards"], api["engine_forwards"]) == (2, 6)
    _assert_identical(direct, api)
    single = run_ranks(_train, 1, True, 1, 2)[0]
    assert single["chosen"] and single["engine_forwards"] == 2


def test_bf16_keeps_deepspeeds_micro_steps():
    """bf16 runs stage 1 through DeepSpeed's BF16_Optimizer, which sums each micro step's gradients into
    its fp32 buffer in backward's epilogue: skipping DeepSpeed there would lose them. It is not chosen."""
    out = run_ranks(_train, 1, True, 2, 1, "bf16")[0]
    assert not out["chosen"] and out["engine_forwards"] == 2
