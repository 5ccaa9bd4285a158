"""precision = "fp16" with dynamic loss scaling under both strategies.

DeepSpeed runs fp16 only where its accelerator says it can: CUDA, or a CPU with AVX512-FP16 (oneDNN).
On other CPUs (this CI box) `deepspeed.initialize` raises "Type fp16 is not supported on your device"
from deep inside; the trainer refuses first with one line. The generated config is checked by
DeepSpeed's own parser, and, with DeepSpeed's capability check patched, trained for real on the CPU
(torch runs fp16 matmuls there): DeepSpeed's loss scaler skips the settling steps, which the loop counts.
Under FSDP, torch's ShardedGradScaler: trained for real, and an overflow on one rank only skips the
step on every rank.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, deadline, trainer_shards
from tests.test_trainer_run import ENV, _free_port, jsonl, torchrun, write_config


def _fp16_cfg(**kw):
    from vltrain.config import ParallelConfig, TrainConfig

    strategy = kw.pop("strategy", "deepspeed")
    return TrainConfig(precision="fp16", parallel=ParallelConfig(strategy=strategy), **kw)


def test_deepspeed_reads_the_fp16_config_as_dynamic_loss_scaling_from_2_16():
    from deepspeed.runtime.config import DeepSpeedConfig

    from vltrain.dsconfig import deepspeed_config

    cfg = _fp16_cfg(global_batch=16, zero_stage=2)
    ds = deepspeed_config(cfg, 4, 2, 2)
    ds.pop("vltrain")
    ds["train_batch_size"] = 8  # DeepSpeedConfig checks the batch against its own world (1 process here)
    fp16 = DeepSpeedConfig(ds).float16_config
    assert fp16.enabled and fp16.loss_scale == 0  # 0 = dynamic
    assert (fp16.initial_scale_power, fp16.loss_scale_window, fp16.min_loss_scale) == (16, 1000, 1)
    from vltrain.engines.fsdp import FP16_GROWTH_INTERVAL, FP16_INIT_SCALE

    assert 2.0**fp16.initial_scale_power == FP16_INIT_SCALE and fp16.loss_scale_window == FP16_GROWTH_INTERVAL


def test_deepspeed_fp16_on_a_cpu_without_fp16_is_one_line():
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from vltrain.common.errors import UserError
    from vltrain.engines.deepspeed import check_deepspeed_fp16

    if CPU_Accelerator().is_fp16_supported():
        pytest.skip("this CPU runs DeepSpeed fp16 (AVX512-FP16)")
    with pytest.raises(UserError) as e:
        check_deepspeed_fp16(_fp16_cfg(), "cpu")
    line = str(e.value)
    assert "\n" not in line and line.startswith("precision: fp16 under parallel.strategy 'deepspeed' needs CUDA")
    assert "allowed: bf16 or fp32, or parallel.strategy = 'fsdp'" in line
    check_deepspeed_fp16(_fp16_cfg(), "cuda")  # CUDA runs it
    check_deepspeed_fp16(_fp16_cfg(strategy="fsdp", zero_stage=2), "cpu")  # torch's scaler, not DeepSpeed's


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return trainer_shards(tmp_path_factory.mktemp("fp16-data"), holdout=0)


def assert_settles_then_learns(run: Path) -> None:
    """The loss scaler skips the first steps (2^16 overflows the tiny model's gradients) and the loop
    counts them (the skip line, no divergence); from the first applied step on, the MLM and caption
    losses (the smooth terms: ITC jumps with the first updates) go down."""
    lines = jsonl(run / "metrics.jsonl")
    assert all(all(m[k] == m[k] and abs(m[k]) < 1e4 for k in ("loss", "itc", "mlm", "caption")) for m in lines)
    applied = [m for m in lines if m["grad_norm"] is not None and m["grad_norm"] < float("inf")]
    first = lines.index(applied[0])
    assert 1 <= first < 17, [m["grad_norm"] for m in lines]  # skipped while the scale settles, fewer than tolerated
    assert all(lines[i]["lr"] == lines[0]["lr"] for i in range(first + 1))  # skipped steps do not move the schedule
    last = lines[-1]
    assert last["mlm"] < applied[0]["mlm"] - 0.3 and last["caption"] < applied[0]["caption"] - 0.3


@pytest.mark.slow
def test_fsdp_fp16_trains_on_two_ranks(data, tmp_path):
    cfg = write_config(tmp_path / "cfg.toml", data, precision="fp16", steps=12, parallel={"strategy": "fsdp"})
    r = torchrun(2, "train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "vltrain: the optimizer skipped 1 of the last 1 steps (gradient not finite)" in r.stdout
    assert_settles_then_learns(tmp_path / "run")


DEEPSPEED_FP16_ON_CPU = """
import sys
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
CPU_Accelerator.is_fp16_supported = lambda self: True  # this CPU lacks AVX512-FP16; torch's fp16 runs anyway
sys.argv = ["vltrain", *sys.argv[1:]]
from vltrain.cli import main
main()
"""


@pytest.mark.slow
def test_deepspeed_fp16_dynamic_loss_scaling_trains_where_deepspeed_allows_fp16(data, tmp_path):
    cfg = write_config(tmp_path / "cfg.toml", data, precision="fp16", steps=12)
    script = tmp_path / "ds_fp16.py"
    script.write_text(DEEPSPEED_FP16_ON_CPU)
    r = subprocess.run(
        [sys.executable, str(script), "train", "--config", str(cfg), "--run-dir", str(tmp_path / "run")],
        cwd=REPO,
        env=os.environ | ENV,
        capture_output=True,
        text=True,
        timeout=deadline(300),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert_settles_then_learns(tmp_path / "run")


OVERFLOW_ON_ONE_RANK = """
import dataclasses, json, sys, torch
from vltrain.config import ParallelConfig, TrainConfig
from vltrain.distenv import current
from vltrain.engines.common import RankLayout
from vltrain.engines.fsdp import FSDPEngine
from vltrain.presets import resolve_model

env = current()
FSDPEngine.init_process_group(env, "cpu")
cfg = TrainConfig(model="tiny", precision="fp16", global_batch=8, steps=40, parallel=ParallelConfig(strategy="fsdp"))
eng = FSDPEngine(cfg, 4, 1, RankLayout.of(env.rank, env.world_size), torch.device("cpu"))
m = resolve_model("tiny")
gen = torch.Generator().manual_seed(env.rank)

def batch():
    ids = torch.randint(5, m.vocab_size, (4, 12), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    images = torch.randn(4, 3, m.image_size, m.image_size, generator=gen)
    return {"images": images, "input_ids": ids, "attention_mask": torch.ones(4, 12, dtype=torch.bool)}

real_step, inject = eng._optimizer_step, [False]
def optimizer_step():
    if inject[0] and env.rank == 1:  # one element of rank 1's gradient shard only
        p = next(p for p in eng.params if p.grad is not None and p.grad.to_local().numel())
        p.grad.to_local().view(-1)[0] = float("inf")
    real_step()
eng._optimizer_step = optimizer_step
keys = ("loss", "itc", "mlm", "caption")
settle = 0
while True:  # the scale settles from 2^16: steps are skipped until one applies
    before = eng.skipped_steps
    eng.train_step([batch()], keys)
    if eng.skipped_steps == before:
        break
    settle += 1
local = lambda: [p.detach().to_local().clone() for p in eng.params]
w0, scale0, sched0, skipped0 = local(), eng.loss_scale, eng.scheduler.last_epoch, eng.skipped_steps
inject[0] = True
eng.train_step([batch()], keys)
inject[0] = False
w1 = local()
out = {
    "settle": settle,
    "skipped": eng.skipped_steps - skipped0,
    "scale": [scale0, eng.loss_scale],
    "unchanged": all(torch.equal(a, b) for a, b in zip(w0, w1)),
    "schedule_moved": eng.scheduler.last_epoch - sched0,
    "grad_norm": eng.get_global_grad_norm(),
}
eng.train_step([batch()], keys)
out["then_applied"] = eng.skipped_steps - skipped0 == 1 and not all(torch.equal(a, b) for a, b in zip(w1, local()))
# one write per line: under PYTHONUNBUFFERED print() writes the text and its newline apart, and the
# two ranks share torchrun's stdout (their lines ran together once in CI)
sys.stdout.write("RESULT " + json.dumps(out) + "\\n")
sys.stdout.flush()
"""


@pytest.mark.slow
def test_an_overflow_on_one_rank_skips_the_fsdp_step_on_both(tmp_path):
    script = tmp_path / "overflow.py"
    script.write_text(OVERFLOW_ON_ONE_RANK)
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script)]
    r = subprocess.run(cmd, cwd=REPO, env=os.environ | ENV, capture_output=True, text=True, timeout=deadline(300))
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(x.split("RESULT ", 1)[1]) for x in r.stdout.splitlines() if "RESULT " in x]
    assert len(results) == 2 and results[0]["settle"] == results[1]["settle"]
    for res in results:  # rank 0's gradients were finite: it skips because rank 1 overflowed
        assert res["skipped"] == 1 and res["unchanged"] and res["schedule_moved"] == 0, res
        assert res["scale"][1] == res["scale"][0] / 2 and not math.isfinite(res["grad_norm"]), res
        assert res["then_applied"], res
