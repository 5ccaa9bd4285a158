"""How a pipeline splits VLModel's blocks over its stages: by cost, not by count (pure, torch-free).

The trainer (vltrain.parallel.pipeline builds its stages from `stage_blocks`) and clusterctl's planner
(clusterctl.planning.stages sizes each pipeline rank from `stage_ranges` and `blocks`) call the same
function, so what `plan` sizes is what runs (tests/test_dp_mixed_parallel.py checks it for every seed).

Blocks are the towers' transformer blocks in forward order (vision, text, fusion, decoder:
layout.PIPELINE_TOWERS). A stage's cost, per tensor-parallel rank:
  * work: the forward matmul FLOPs one tp rank computes for one sample. A Block's are divided by tp
    (vltrain.parallel.tensor_parallel shards q, k, v, out, fc1, fc2); the text encoder's unimodal blocks
    run twice (clean and masked text). The first stage also runs the vision stem, the last the two
    contrastive projections and the MLM and LM heads (logits over the vocabulary at every text
    position), replicated: every tp rank computes them whole, so under tp they weigh tp times more
    against a block. Backward is ~2x forward for every matmul, so forward FLOPs rank stages as a step does.
  * memory: what the rank holds whatever the data-parallel degree: its 16-bit weights, gathered, and
    fp32 unsharded gradients (6 bytes per parameter of one tp rank: under pp > 1 FSDP2 keeps both for
    the whole step, clusterctl.planning.fsdp), plus one sample's activations. The first stage holds the
    vision stem and the token embedding, the last the norms, projections and the tied head.
The split: contiguous ranges of at least one block, minimising the slowest stage's work exactly (dynamic
programming over prefix sums: the pipeline runs at the pace of its slowest stage); among the splits whose
slowest stage is within WORK_SLACK of that, the one whose most loaded stage holds the least memory.
Block counts were the split before: vl-22b (seed 003's model) at tp 4 x pp 2 ran at 79% balance (mean
over slowest stage work: 63% / 37%), by cost at 99% (tests/test_dp_mixed_parallel.py prints both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from vltrain.model_config import ModelConfig
from vltrain.model_math import (  # the per-block formulas, shared so that they are written once
    _attn_flops,
    _cross_layer_bytes,
    _linear,
    _mlp_flops,
    _norm,
    _self_layer_bytes,
    mlp_hidden,
    param_count,
)
from vltrain.parallel.layout import pipeline_blocks, tower_blocks

WORK_SLACK = 0.01  # FLOP estimates are not finer than 1%: within it, memory decides
STATE_BYTES = 2 + 4  # per parameter of a pipeline rank: 16-bit weights gathered + fp32 unsharded gradients


@dataclass(frozen=True)
class BlockShape:
    """One pipeline block: its parameters split by tensor parallel, its per-sample activations split
    likewise (bytes at 2 per element), its forward FLOPs and how many times a forward runs it."""

    kind: str  # vision | text | fusion | decoder
    sharded: int  # parameters divided over tp
    replicated: int  # parameters every tp rank holds whole
    act_replicated: float
    act_sharded: float
    act_input: float  # the block's input (s x w elements), all that activation checkpointing keeps of it
    flops: float
    runs: int = 1  # the text encoder's unimodal blocks run twice (clean text for ITC, masked for MLM)

    def params(self, tp: int) -> float:
        return self.sharded / tp + self.replicated


def _self_params(cfg: ModelConfig, w: int) -> tuple[int, int]:
    h = mlp_hidden(cfg, w)
    sharded = 3 * _linear(w, w) + w * w + _linear(w, h) + h * w  # q, k, v; out's weight; fc1; fc2's weight
    return sharded, 2 * _norm(cfg, w) + 2 * w  # norm1, norm2; the biases of out and fc2


def _cross_params(cfg: ModelConfig, w: int, kv_w: int) -> tuple[int, int]:
    s, r = _self_params(cfg, w)
    return s + _linear(w, w) + 2 * _linear(kv_w, w) + w * w, r + _norm(cfg, w) + w  # cross q, k, v, out


def blocks(cfg: ModelConfig) -> list[BlockShape]:
    """The model's pipeline blocks in stage order."""
    t, sv = cfg.max_text_len, cfg.num_patches + 1
    wv, wt = cfg.vision_width, cfg.text_width

    def self_block(kind: str, s: int, w: int, heads: int, runs: int) -> BlockShape:
        work = _self_layer_bytes(cfg, s, w, heads)
        rep = 10 * s * w
        flops = _attn_flops(s, s, w, w, True) + _mlp_flops(cfg, s, w)
        return BlockShape(kind, *_self_params(cfg, w), rep, work - rep, s * w, flops, runs)

    def cross_block(kind: str) -> BlockShape:
        work = _cross_layer_bytes(cfg, t, sv, wt, cfg.text_heads)
        rep = 10 * t * wt + 5 * t * wt
        flops = _attn_flops(t, t, wt, wt, True) + _mlp_flops(cfg, t, wt) + _attn_flops(t, sv, wt, wv, False)
        return BlockShape(kind, *_cross_params(cfg, wt, wv), rep, work - rep, t * wt, flops)

    shape = {
        "vision": self_block("vision", sv, wv, cfg.vision_heads, 1),
        "text": self_block("text", t, wt, cfg.text_heads, 2),
        "fusion": cross_block("fusion"),
        "decoder": cross_block("decoder"),
    }
    return [shape[tower] for tower, n in tower_blocks(cfg).items() for _ in range(n)]


