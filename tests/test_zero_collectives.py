"""DeepSpeed ZeRO's per-group collectives at the step, issued together on gloo ranks
(vltrain.engines.zero_collectives; issue 29, point 1): bit-identical to DeepSpeed's own step, every
group's norm all-reduce and weight all-gather in flight before the first wait, DeepSpeed's functions
back after each step."""

from __future__ import annotations

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


def _cfg(world: int, acc: int, zero_stage: int = 2):
    data = {
        "model": "tiny",
        "global_batch": world * acc * 2,
        "accumulation": acc,
        "steps": 3,
        "precision": "fp32",
        "seed": 0,
        "zero_stage": zero_stage,
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 1, "grad_clip": 0.05},
    }
    return parse_train_config(data, "test.toml")


def _record_collectives(log: list[tuple[str, bool]]) -> None:
    """Every all-reduce, all-gather and wait DeepSpeed's ZeRO optimizer runs, in order, into `log`:
    (name, async_op), and ("wait", True) for each wait on an async one."""
    from deepspeed import comm as dist

    for name in ("all_reduce", "all_gather_into_tensor"):
        original = getattr(dist, name)

        def wrapper(*a, _fn=original, _name=name, **k):
            log.append((_name, bool(k.get("async_op", False))))
            work = _fn(*a, **k)
            if work is None:
                return None
            wait = work.wait

            def logged_wait(*wa, **wk):
                log.append(("wait", True))
                return wait(*wa, **wk)

            return type("Logged", (), {"wait": staticmethod(logged_wait)})()

        setattr(dist, name, wrapper)


def _applies_under(ds, backend: str) -> bool:
    """zero_collectives.applies(ds) were its process groups `backend`'s."""
    import torch.distributed as dist

    from vltrain.engines import zero_collectives

    real = dist.get_backend
    dist.get_backend = lambda group=None: backend
    try:
        return zero_collectives.applies(ds)
    finally:
        dist.get_backend = real


def _train(rank: int, world: int, pipelined: bool, acc: int, steps: int, zero_stage: int = 2) -> dict:
    """`steps` optimizer steps with the per-group collectives together or as DeepSpeed issues them;
    everything a step leaves behind, the collectives of the last step, and whether DeepSpeed's own
    functions are back after it."""
    import deepspeed.runtime.utils as ds_utils
    import deepspeed.runtime.zero.stage_1_and_2 as zero

    cfg = _cfg(world, acc, zero_stage)
    engine = build_engine(rank, world, cfg, 2, acc)
    chosen = engine.pipelined
    engine.pipelined = pipelined and chosen
    under_nccl = _applies_under(engine.ds, "nccl")
    log: list[tuple[str, bool]] = []
    initial, losses, norms = full_state(engine), [], []
    for step in range(steps):
        if step == steps - 1:
            _record_collectives(log)
        loss, _ = engine.train_step(batches(cfg, rank, step, acc, 2), KEYS)
        losses.append(loss)
        norms.append(engine.get_global_grad_norm())
    opt = engine.ds.optimizer
    moments = optimizer_moments(engine.ds)
    final = full_state(engine)
    return {
        "chosen": chosen,
        "under_nccl": under_nccl,
        "groups": len(getattr(opt, "optimizer", opt).param_groups),  # AdamW's (ZeRO wraps it; stage 0 not)
        "losses": torch.stack(losses),
        "norms": norms,
        "weights": final,
        "moved": sum(not torch.equal(v, final[k]) for k, v in initial.items()),
        "moments": moments,
        "log": log,
        "restored": zero.all_gather_dp_groups is ds_utils.all_gather_dp_groups
        and "scaled_global_norm" not in vars(opt),
    }


def _assert_identical(a: dict, b: dict) -> None:
    assert torch.equal(a["losses"], b["losses"]) and a["norms"] == b["norms"]
    assert_same_weights_and_moments(a, b)


def _issued_before_first_wait(log: list[tuple[str, bool]], name: str) -> int:
    """How many async `name` collectives were issued in the run of them that precedes a wait."""
    most, run = 0, 0
    for n, is_async in log:
        if n == name and is_async:
            run += 1
        elif n == "wait":
            most, run = max(most, run), 0
    return most


def test_group_collectives_in_flight_together_train_bit_identically():
    """fp32 ZeRO-2 on two gloo ranks (stage 1 without hooks), accumulation 2, 3 steps, clipping on (0.05:
    the norm scales every update): the pipelined step and DeepSpeed's own give the same losses, gradient
    norms, weights and AdamW moments bit for bit. In the pipelined step every group's norm all-reduce and
    every group's all-gather is issued before one of them is waited on (DeepSpeed's: one, then its
    wait); the module's all_gather_dp_groups and the optimizer's scaled_global_norm are DeepSpeed's again
    after each step; were the groups NCCL's, it would not be chosen (only gloo was measured, and the
    trainer's collective guard in test_scale_guards leaves this module to it). Mutation: a norm summed over the wrong group's gradients changes the clipped update."""
    together = run_ranks(_train, 2, True, 2, 3)
    own = run_ranks(_train, 2, False, 2, 3)
    for t, o in zip(together, own, strict=True):
        assert t["chosen"] and t["groups"] >= 2 and t["restored"] and o["restored"]
        assert not t["under_nccl"]  # NCCL keeps DeepSpeed's step (only gloo was measured)
        _assert_identical(t, o)
        assert t["moved"] >= len(t["weights"]) // 2  # the steps trained (else identical proves nothing)
        for name in ("all_reduce", "all_gather_into_tensor"):
            assert _issued_before_first_wait(t["log"], name) == t["groups"], (name, t["log"])
        assert not any(is_async for n, is_async in o["log"] if n != "wait")  # DeepSpeed's: blocking, one by one
        assert [n for n, _ in o["log"]].count("all_gather_into_tensor") == o["groups"]


def test_pipelined_step_is_chosen_only_where_it_applies():
    """One rank has nothing to reduce or gather with: DeepSpeed's step, no async collective. ZeRO stage 0
    on two ranks is not DeepSpeed's ZeRO optimizer (no per-group norm or all-gather): not chosen."""
    one = run_ranks(_train, 1, True, 1, 1)[0]
    assert not one["chosen"] and not any(is_async for _, is_async in one["log"])
    stage0 = run_ranks(_train, 2, True, 1, 1, 0)
    assert not any(r["chosen"] for r in stage0)
