"""Causal text decoder for captioning: masked self-attention, cross-attention to the image, MLP.

It reads the shared token embedding and predicts with the tied matrix (TextEmbedding.logits), so it
adds no vocabulary-sized parameters. Right padding needs no extra mask: with a causal mask a real
token only ever sees earlier, real tokens; outputs at padding positions are ignored by the loss.
"""

from __future__ import annotations

from torch import nn

from vltrain.model.layers import Block, make_norm
from vltrain.model_config import ModelConfig
from vltrain.model_math import mlp_hidden


class TextDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.text_width
        self.blocks = nn.ModuleList(
            Block(w, cfg.text_heads, mlp_hidden(cfg, w), cfg.norm, kv_width=cfg.vision_width)
            for _ in range(cfg.decoder_layers)
        )
        self.norm = make_norm(cfg.norm, w)

    def forward(self, x, image, rope=None):
        """x [B, T, Dt] embedded tokens, image [B, 1+N, Dv] -> [B, T, Dt] normed hidden states."""
        for block in self.blocks:
            x = block(x, context=image, is_causal=True, rope=rope)
        return self.norm(x)