def first_stage_params(cfg: ModelConfig) -> int:
    """The vision stem and the token (and learned position) embeddings."""
    learned = cfg.pos_embedding == "learned"
    wv, wt = cfg.vision_width, cfg.text_width
    stem = _linear(3 * cfg.patch_size**2, wv) + wv + ((cfg.num_patches + 1) * wv if learned else 0)
    return stem + cfg.vocab_size * wt + (cfg.max_text_len * wt if learned else 0)


def last_stage_params(cfg: ModelConfig, pp: int) -> int:
    """Norms, projections and the temperature; with pp > 1 the tied token embedding again (the head)."""
    rest = param_count(cfg) - first_stage_params(cfg) - sum(b.sharded + b.replicated for b in blocks(cfg))
    return rest + (cfg.vocab_size * cfg.text_width if pp > 1 else 0)


def stem_flops(cfg: ModelConfig) -> float:
    """The patch embedding's matmul FLOPs per sample (first stage)."""
    return float(2 * cfg.num_patches * 3 * cfg.patch_size**2 * cfg.vision_width)


def heads_flops(cfg: ModelConfig) -> float:
    """The contrastive projections and the MLM and LM heads per sample (last stage)."""
    t = cfg.max_text_len
    return float(2 * (cfg.vision_width + cfg.text_width) * cfg.embed_dim + 4 * t * cfg.text_width * cfg.vocab_size)


def tail_activation_bytes(cfg: ModelConfig, bytes_per_el: int = 2) -> float:
    """The last stage's own activations per sample: the image features, the MLM and LM logits (+ fp32)."""
    t, sv = cfg.max_text_len, cfg.num_patches + 1
    return float(sv * cfg.vision_width * bytes_per_el + 2 * t * cfg.vocab_size * (bytes_per_el + 4))


def block_work(b: BlockShape, tp: int) -> float:
    """Forward FLOPs one tp rank computes for one sample through block `b` (all its runs)."""
    return b.flops * b.runs / tp


def block_memory(b: BlockShape, tp: int) -> float:
    """Bytes one tp rank holds for block `b` whatever dp is: weights, unsharded gradients, one sample's
    activations (module doc)."""
    return STATE_BYTES * b.params(tp) + (b.act_replicated + b.act_sharded / tp) * b.runs


@dataclass(frozen=True)
class Costs:
    """Per-block (work, memory) in pipeline order, and what the first and the last stage add."""

    work: tuple[float, ...]
    memory: tuple[float, ...]
    first: tuple[float, float]
    last: tuple[float, float]


def costs(cfg: ModelConfig, tp: int = 1, stages: int = 2) -> Costs:
    """The costs `split_by_cost` balances for `cfg` on `tp` ranks (module doc). `stages` > 1 puts the
    tied head's weights on the last stage as well."""
    bl = blocks(cfg)
    first = (stem_flops(cfg), STATE_BYTES * first_stage_params(cfg))
    last = (heads_flops(cfg), STATE_BYTES * last_stage_params(cfg, stages) + tail_activation_bytes(cfg))
    return Costs(tuple(block_work(b, tp) for b in bl), tuple(block_memory(b, tp) for b in bl), first, last)


