"""MFU counts the objectives that train, HFU all that runs; memory lines report reserved beside allocated."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vltrain import metrics
from vltrain.config import LossConfig, TrainConfig
from vltrain.engines.common import RankLayout
from vltrain.loop import Session
from vltrain.model_math import forward_flops_per_sample
from vltrain.presets import get_preset
from vltrain.stepstats import Interval, StepNumbers, flops_per_sample


def test_model_flops_count_only_the_weighted_objectives_and_no_recomputation():
    cfg, t = get_preset("base"), 32
    itc_only = LossConfig(mlm=0.0, caption=0.0)
    model, hardware = flops_per_sample(cfg, t, itc_only, checkpointing=True)
    assert model == pytest.approx(3 * forward_flops_per_sample(cfg, t, objectives=("itc",)))
    assert hardware == pytest.approx(4 / 3 * model)  # the whole model runs only what trains; it recomputes
    # pipeline stages run all three heads whatever their weights
    model_pp, hardware_pp = flops_per_sample(cfg, t, itc_only, checkpointing=True, pipelined=True)
    assert model_pp == model and hardware_pp == pytest.approx(4 * forward_flops_per_sample(cfg, t))
    assert model < 0.6 * hardware_pp
    # every objective trains, no checkpointing: the two agree
    assert flops_per_sample(cfg, t, LossConfig(), checkpointing=False)[0] == pytest.approx(
        flops_per_sample(cfg, t, LossConfig(), checkpointing=False)[1]
    )
    mim = LossConfig(mim=1.0, mim_mask_ratio=0.75)
    assert flops_per_sample(cfg, t, mim, False)[0] == pytest.approx(
        3 * forward_flops_per_sample(cfg, t, mim_mask_ratio=0.75)
    )


def _session(loss: LossConfig, checkpointing: bool, pp: int = 1) -> Session:
    s = object.__new__(Session)
    s.cfg = dataclasses.replace(TrainConfig(), activation_checkpointing=checkpointing)
    s.mcfg, s.stage_loss, s.flops_per_sample = get_preset("tiny"), loss, {}
    s.layout = RankLayout.of(0, 2 * pp, pp=pp)
    return s


def test_the_loop_counts_model_and_hardware_flops_per_micro_batch():
    batches = [{"attention_mask": torch.ones(4, 16, dtype=torch.bool)}, {"attention_mask": torch.ones(2, 24)}]
    tiny = get_preset("tiny")
    want = 4 * forward_flops_per_sample(tiny, 16, objectives=("itc", "mlm"))
    want += 2 * forward_flops_per_sample(tiny, 24, objectives=("itc", "mlm"))
    every = 4 * forward_flops_per_sample(tiny, 16) + 2 * forward_flops_per_sample(tiny, 24)
    tokens, model, hardware = _session(LossConfig(caption=0.0), True)._count(batches)
    assert tokens == 4 * 16 + 2 * 24
    assert model == pytest.approx(3 * want) and hardware == pytest.approx(4 * want)
    _, model_pp, hardware_pp = _session(LossConfig(caption=0.0), True, pp=2)._count(batches)
    assert model_pp == pytest.approx(3 * want) and hardware_pp == pytest.approx(4 * every)


def test_hardware_flops_travel_through_the_step_sums():
    step = StepNumbers(losses=(1.0,) * 5, micro=2.0, flops=3.0, hw_flops=5.0, seconds=1.0)
    back = StepNumbers.from_tensor(step.to_tensor())
    assert back == step
    interval = Interval()
    interval.add(back)
    interval.add(back)
    assert (interval.flops, interval.hw_flops) == (6.0, 10.0)


def test_memory_reports_reserved_beside_allocated(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 12 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 14 * gib)
    stats = metrics.memory_stats(torch.device("cuda", 0))
    assert stats == {"mem_gib": 10.0, "mem_reserved_gib": 12.0, "mem_peak_reserved_gib": 14.0}
    cpu = metrics.memory_stats(torch.device("cpu"))
    assert cpu["mem_gib"] > 0 and cpu["mem_reserved_gib"] is None and cpu["mem_peak_reserved_gib"] is None


def test_the_printed_line_shows_hfu_and_reserved_memory():
    rec = {
        "step": 3, "loss": 1.0, "itc": 0.5, "mlm": 0.3, "caption": 0.2, "mim": 0.0, "lr": 1e-3, "grad_norm": 1.0,
        "samples_per_s": 100.0, "step_time_s": 0.5, "data_wait_s": 0.01, "mfu": 0.31, "hfu": 0.42,
        "mem_gib": 10.0, "mem_reserved_gib": 12.0, "mem_peak_reserved_gib": 14.0,
    }  # fmt: skip
    line = metrics.human_line(rec, 10)
    assert "mfu 31.0% hfu 42.0%" in line and "10.00 GiB (reserved 12.00, peak 14.00)" in line
    cpu = metrics.human_line(rec | {"mfu": None, "hfu": None, "mem_reserved_gib": None}, 10)
    assert "hfu" not in cpu and "reserved" not in cpu
