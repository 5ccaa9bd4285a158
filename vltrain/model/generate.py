"""Greedy caption generation with a KV cache (evaluation's captioning).

Without a cache every new token re-runs the decoder over the whole prefix: T(T+1)/2 token passes for a
T-token caption, ~20 minutes for evaluation's 1000 captions at 30B. Here each decoder block keeps the
self-attention keys/values of the tokens so far (one slot per position, filled as tokens come) and the
cross-attention keys/values of the image, computed once; a step runs the decoder on the new token only.
Same arithmetic as `VLModel.generate` (the uncached reference, tests/test_generate_cache.py compares
them token for token), through the same modules: tensor-parallel Linears keep their hooks; blocks that
FSDP shards are gathered around each use (`gathered`), as their forward hook would do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vltrain.model.decoder import TextDecoder
from vltrain.model.layers import Attention, Block, apply_rope
from vltrain.model.text import text_rope


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """`module`'s parameters unsharded for the duration when FSDP2 shards it (a no-op otherwise): code
    that calls its submodules directly, not its forward, has no FSDP hook to gather them."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def reshard_all(model: nn.Module) -> None:
    """Free what FSDP2 keeps gathered after an evaluation's forwards (a no-op on an unsharded model)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _heads(attn: Attention, t: torch.Tensor) -> torch.Tensor:
    """[B, L, H*d] -> [B, H, L, d] (H: this rank's heads under tensor parallelism)."""
    b, n, _ = t.shape
    return t.view(b, n, -1, attn.head_dim).transpose(1, 2)


def _merge(attn: Attention, y: torch.Tensor) -> torch.Tensor:
    return attn.out(y.transpose(1, 2).flatten(2))  # [B, H, L, d] -> [B, L, D]


@dataclass
class BlockCache:
    """One decoder block's cache: self-attention keys/values [B, H, T_max, d] (positions < `length`
    filled) and the image's cross-attention keys/values [B, H, S, d]."""

    keys: torch.Tensor
    values: torch.Tensor
    image_keys: torch.Tensor
    image_values: torch.Tensor
    length: int = 0


def _new_cache(block: Block, image: torch.Tensor, max_tokens: int, dtype: torch.dtype) -> BlockCache:
    """The image's keys/values for `block` (once per caption batch) and empty self-attention slots."""
    ik, iv = _heads(block.cross, block.cross.k(image)), _heads(block.cross, block.cross.v(image))
    b, h, _, d = ik.shape
    empty = torch.empty(b, h, max_tokens, d, dtype=dtype, device=image.device)
    return BlockCache(empty, empty.clone(), ik, iv)


def _block_step(block: Block, x: torch.Tensor, cache: BlockCache, rope) -> torch.Tensor:
    """x [B, 1, D], the token at position cache.length -> [B, 1, D]; appends its keys/values to the cache.
    Block._forward's order (pre-norm self-attention, cross-attention, MLP) with the past read from the cache."""
    a, t = block.attn, cache.length
    h = block.norm1(x)
    q, k, v = _heads(a, a.q(h)), _heads(a, a.k(h)), _heads(a, a.v(h))  # [B, H, 1, d]
    if rope is not None:
        cos, sin = rope[0][t : t + 1], rope[1][t : t + 1]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache.keys[:, :, t : t + 1], cache.values[:, :, t : t + 1] = k, v
    cache.length = t + 1
    y = F.scaled_dot_product_attention(q, cache.keys[:, :, : t + 1], cache.values[:, :, : t + 1])  # all past: causal
    x = x + _merge(a, y)
    hc = _heads(block.cross, block.cross.q(block.norm_cross(x)))
    x = x + _merge(block.cross, F.scaled_dot_product_attention(hc, cache.image_keys, cache.image_values))
    return x + block.mlp(block.norm2(x))


def decoder_step(
    decoder: TextDecoder, x: torch.Tensor, image: torch.Tensor, caches: list[BlockCache], rope, max_tokens: int
) -> torch.Tensor:
    """The decoder on one new token per row, x [B, 1, Dt] -> [B, 1, Dt], normed. `caches`
    empty: built here from `image` [B, 1+N, Dv] at the first step, one per block, `max_tokens` slots each."""
    for i, block in enumerate(decoder.blocks.values()):
        assert isinstance(block, Block)
        with gathered(block):
            if len(caches) <= i:
                caches.append(_new_cache(block, image, max_tokens, x.dtype))
            x = _block_step(block, x, caches[i], rope)
    return decoder.norm(x) if decoder.norm is not None else x


def all_done_here(done: torch.Tensor) -> bool:
    """One process: stop when every row has ended."""
    return bool(done.all())


def greedy_captions(
    model, images: torch.Tensor, max_len: int, all_done: Callable[[torch.Tensor], bool] = all_done_here
) -> torch.Tensor:
    """Greedy captions of `model` (a VLModel) with a KV cache: [B, max_len] int64, the tokens after bos up
    to and including eos, then pad, as VLModel.generate returns them. `all_done(done)` decides when to
    stop; ranks whose model forward is collective (FSDP, tensor parallel) pass one that agrees over the
    group, so that every rank runs the same steps."""
    from vltrain.common.errors import UserError

    cfg = model.cfg
    if not 1 <= max_len < cfg.max_text_len:
        raise UserError(f"generate: max_len {max_len}; allowed: 1 to {cfg.max_text_len - 1} (max_text_len - 1)")
    b, dev = images.shape[0], images.device
    with gathered(model):  # the root's own parameters: embeddings, norms, the decoder's final norm
        feats = model.vision(images)
        rope = text_rope(cfg, max_len, dev)
        embed = model.embed
        tok = torch.full((b, 1), model.bos_id, dtype=torch.long, device=dev)
        out = torch.full((b, max_len), model.pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        banned = torch.tensor([model.pad_id, model.bos_id, model.mask_id], device=dev)
        caches: list[BlockCache] = []
        for t in range(max_len):
            x = embed.tok(tok)
            if embed.pos is not None:
                x = x + embed.pos[:, t : t + 1]
            h = decoder_step(model.decoder, x, feats, caches, rope, max_len)
            logits = embed.logits(h[:, -1]).float()  # [B, V]
            logits[:, banned] = float("-inf")
            nxt = logits.argmax(-1)
            out[:, t] = torch.where(done, model.pad_id, nxt)
            done |= nxt == model.eos_id
            if all_done(done):
                break
            tok = nxt[:, None]
    return out
