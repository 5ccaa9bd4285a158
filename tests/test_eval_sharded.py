"""Evaluation on every rank (vltrain.evaluate with an EvalShare): 2 gloo processes, each evaluating its slice
of the held-out pairs, give the metrics of one process evaluating them all; under FSDP with the engine's
own sharded model (in lockstep, never a whole model gathered), with uneven slices (21 pairs: 11 and 10,
3 and 2 batches of 5) so that one rank must keep step with the other. Every process started is stopped,
also when the test fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.conftest import spawn_ranks, trainer_shards
from tests.test_trainer_run import write_config

HOLDOUT, BATCH, CAPTIONS = 21, 5, 9  # captions: the first 9 pairs (5 on rank 0, 4 on rank 1)
METRICS = ("n", "i2t", "t2i", "cider", "caption_samples", "examples")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return trainer_shards(tmp_path_factory.mktemp("eval-sharded"), holdout=HOLDOUT)


def _setup(data: Path, precision: str = "fp32"):
    from vltrain.config import load_train_config
    from vltrain.tokenizer import Tokenizer

    cfg = load_train_config(
        write_config(data / f"cfg-{os.getpid()}.toml", data, precision=precision, parallel={"strategy": "fsdp"})
    )
    return cfg, Tokenizer.load(str(data / "tok.model")), str(data / "shards" / "eval")


def _evaluate(model, cfg, tok, shards, share=None):
    from vltrain.evaluate import ONE_PROCESS, evaluate

    r = evaluate(model, cfg, tok, shards, batch_size=BATCH, max_caption_samples=CAPTIONS, share=share or ONE_PROCESS)
    return {k: r[k] for k in METRICS}


def one_process(data: Path) -> dict:
    from vltrain.engines.common import build_model

    cfg, tok, shards = _setup(data)
    return _evaluate(build_model(cfg), cfg, tok, shards)


def _rank(rank: int, world: int, data: Path, mode: str) -> dict:
    """One rank: a plain model evaluating its slice (mode "plain" / "lockstep"), or the FSDP engine's
    ("fsdp", "fsdp-bf16": bf16 compute over fp32 shards)."""
    import torch.distributed as dist

    from vltrain.engines.common import RankLayout, build_model
    from vltrain.evaluate import EvalShare

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg, tok, shards = _setup(data, "bf16" if mode == "fsdp-bf16" else "fp32")
    if mode.startswith("fsdp"):
        from vltrain.engines.fsdp import FSDPEngine

        engine = FSDPEngine(cfg, 1, 1, RankLayout.of(rank, world), torch.device("cpu"))
        model, share = engine.eval_model(None)
        unsharded = watch_gathered_blocks(model)
        result = _evaluate(model, cfg, tok, shards, share)
        return result | {"share": (share.rank, share.size, share.lockstep), "most_blocks_gathered": max(unsharded)}
    share = EvalShare(rank, world, None, lockstep=mode == "lockstep")
    return _evaluate(build_model(cfg), cfg, tok, shards, share)


def watch_gathered_blocks(model) -> list[int]:
    """How many transformer blocks hold gathered (unsharded) parameters, counted as each block's forward
    and each cached decoder step begins (Linear pre-forward hooks): FSDP evaluation must never gather the
    whole model."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from vltrain.model.layers import Block

    blocks = [m for m in model.modules() if isinstance(m, Block) and isinstance(m, FSDPModule)]
    counts: list[int] = [0]

    def count(*_):
        counts.append(sum(not isinstance(b.mlp.fc1.weight, DTensor) for b in blocks))

    for b in blocks:
        b.mlp.fc1.register_forward_pre_hook(count)
    return counts


def two_ranks(data: Path, mode: str, world: int = 2) -> list[dict]:
    """_rank on world spawned processes (conftest.spawn_ranks)."""
    return spawn_ranks(_rank, world, data, mode)


@pytest.fixture(scope="module")
def reference(data) -> dict:
    ref = one_process(data)
    assert ref["n"] == HOLDOUT and ref["caption_samples"] == CAPTIONS
    return ref


@pytest.mark.parametrize("mode", ["plain", "lockstep"])
def test_two_ranks_give_the_one_process_metrics(data, reference, mode):
    """Each rank ranks its own queries against every gathered embedding; the hits are all-reduced and the
    captions gathered (CIDEr-D's document frequencies are corpus-wide): the same numbers on each rank as
    one process over all pairs, the same examples in the same order."""
    for result in two_ranks(data, mode):
        assert result == reference


@pytest.mark.slow
def test_fsdp_ranks_evaluate_the_sharded_model_in_lockstep(data, reference):
    """The engine's own FSDP model (fp32, the seeded init of build_model): every rank evaluates, the
    parameters stay sharded but for the block at work, and the metrics are the one process's."""
    for rank, result in enumerate(two_ranks(data, "fsdp")):
        assert result.pop("share") == (rank, 2, True)
        assert 1 <= result.pop("most_blocks_gathered") <= 2, "FSDP evaluation gathered more than a block at a time"
        assert result == reference


@pytest.mark.slow
def test_fsdp_bf16_evaluation_runs_sharded_and_every_rank_gets_the_same_scores(data):
    """Mixed precision (bf16 gathers and compute, the engine's default zero_stage 2, which keeps blocks
    gathered from forward to backward in training): evaluation still gathers one block at a time, and
    the ranks agree on every score (no one-process reference: bf16 sums in another order)."""
    first, second = two_ranks(data, "fsdp-bf16")
    for result in (first, second):
        assert 1 <= result.pop("most_blocks_gathered") <= 2
        assert result["n"] == HOLDOUT and result["caption_samples"] == CAPTIONS
    assert first.pop("share") == (0, 2, True) and second.pop("share") == (1, 2, True)
    assert first == second
