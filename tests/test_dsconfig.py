"""The DeepSpeed config generated from a plan is one DeepSpeed itself accepts, with the plan's numbers."""

from __future__ import annotations

import os

import pytest

from clusterctl.planning.plan import plan_for_run
from clusterctl.planning.profiles import load_profile
from vltrain.config import TrainConfig, load_train_config
from vltrain.dsconfig import deepspeed_config, warmup_steps


def _ds(cfg_dict):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig({k: v for k, v in cfg_dict.items() if k != "vltrain"})


def test_plan_to_deepspeed_config_round_trip():
    cfg = TrainConfig(model="tiny", global_batch=32, accumulation=4, precision="bf16", zero_stage=2)
    plan, filled = plan_for_run(load_profile("local"), cfg)
    d = deepspeed_config(filled, filled.micro_batch, filled.accumulation, plan.world_size)
    c = _ds(d)
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (32, 8, 4)
    assert c.zero_optimization_stage == 2 and c.gradient_clipping == 1.0
    assert c.bfloat16_config.enabled is True


def test_deepspeed_rejects_a_split_that_does_not_multiply_out():
    d = deepspeed_config(TrainConfig(model="tiny"), 8, 4, 1)
    d["train_batch_size"] = 64
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        _ds(d)


def test_optimizer_and_schedule_come_from_the_train_config(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text(
        'model = "tiny"\nsteps = 200\nprecision = "fp32"\n[optim]\nlr = 5e-4\nmin_lr = 1e-5\n'
        "warmup_fraction = 0.05\nbetas = [0.9, 0.98]\nweight_decay = 0.05\ngrad_clip = 0.5\n"
    )
    cfg = load_train_config(f)
    d = deepspeed_config(cfg, 2, 2, 1)
    assert d["bf16"] == {"enabled": False} and d["gradient_clipping"] == 0.5
    assert d["vltrain"]["optimizer"] == {
        "type": "AdamW",
        "lr": 5e-4,
        "betas": [0.9, 0.98],
        "eps": 1e-8,
        "weight_decay": 0.05,
    }
    assert d["vltrain"]["schedule"]["warmup_steps"] == 10 == warmup_steps(cfg)
    assert d["vltrain"]["schedule"]["min_lr"] == 1e-5
