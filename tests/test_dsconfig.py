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
        "fused": False,
        "lr": 5e-4,
        "betas": [0.9, 0.98],
        "eps": 1e-8,
        "weight_decay": 0.05,
    }
    assert d["vltrain"]["schedule"]["warmup_steps"] == 10 == warmup_steps(cfg)
    assert d["vltrain"]["schedule"]["min_lr"] == 1e-5


# --- the config for GPUs (issue 14) -------------------------------------------------------------------
def test_cuda_config_is_one_deepspeed_accepts_with_overlap_fp32_reduction_and_sized_buckets():
    import torch

    from vltrain.model_math import param_count
    from vltrain.presets import get_preset

    cfg = TrainConfig(model="crossmodal-xl", global_batch=8192, precision="bf16", zero_stage=2)
    d = deepspeed_config(cfg, 16, 8, 1, device="cuda", params=param_count(get_preset("crossmodal-xl")))
    c = _ds(d)
    z = c.zero_config
    assert z.overlap_comm is True and z.contiguous_gradients is True
    assert z.reduce_bucket_size == z.allgather_bucket_size == 5e8  # capped for a 30B model
    assert c.communication_data_type == torch.float32 and c.grad_accum_dtype == "fp32"
    assert "zero_allow_untested_optimizer" not in d and d["vltrain"]["optimizer"]["fused"] is True
    cpu = deepspeed_config(cfg, 16, 8, 1, device="cpu")
    assert cpu["zero_optimization"]["overlap_comm"] is False and cpu["vltrain"]["optimizer"]["fused"] is False


def test_torch_adamw_needs_no_untested_optimizer_flag():
    """The flag used to be set 'for torch AdamW'; DeepSpeed lists it as ZeRO-supported."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    assert torch.optim.AdamW in ZERO_SUPPORTED_OPTIMIZERS


@pytest.mark.parametrize(
    "model, bucket", [("tiny", lambda n: 2e7), ("base", lambda n: n / 4), ("crossmodal-xl", lambda n: 5e8)]
)
def test_bucket_size_follows_the_model(model, bucket):
    from vltrain.dsconfig import bucket_elements
    from vltrain.model_math import param_count
    from vltrain.presets import get_preset

    n = param_count(get_preset(model))
    assert bucket_elements(n) == int(bucket(n))


def test_bf16_accumulation_error_measured():
    """Why gradients accumulate in fp32: the gradients of 16 micro steps (bf16, as under bf16 training)
    summed in bf16 err by ~0.5% (relative L2 to the exact sum), 3.7x the 0.13% of summing the same
    bf16 gradients in fp32, and bf16's error grows with the number of micro steps; fp32's does not."""
    import torch

    torch.manual_seed(0)
    errors = {}
    for n in (4, 16):
        g = torch.randn(n, 1_000_000, dtype=torch.float64) * 1e-3 + 2e-4  # a shared signal plus noise
        exact = g.sum(0)
        acc16 = torch.zeros(1_000_000, dtype=torch.bfloat16)
        acc32 = torch.zeros(1_000_000, dtype=torch.float32)
        for i in range(n):
            acc16 += g[i].to(torch.bfloat16)
            acc32 += g[i].to(torch.bfloat16).float()
        errors[n] = tuple(float((a.double() - exact).norm() / exact.norm()) for a in (acc16, acc32))
    (bf16_4, fp32_4), (bf16_16, fp32_16) = errors[4], errors[16]
    assert 4e-3 < bf16_16 < 6e-3 and 1e-3 < fp32_16 < 1.6e-3 and bf16_16 / fp32_16 > 3
    assert bf16_16 > bf16_4 and fp32_16 <= fp32_4


def test_zero_0_keeps_deepspeeds_bf16_accumulation():
    """DeepSpeed has no fp32 gradient accumulation without ZeRO (its NotImplementedError for bf16
    params with an fp32 grad_accum_dtype at stage 0): the config leaves it out there."""
    d = deepspeed_config(TrainConfig(model="tiny", precision="bf16", zero_stage=0), 2, 2, 1, device="cuda")
    assert "data_types" not in d and "communication_data_type" not in d
    assert _ds(d).zero_optimization_stage == 0
    d1 = deepspeed_config(TrainConfig(model="tiny", precision="bf16", zero_stage=1), 2, 2, 1, device="cuda")
    assert d1["data_types"] == {"grad_accum_dtype": "fp32"}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_one_fp32_rank_or_cpu_ranks_run_zero_as_stage_1_without_gradient_hooks(device):
    """One data-parallel rank in fp32, or several CPU ones: stage 1 with neither contiguous gradients nor
    overlap_comm (each makes DeepSpeed hook every gradient), a config DeepSpeed's own parser reads as such;
    on several GPUs, under bf16 (DeepSpeed would switch optimizer: BF16_Optimizer at stage 1) and with an
    explicit VLTRAIN_GRAD_REDUCTION, ZeRO-2 as asked."""
    from vltrain.dsconfig import hookless_zero

    def ds(world, reduction=None, **kw):
        cfg = TrainConfig(**({"model": "tiny", "precision": "fp32", "zero_stage": 2} | kw))
        d = deepspeed_config(cfg, 2, 4, world, device=device, reduction=reduction)
        assert d["train_batch_size"] == 8 * world
        c = _ds(d | {"train_batch_size": 8})  # the parser checks the batch against this process's world: 1
        return c.zero_optimization_stage, c.zero_config.contiguous_gradients, c.zero_config.overlap_comm

    assert ds(1) == (1, False, False)
    assert ds(1, zero_stage=1) == (1, False, False)
    assert ds(1, "auto") == (1, False, False)
    assert ds(2) == ((2, True, True) if device == "cuda" else (1, False, False))
    assert ds(2, "coalesced") == (2, True, device == "cuda")
    assert ds(2, precision="bf16") == (2, True, device == "cuda")
    assert ds(1, precision="bf16") == (2, True, device == "cuda")
    assert ds(1, zero_stage=0)[0] == 0
    assert ds(1, "per_micro_step") == ds(1, "coalesced") == (2, True, device == "cuda")
    assert hookless_zero(TrainConfig(model="tiny", precision="fp32"), 1, device=device)
    assert not hookless_zero(TrainConfig(model="tiny", precision="fp32", zero_stage=3), 1, device=device)
