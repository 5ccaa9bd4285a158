"""Every process group under the run's configured collective time-out (issue 23, point 7): the groups
FSDP's device mesh makes and DeepSpeed's data-parallel groups, not only the default group, get the
start-up time-out (VLTRAIN_DIST_TIMEOUT_S), and after the first step the step time-out
(VLTRAIN_STEP_DIST_TIMEOUT_S; vltrain.engines.process_group.shorten_timeout). Torch's own default for
a group made without one is 10 min (NCCL) or 30 min (gloo)."""

from __future__ import annotations

import os

import pytest

from tests.dist_harness import build_engine, run_ranks
from vltrain.config import parse_train_config
from vltrain.rundir import DIST_TIMEOUT_S, STEP_DIST_TIMEOUT_S


def _timeouts() -> list[float]:
    """The time-out of every process group this rank belongs to, in seconds (from its gloo backend)."""
    import torch
    from torch.distributed import distributed_c10d as c10d

    return [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in list(c10d._world.pg_map)]


def _build(rank: int, world: int, strategy: str, tp: int) -> dict:
    from vltrain.engines.process_group import shorten_timeout

    os.environ[DIST_TIMEOUT_S], os.environ[STEP_DIST_TIMEOUT_S] = "123", "45"
    data = {"model": "tiny", "global_batch": 4, "accumulation": 1, "steps": 2, "precision": "fp32"}
    cfg = parse_train_config(data | {"parallel": {"strategy": strategy, "tp": tp}}, "test.toml")
    build_engine(rank, world, cfg, 4 // (world // tp), 1)
    at_start = _timeouts()
    shorten_timeout()
    return {"start": at_start, "step": _timeouts()}


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "tp"), [("fsdp", 1), ("fsdp", 2), ("deepspeed", 1)])
def test_every_process_group_gets_the_configured_timeout(strategy, tp):
    for r in run_ranks(_build, 2, strategy, tp):
        assert len(r["start"]) > 1, r  # the engine made groups beyond the default one (mesh dims, DeepSpeed's)
        assert set(r["start"]) == {123.0}, r
        assert set(r["step"]) == {45.0}, r
