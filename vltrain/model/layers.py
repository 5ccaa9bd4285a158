"""Transformer building blocks shared by the vision encoder, text encoder and decoder.

Pre-norm blocks (GPT-2/ViT style): x + attn(norm(x)), [x + cross(norm(x), image)], x + mlp(norm(x)).
Attention is torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU).
Shapes: B batch, L sequence, D width, H heads, d = D / H head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def make_norm(kind: str, width: int) -> nn.Module:
    return nn.LayerNorm(width, eps=1e-6) if kind == "layernorm" else nn.RMSNorm(width, eps=1e-6)


# Rotary embeddings (Su et al. 2021), written here because torch core has none and the whole thing is
# a dozen lines. Split-half layout (GPT-NeoX). Several position axes share the frequency pairs:
# 1 axis for text, 2 axes (row, column) for image patches ("axial" 2D RoPE).
def rope_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [L, A] (A axes) -> cos, sin [L, head_dim/2], float32."""
    pairs, axes = head_dim // 2, positions.shape[1]
    sizes = [pairs // axes + (1 if a < pairs % axes else 0) for a in range(axes)]
    angles = []
    for a, n in enumerate(sizes):
        inv_freq = base ** (-torch.arange(n, dtype=torch.float32, device=positions.device) / max(n, 1))
        angles.append(positions[:, a : a + 1].float() * inv_freq)  # [L, n]
    ang = torch.cat(angles, dim=-1)  # [L, pairs]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, d] rotated by cos/sin [L, d/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention or cross-attention (q from x, k/v from `context`).

    q, k and v are separate Linears rather than one fused qkv: tensor parallelism shards each one by
    output features (whole heads per rank), which a fused [3D, D] matrix cannot do. Checkpoints written
    with the fused `qkv` / `kv` weights still load (`_split_fused_keys`). Under tensor parallelism the
    Linears return this rank's heads only, so the head count is read from the tensor, not `self.heads`.
    """

    def __init__(self, width: int, heads: int, kv_width: int | None = None):
        super().__init__()
        self.heads, self.head_dim, self.cross = heads, width // heads, kv_width is not None
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(kv_width or width, width)
        self.v = nn.Linear(kv_width or width, width)
        self.out = nn.Linear(width, width)
        self._register_load_state_dict_pre_hook(self._split_fused_keys)

    def _split_fused_keys(self, state_dict, prefix, *args) -> None:
        # Old layout: self-attention `qkv` [3D, D] = (q; k; v), cross-attention `kv` [2D, Dkv] = (k; v).
        for fused, names in (("qkv", ("q", "k", "v")), ("kv", ("k", "v"))):
            for kind in ("weight", "bias"):
                key = f"{prefix}{fused}.{kind}"
                if key in state_dict:
                    parts = state_dict.pop(key).chunk(len(names), dim=0)
                    for name, part in zip(names, parts, strict=True):
                        state_dict[f"{prefix}{name}.{kind}"] = part

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, L, H*d] -> [B, H, L, d], H = local heads
        b, n, _ = t.shape
        return t.view(b, n, -1, self.head_dim).transpose(1, 2)

    def forward(self, x, context=None, attn_mask=None, is_causal=False, rope=None):
        # x [B, L, D]; context [B, S, Dkv]; attn_mask bool [B, 1, 1|L, L|S] (True = attend)
        kv_in = context if self.cross else x
        q, k, v = self._split(self.q(x)), self._split(self.k(kv_in)), self._split(self.v(kv_in))  # [B, H, L|S, d]
        if rope is not None and not self.cross:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # [B, H, L, d]
        return self.out(y.transpose(1, 2).flatten(2))  # [B, L, D] (TP: partial sums, reduced by `out`)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)

    def forward(self, x):  # [B, L, D] -> [B, L, D]
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; with `kv_width` it also cross-attends a context (image features).

    `checkpointing = True` recomputes the block in backward (torch.utils.checkpoint, non-reentrant,
    which also replays the RNG state, so results match the plain run).
    """

    def __init__(self, width: int, heads: int, hidden: int, norm: str, kv_width: int | None = None):
        super().__init__()
        self.norm1, self.attn = make_norm(norm, width), Attention(width, heads)
        if kv_width is not None:
            self.norm_cross, self.cross = make_norm(norm, width), Attention(width, heads, kv_width)
        self.norm2, self.mlp = make_norm(norm, width), MLP(width, hidden)
        self.checkpointing = False

    def _forward(self, x, context=None, attn_mask=None, is_causal=False, rope=None):
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, rope=rope)
        if context is not None:
            x = x + self.cross(self.norm_cross(x), context=context)
        return x + self.mlp(self.norm2(x))

    def forward(self, x, context=None, attn_mask=None, is_causal=False, rope=None):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, attn_mask, is_causal, rope, use_reentrant=False)
        return self._forward(x, context, attn_mask, is_causal, rope)
