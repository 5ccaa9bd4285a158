"""Token embedding (shared with the decoder) and the bidirectional text encoder with its fusion blocks.

ALBEF-style split (Li et al. 2021): blocks 0..text_layers-1 see text only (their output feeds the
contrastive loss); the last `fusion_layers` blocks add cross-attention to the image features and
feed the masked-LM head.

A pipeline stage's copy (vltrain.parallel.pipeline) keeps only its blocks (`blocks` and `fusion` are
keyed by block index, so the names stay) and sets the norms of towers that do not end in it to None.
"""

from __future__ import annotations

import torch
from torch import nn

from vltrain.common.errors import UserError
from vltrain.model.layers import Block, make_norm, rope_tables
from vltrain.model_config import ModelConfig
from vltrain.model_math import mlp_hidden


def text_rope(cfg: ModelConfig, length: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rotary tables of `length` text positions (None with learned positions)."""
    if cfg.pos_embedding != "rope":
        return None
    return rope_tables(torch.arange(length, device=device)[:, None], cfg.text_width // cfg.text_heads)


class TextEmbedding(nn.Module):
    """Token embedding (its weight is also the LM and MLM output matrix) plus learned positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.pos = (
            nn.Parameter(torch.zeros(1, cfg.max_text_len, cfg.text_width)) if cfg.pos_embedding == "learned" else None
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, T, Dt]"""
        if ids.shape[1] > self.cfg.max_text_len:
            raise UserError(
                f"input_ids: {ids.shape[1]} tokens exceed model.max_text_len {self.cfg.max_text_len}; "
                f"allowed: at most {self.cfg.max_text_len}"
            )
        x = self.tok(ids)
        return x + self.pos[:, : ids.shape[1]] if self.pos is not None else x

    def rope(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        return text_rope(self.cfg, length, device)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, Dt] -> [B, T, V] with the tied embedding matrix."""
        return h @ self.tok.weight.t()


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w, hid = cfg.text_width, mlp_hidden(cfg, cfg.text_width)
        self.blocks = nn.ModuleDict({str(i): Block(w, cfg.text_heads, hid, cfg.norm) for i in range(cfg.text_layers)})
        self.unimodal_norm: nn.Module | None = make_norm(cfg.norm, w)  # ITC's head: the last stage's
        self.fusion = nn.ModuleDict(
            {
                str(i): Block(w, cfg.text_heads, hid, cfg.norm, kv_width=cfg.vision_width)
                for i in range(cfg.fusion_layers)
            }
        )
        self.norm: nn.Module | None = make_norm(cfg.norm, w)

    @staticmethod
    def key_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        return attention_mask[:, None, None, :]  # [B, 1, 1, T]: padding keys are not attended

    def unimodal(self, x, attention_mask, rope=None) -> torch.Tensor:
        """x [B, T, Dt] embedded text -> [B, T, Dt] un-normed output of the text-only blocks."""
        mask = self.key_mask(attention_mask)
        for block in self.blocks.values():
            x = block(x, attn_mask=mask, rope=rope)
        return x

    def fuse(self, x, image, attention_mask, rope=None) -> torch.Tensor:
        """x [B, T, Dt] unimodal output, image [B, 1+N, Dv] -> [B, T, Dt] fused output, normed where the
        fusion tower ends (always but in a pipeline stage before that)."""
        mask = self.key_mask(attention_mask)
        for block in self.fusion.values():
            x = block(x, context=image, attn_mask=mask, rope=rope)
        return self.norm(x) if self.norm is not None else x
