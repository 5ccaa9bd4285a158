"""The image-text contrastive (ITC) loss's pool: how many captions each image is scored against (pure).

vltrain.model.losses.itc_loss gathers the embeddings of one micro batch from the data-parallel ranks
(the engine's dp group; tensor- and pipeline-parallel peers hold the same samples and add none), so
the in-batch candidates of an image are micro batch x dp, whatever the global batch. Accumulation
does not add to it: each micro step's loss sees only its own micro batch. So a global batch of 2048 at
accumulation 16 on dp 32 scores each image against 128 captions, not 2048; at micro batch 1 and dp 1
against its own caption only, and the loss is identically 0 (no gradient).

Why warn under MIN_POOL (16): InfoNCE with K candidates is at most log K nats (van den Oord et al.
2018, the bound on what it can tell apart) and a random guess is right 1/K of the time; at 16 the
ceiling is 2.8 nats and chance 6%, and under it the objective saturates on coarse features (at 2 its
ceiling is log 2 = 0.69). CLIP trained with 32,768 candidates, ALIGN 16,384; the seed recipes' pools
are 128 to 2048 (docs/trainer.md#the-contrastive-pool), the reduced twins' 4 to 16.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vltrain.batching import BatchSplit

MIN_POOL = 16


def contrastive_pool(split: BatchSplit) -> int:
    """Candidates per image in one micro step's ITC loss: micro batch x data-parallel ranks."""
    return split.micro_batch * split.data_parallel


def pool_split_within(split: BatchSplit, want: int = MIN_POOL) -> int | None:
    """The smallest micro batch (a divisor of the samples per rank) whose pool reaches `want`; None when
    even no accumulation (micro batch = samples per rank, pool = global batch) stays under it."""
    per_rank = split.per_rank
    need = math.ceil(want / split.data_parallel)
    return next((m for m in range(need, per_rank + 1) if per_rank % m == 0), None)


def pool_warning(objectives: Iterable[str], split: BatchSplit) -> str | None:
    """One line when the run trains ITC with a pool under MIN_POOL: the figure, why, and what to change."""
    if "itc" not in objectives:
        return None
    pool = contrastive_pool(split)
    if pool >= MIN_POOL:
        return None
    head = (
        f"contrastive: each image's ITC loss scores {pool} caption{'s' if pool != 1 else ''} (micro batch "
        f"{split.micro_batch} x data parallel {split.data_parallel}; accumulation {split.accumulation} adds none), "
        f"under {MIN_POOL}: "
    )
    why = "the loss is identically 0" if pool == 1 else f"it tells apart at most log {pool} = {math.log(pool):.2f} nats"
    micro = pool_split_within(split)
    if micro is None:
        change = f"a global batch of at least {MIN_POOL} at accumulation 1"
    else:
        change = f"--micro-batch {micro} --accum {split.per_rank // micro} if it fits"
    return f"{head}{why}; allowed: {change} (docs/trainer.md#the-contrastive-pool)"
