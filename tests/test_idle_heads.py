"""Objectives weighted 0 in a stage are not run and their parameters are not decayed (issue 23, point 4).

The model's forward skips the heads of zero-weighted objectives (no MLM stream when mlm = 0, no caption
decoder when caption = 0, no MIM when mim = 0, no contrastive projections when itc = 0);
`VLModel.idle_parameters` names what they leave without a gradient (checked against autograd); and
under both engines, on 2 gloo ranks, those parameters stay bit-identical over several steps with weight
decay on (DeepSpeed's flat buffers give them zero gradients: their group's decay is 0 in that stage),
while a weight > 0 moves them.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import batches, build_engine, full_state, run_ranks
from tests.test_model import make_batch, tiny
from vltrain.config import LossConfig, parse_train_config
from vltrain.model import VLModel

# the module whose forward a zero weight must skip, per objective
HEAD_OF = {"itc": "text_proj", "mlm": "text.fusion.0", "caption": "decoder", "mim": "mim_decoder"}
HEAD_PARAMS = {"itc": "text_proj", "mlm": "text.fusion", "caption": "decoder", "mim": "mim_decoder"}
WEIGHTS = {"itc": 1.0, "mlm": 1.0, "caption": 1.0, "mim": 0.5}


def _loss(**zero: float) -> LossConfig:
    return LossConfig(**(WEIGHTS | zero))


@pytest.mark.parametrize(
    "zeroed", [(), ("itc",), ("mlm",), ("caption",), ("mim",), ("itc", "mlm"), ("mlm", "caption", "mim")]
)
def test_idle_parameters_are_those_autograd_leaves_without_gradient_and_their_heads_do_not_run(zeroed):
    torch.manual_seed(0)
    model = VLModel(tiny(), _loss(**dict.fromkeys(zeroed, 0.0)), mim=True)
    calls: dict[str, int] = dict.fromkeys(HEAD_OF, 0)
    for objective, name in HEAD_OF.items():
        model.get_submodule(name).register_forward_pre_hook(lambda *_, o=objective: calls.__setitem__(o, calls[o] + 1))
    batch = make_batch(model.cfg)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    out["loss"].backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == model.idle_parameters(model.loss_cfg)
    assert {o for o, n in calls.items() if n == 0} == set(zeroed)  # a zero weight's head never runs, the others do
    for o in zeroed:
        assert float(out[o]) == 0.0


def test_the_model_with_every_weight_positive_computes_what_it_did():
    """Skipping is only for zero weights: with all weights > 0 the losses equal a hand-run of every head."""
    torch.manual_seed(0)
    model = VLModel(tiny(), LossConfig(mim=0.0))
    batch = make_batch(model.cfg)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    assert all(float(out[k]) > 0 for k in ("itc", "mlm", "caption"))
    assert model.idle_parameters(model.loss_cfg) == set()


# ---------------------------------------------------------------- both engines, 2 ranks
STEPS, ACC, MB = 3, 2, 2


def _cfg(strategy: str, stages: list[dict], precision: str = "fp32"):
    data = {
        "model": "tiny",
        "global_batch": 2 * ACC * MB,
        "accumulation": ACC,
        "steps": STEPS + 1,
        "precision": precision,
        "seed": 0,
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 1, "weight_decay": 0.5},
        "loss": WEIGHTS,
        "stages": stages,
        "parallel": {"strategy": strategy},
    }
    return parse_train_config(data, "test.toml")


def _train_idle(rank: int, world: int, strategy: str, zero: str, precision: str = "fp32") -> dict:
    """Stage 1 weights `zero` 0 for all STEPS steps; returns the head's parameters before and after and
    whether its forward ran."""
    cfg = _cfg(strategy, [{"steps": STEPS, "loss": {zero: 0.0}}, {"loss": {}}], precision)
    engine = build_engine(rank, world, cfg, MB, ACC)
    from vltrain.stages import stage_at

    engine.set_loss_config(stage_at(cfg, 1)[1])
    head = HEAD_OF[zero]
    ran = []
    engine.module.get_submodule(head).register_forward_pre_hook(lambda *_: ran.append(1))
    before = {n: p for n, p in full_state(engine).items() if n.startswith(HEAD_PARAMS[zero])}
    keys = ("itc", "mlm", "caption", "mim")
    for step in range(STEPS):
        engine.train_step(batches(cfg, rank, step, ACC, MB), keys)
    after = {n: p for n, p in full_state(engine).items() if n.startswith(HEAD_PARAMS[zero])}
    idle = engine.module.idle_parameters(stage_at(cfg, 1)[1])
    engine.set_loss_config(stage_at(cfg, STEPS + 1)[1])  # the next stage uses it: it trains
    engine.train_step(batches(cfg, rank, STEPS, ACC, MB), keys)
    later = {n: p for n, p in full_state(engine).items() if n.startswith(HEAD_PARAMS[zero])}
    return {"ran": len(ran), "before": before, "after": after, "later": later, "idle": idle}


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "precision"), [("deepspeed", "fp32"), ("deepspeed", "bf16"), ("fsdp", "fp32")])
def test_a_zero_weighted_head_neither_runs_nor_moves_under_both_engines_on_two_ranks(strategy, precision):
    """caption 0 then 1 (the decoder: Linear weights that weight decay 0.5 would shrink); mlm 0 alike.
    DeepSpeed fp32 on CPU reduces once per step (coalesced), bf16 every micro step into its flat buffers."""
    for zero in ("caption", "mlm"):
        results = run_ranks(_train_idle, 2, strategy, zero, precision)
        r = results[0]
        assert r["before"] and set(r["before"]) <= r["idle"]
        assert r["ran"] == ACC  # only the last step's micro steps, in the stage that weights it
        for name, t in r["before"].items():
            assert torch.equal(t, r["after"][name]), (zero, name)  # bit-identical through the idle stage
        moved = {n for n in r["before"] if not torch.equal(r["before"][n], r["later"][n])}
        # all train once weighted (in bf16 one step cannot move a norm gain of 1.0: its spacing is 2^-7)
        must = {n for n in r["before"] if precision == "fp32" or "norm" not in n}
        assert must <= moved, (zero, must - moved)
        assert all(torch.equal(results[1]["after"][n], t) for n, t in r["after"].items())
