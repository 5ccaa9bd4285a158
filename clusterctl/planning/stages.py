"""What one GPU holds of the model under tensor x pipeline parallelism: parameters, activations and
forward FLOPs per pipeline rank, as the trainer splits the model (pure).

Tensor parallel (vltrain.parallel.tensor_parallel): in every Block, q, k, v and fc1 are column-parallel
(weight and bias sharded over tp), out and fc2 row-parallel (weight sharded, bias replicated); the
cross-attention's q, k, v, out likewise. Embeddings, norms, projections and the tied head stay
replicated. Pipeline parallel: the blocks, in the order vision, text, fusion, decoder, go in contiguous
balanced ranges to the (virtual) stages (vltrain.parallel.layout.stage_ranges); the first stage also
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
from vltrain.parallel.layout import VIRTUAL_STAGES, pipeline_blocks, stage_ranges, tower_blocks


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
    out = []

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
    for tower, n in tower_blocks(cfg).items():  # the trainer's pipeline order (vltrain.parallel.layout)
        out += [shape[tower]] * n
    return out


def first_stage_params(cfg: ModelConfig) -> int:
    """The vision stem and the token (and learned position) embeddings."""
    learned = cfg.pos_embedding == "learned"
    wv, wt = cfg.vision_width, cfg.text_width
    stem = _linear(3 * cfg.patch_size**2, wv) + wv + ((cfg.num_patches + 1) * wv if learned else 0)
    return stem + cfg.vocab_size * wt + (cfg.max_text_len * wt if learned else 0)


@dataclass(frozen=True)
class RankShare:
    """What one pipeline rank (one tp rank of it) holds and computes, per sample where it says so."""

    rank: int
    blocks: tuple[int, ...]  # indices into `blocks(cfg)`
    params: float  # parameters on one tp rank
    largest_unit: float  # the largest FSDP unit of it (a block, or the rest: embeddings, norms, heads)
    act_per_sample: float  # bytes kept for backward by one sample's forward through this rank
    flops_per_sample: float  # forward matmul FLOPs of one sample through this rank (all tp ranks together)


def rank_shares(
    cfg: ModelConfig, tp: int, pp: int, schedule: str = "1f1b", checkpointing: bool = False, bytes_per_el: int = 2
) -> list[RankShare]:
    """Per pipeline rank: parameters per tp rank, activations and FLOPs per sample (see the module doc)."""
    bl = blocks(cfg)
    virtual = VIRTUAL_STAGES[schedule]
    chunks = stage_ranges(pipeline_blocks(cfg), pp * virtual)
    first, tok = first_stage_params(cfg), cfg.vocab_size * cfg.text_width
    rest = param_count(cfg) - first - sum(b.sharded + b.replicated for b in bl)  # norms, projections, temperature
    scale = bytes_per_el / 2  # model_math's constants are bytes at 2 bytes per element
    t, sv = cfg.max_text_len, cfg.num_patches + 1
    tail_act = sv * cfg.vision_width * bytes_per_el + 2 * t * cfg.vocab_size * (bytes_per_el + 4)  # image feats, logits
    heads_flops = 2 * (cfg.vision_width + cfg.text_width) * cfg.embed_dim + 4 * t * cfg.text_width * cfg.vocab_size
    stem_flops = 2 * cfg.num_patches * 3 * cfg.patch_size**2 * cfg.vision_width
    out = []
    for r in range(pp):
        mine = [c for v, c in enumerate(chunks) if v % pp == r]
        idx = tuple(i for c in mine for i in c)
        own = [bl[i] for i in idx]
        has_first, has_last = r == 0, r == pp - 1
        extra = (first if has_first else 0) + ((rest + (tok if pp > 1 else 0)) if has_last else 0)
        params = sum(b.params(tp) for b in own) + extra
        unit = max([b.params(tp) for b in own] + [extra])
        layers = [b for b in own for _ in range(b.runs)]
        work = [b.act_replicated + b.act_sharded / tp for b in layers]
        if checkpointing:
            act = sum(b.act_input for b in layers) * bytes_per_el + max(work, default=0.0) * scale
        else:
            act = sum(work) * scale
        act += tail_act if has_last else 0.0
        flops = sum(b.flops * b.runs for b in own) + (stem_flops if has_first else 0) + (heads_flops if has_last else 0)
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
