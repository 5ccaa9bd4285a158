"""What one GPU holds of the model under tensor x pipeline parallelism: parameters, activations and
forward FLOPs per pipeline rank, as the trainer splits the model (pure).

Tensor parallel (vltrain.parallel.tensor_parallel): in every Block, q, k, v and fc1 are column-parallel
(weight and bias sharded over tp), out and fc2 row-parallel (weight sharded, bias replicated); the
cross-attention's q, k, v, out likewise. Embeddings, norms, projections and the tied head stay
replicated. Pipeline parallel: the blocks, in the order vision, text, fusion, decoder, go in contiguous
ranges balanced by cost to the (virtual) stages (vltrain.parallel.stage_split.stage_ranges, the split
the trainer runs; the per-block costs are defined there too); the first stage also
holds the vision stem (patch embedding, cls token, positions) and the token embedding, the last every
other module (norms, projections, the temperature) and the token embedding again as the tied head.
Interleaved 1F1B gives rank r the virtual stages r and r + pp.

Activations: vltrain.model_math's per-layer bytes (Korthikanti et al. 2022, eq. 2), split into what
tensor parallel shards (q, k, v, the scores, the context, the MLP's hidden units) and what it does not:
the trainer runs no sequence parallelism, so each block's input, its norms' outputs and the dropout
masks after `out` and fc2 stay whole on every rank: 10 sbh of the 34 sbh per layer (Korthikanti's
10 + 24/t), 5 sbh of a cross-attention's 9 sbh + 4 s_kv h. The image features and the logits (the head
is replicated) sit on the last stage. At tp = pp = 1 the sums equal model_math's totals
(tests/test_layout.py), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from vltrain.model_config import ModelConfig
from vltrain.parallel.layout import VIRTUAL_STAGES
from vltrain.parallel.stage_split import (  # the trainer's split and its per-block costs
    BlockShape,
    blocks,
    first_stage_params,
    heads_flops,
    last_stage_params,
    stage_ranges,
    stem_flops,
    tail_activation_bytes,
)

__all__ = ["BlockShape", "RankShare", "blocks", "boundary_elements", "first_stage_params", "in_flight", "rank_shares"]


@dataclass(frozen=True)
class RankShare:
    """What one pipeline rank (one tp rank of it) holds and computes, per sample where it says so."""

    rank: int
    blocks: tuple[int, ...]  # indices into `blocks(cfg)`
    params: float  # parameters on one tp rank
    largest_unit: float  # the largest FSDP unit of it (a block, or the rest: embeddings, norms, heads)
    act_per_sample: float  # bytes kept for backward by one sample's forward through this rank
    # forward matmul FLOPs of one sample through this rank as its tp ranks spend them: the blocks' once,
    # the replicated stem and heads on each tp rank (tp x one tp rank's work; the model's FLOPs at tp 1)
    flops_per_sample: float


def rank_shares(
    cfg: ModelConfig, tp: int, pp: int, schedule: str = "1f1b", checkpointing: bool = False, bytes_per_el: int = 2
) -> list[RankShare]:
    """Per pipeline rank: parameters per tp rank, activations and FLOPs per sample (see the module doc)."""
    bl = blocks(cfg)
    chunks = stage_ranges(cfg, pp * VIRTUAL_STAGES[schedule], tp)
    first, last = first_stage_params(cfg), last_stage_params(cfg, pp)
    scale = bytes_per_el / 2  # model_math's constants are bytes at 2 bytes per element
    tail_act = tail_activation_bytes(cfg, bytes_per_el)
    out = []
    for r in range(pp):
        mine = [c for v, c in enumerate(chunks) if v % pp == r]
        idx = tuple(i for c in mine for i in c)
        own = [bl[i] for i in idx]
        has_first, has_last = r == 0, r == pp - 1
        extra = (first if has_first else 0) + (last if has_last else 0)
        params = sum(b.params(tp) for b in own) + extra
        unit = max([b.params(tp) for b in own] + [extra])
        layers = [b for b in own for _ in range(b.runs)]
        work = [b.act_replicated + b.act_sharded / tp for b in layers]
        if checkpointing:
            act = sum(b.act_input for b in layers) * bytes_per_el + max(work, default=0.0) * scale
        else:
            act = sum(work) * scale
        act += tail_act if has_last else 0.0
        ends = (stem_flops(cfg) if has_first else 0.0) + (heads_flops(cfg) if has_last else 0.0)
        flops = sum(b.flops * b.runs for b in own) + tp * ends  # replicated ends: every tp rank runs them
        out.append(RankShare(r, idx, params, unit, float(act), float(flops)))
    return out


def in_flight(rank: int, pp: int, microbatches: int, schedule: str) -> float:
    """Microbatches whose activations rank `rank` holds at its peak, in units of its whole share.

    1F1B: pp - rank forwards run before the first backward (torch's Schedule1F1B warm-up), at most all;
    GPipe: every microbatch; Interleaved 1F1B: torch's `_get_warmup_ops` forwards of one virtual stage
    (half the rank's share) each, plus the one in progress. One microbatch without a pipeline."""
    n = microbatches
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(n)
    if schedule == "1f1b":
        return float(min(pp - rank, n))
    v = VIRTUAL_STAGES[schedule]
    per_round = n // max(1, n // pp)
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), n * v)
    return min(warmup + 1, n * v) / v


def boundary_elements(cfg: ModelConfig) -> int:
    """Elements per sample a stage sends to the next (and gradients back): the image features and up to
    three text streams (clean text, masked text, the decoder's input). An upper bound: a boundary inside
    the vision tower carries less."""
    return (cfg.num_patches + 1) * cfg.vision_width + 3 * cfg.max_text_len * cfg.text_width
