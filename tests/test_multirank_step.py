"""bench/bench_step.py --ranks N compares vltrain's step on gloo ranks with a bare loop: the two must
compute the same thing, or the ratio means nothing. On 2 ranks, accumulation 2, the bare DDP loop
(no_sync) and DeepSpeed ZeRO-2's session, and the bare FSDP2 loop (gradient sync skipped) and the FSDP
engine's session, give the same losses step after step (fp32 rounding apart): the same weights, batches,
gradients, clipping, AdamW and schedule. It also pins that the trainer's speed changes kept its trajectory."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.dist_harness import run_ranks

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    import bench_step
    import step_ranks

    cfg, tmp = bench_step.setup(str(BENCH.parent / "configs" / "tiny.toml"), ["global_batch=8"])
    try:
        yield step_ranks, cfg, tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the bench's own temp directory (shards, run dirs)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed", "fsdp"])
def test_bare_loop_and_vltrain_step_train_alike_on_two_ranks(bench, strategy):
    import dataclasses

    step_ranks, cfg, tmp = bench
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, strategy=strategy))
    cfg = step_ranks.rank_config(cfg, 2, 2)
    ranks = run_ranks(step_ranks.trajectory_worker, 2, cfg, str(tmp), 3)
    for rank, got in enumerate(ranks):
        bare, vl = got["bare"], got["vltrain"]
        assert len(bare) == len(vl) == 3, got
        assert len(set(bare)) == 3, f"rank {rank}: the loss did not move: {bare}"  # the steps train
        assert vl == pytest.approx(bare, rel=1e-5, abs=1e-6), f"rank {rank} ({strategy})"
    assert ranks[0]["bare"] != ranks[1]["bare"]  # each rank has its own share of the batch