def _min_max(c: Costs, stages: int, cap: float | None) -> tuple[float, list[int]]:
    """Contiguous split of the blocks into `stages`: without `cap` the least slowest-stage work, with it
    the least most-loaded-stage memory among splits whose every stage works <= cap; (that value, the
    start index of each stage), or (inf, []) when nothing fits."""
    n, inf = len(c.work), float("inf")
    pw, pm = [0.0], [0.0]
    for w, m in zip(c.work, c.memory, strict=True):
        pw.append(pw[-1] + w)
        pm.append(pm[-1] + m)

    def stage(j: int, i: int, s: int) -> tuple[float, float]:
        w, m = pw[i] - pw[j], pm[i] - pm[j]
        if s == 0:
            w, m = w + c.first[0], m + c.first[1]
        if s == stages - 1:
            w, m = w + c.last[0], m + c.last[1]
        return w, m

    # best[s][i]: the best value of the first i blocks in s + 1 stages; start[s][i] its last stage's start
    best = [[inf] * (n + 1) for _ in range(stages)]
    start = [[0] * (n + 1) for _ in range(stages)]
    for s in range(stages):
        for i in range(s + 1, n - (stages - 1 - s) + 1):
            for j in [0] if s == 0 else range(s, i):  # the stage holds blocks j .. i - 1
                before = 0.0 if s == 0 else best[s - 1][j]
                w, m = stage(j, i, s)
                if cap is not None and w > cap:
                    continue
                v = max(before, w if cap is None else m)
                if v < best[s][i]:
                    best[s][i], start[s][i] = v, j
    if best[stages - 1][n] == inf:
        return inf, []
    starts, i = [], n
    for s in range(stages - 1, -1, -1):
        starts.append(start[s][i])
        i = start[s][i]
    return best[stages - 1][n], starts[::-1]


def split_by_cost(c: Costs, stages: int) -> tuple[range, ...]:
    """Contiguous ranges of block indices, one per (virtual) stage, balanced by work then memory (module doc)."""
    n = len(c.work)
    if not 1 <= stages <= n:
        raise ValueError(f"{stages} stages over {n} blocks")
    slowest, _ = _min_max(c, stages, None)
    _, starts = _min_max(c, stages, slowest * (1 + WORK_SLACK))
    return tuple(range(a, b) for a, b in zip(starts, [*starts[1:], n], strict=True))


@lru_cache(maxsize=256)
def stage_ranges(cfg: ModelConfig, stages: int, tp: int = 1) -> tuple[range, ...]:
    """The split of `cfg`'s pipeline blocks over `stages` (virtual) stages of `tp` ranks each: the one
    the trainer runs and the planner sizes. Raises ValueError for more stages than blocks."""
    if not 1 <= stages <= pipeline_blocks(cfg):
        raise ValueError(f"{stages} stages over {pipeline_blocks(cfg)} blocks")
    return split_by_cost(costs(cfg, tp, stages), stages)


def stage_blocks(cfg: ModelConfig, stages: int, tp: int = 1) -> list[list[tuple[str, int]]]:
    """The (tower, block index within the tower) pairs of each (virtual) stage: `stage_ranges`."""
    flat = [(tower, i) for tower, n in tower_blocks(cfg).items() for i in range(n)]
    return [[flat[i] for i in r] for r in stage_ranges(cfg, stages, tp)]


def stage_work(cfg: ModelConfig, ranges: Sequence[range], tp: int = 1) -> list[float]:
    """Each stage's forward work per sample on one tp rank (FLOPs), ends included."""
    c = costs(cfg, tp, len(ranges))
    out = [sum(c.work[i] for i in r) for r in ranges]
    out[0] += c.first[0]
    out[-1] += c.last[0]
    return out


def balance(work: list[float]) -> float:
    """Mean over max of the stages' work: 1 when every stage is as slow as the slowest."""
    return sum(work) / len(work) / max(work)
