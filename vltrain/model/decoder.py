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
        self.blocks = nn.ModuleDict(
            {
                str(i): Block(w, cfg.text_heads, mlp_hidden(cfg, w), cfg.norm, kv_width=cfg.vision_width)
                for i in range(cfg.decoder_layers)
            }
        )
        self.norm: nn.Module | None = make_norm(cfg.norm, w)

    def forward(self, x, image, rope=None):
        """x [B, T, Dt] embedded tokens, image [B, 1+N, Dv] -> [B, T, Dt] hidden states, normed where the
        tower ends (a pipeline stage's copy keeps its own blocks, keyed by index, and the norm only there)."""
        for block in self.blocks.values():
            x = block(x, context=image, is_causal=True, rope=rope)
        return self.norm(x) if self.norm is not None else x
