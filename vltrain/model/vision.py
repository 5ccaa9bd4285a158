"""ViT image encoder (Dosovitskiy et al. 2021): patch embedding, cls token, pre-norm blocks.

Positions are learned (one vector per patch + cls) or axial 2D rotary (row, column) with the cls
token at (0, 0) and patches from (1, 1), so every patch keeps a distinct position.

A pipeline stage's copy (vltrain.parallel.pipeline) may lack the stem (patch_embed, cls, pos None: it
takes the previous stage's features), some blocks (`blocks` is keyed by block index, so the names stay)
and the norm (None where the tower does not end in that stage); `forward` runs whatever is there.
"""

from __future__ import annotations

import torch
from torch import nn

from vltrain.common.errors import UserError
from vltrain.model.layers import Block, make_norm, rope_tables
from vltrain.model_config import ModelConfig
from vltrain.model_math import mlp_hidden

Rope = tuple[torch.Tensor, torch.Tensor]


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w, self.cfg = cfg.vision_width, cfg
        self.patch_embed: nn.Conv2d | None = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls: nn.Parameter | None = nn.Parameter(torch.zeros(1, 1, w))
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, w)) if cfg.pos_embedding == "learned" else None
        self.blocks = nn.ModuleDict(
            {str(i): Block(w, cfg.vision_heads, mlp_hidden(cfg, w), cfg.norm) for i in range(cfg.vision_layers)}
        )
        self.norm: nn.Module | None = make_norm(cfg.norm, w)

    def _rope(self, device) -> Rope:
        side = self.cfg.image_size // self.cfg.patch_size
        r, c = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
        pos = torch.stack([r.flatten(), c.flatten()], dim=-1) + 1  # [N, 2]
        pos = torch.cat([torch.zeros(1, 2, dtype=pos.dtype, device=device), pos])  # cls at (0, 0)
        return rope_tables(pos, self.cfg.vision_width // self.cfg.vision_heads)

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> patch embeddings with cls (and learned positions) [B, 1 + N, Dv]."""
        patch_embed, cls = self.patch_embed, self.cls
        if patch_embed is None or cls is None:
            raise ValueError("VisionEncoder.stem: this pipeline stage's copy has no stem (only the first stage's has)")
        if images.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise UserError(
                f"images: size {tuple(images.shape[-2:])} does not match model.image_size "
                f"{self.cfg.image_size}; allowed: [B, 3, {self.cfg.image_size}, {self.cfg.image_size}]"
            )
        images = images.to(patch_embed.weight.dtype)  # the loader yields float32; ZeRO bf16 casts the model
        x = patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, Dv]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+N, Dv]
        return x + self.pos if self.pos is not None else x

    def rope(self, device) -> Rope | None:
        return self._rope(device) if self.cfg.pos_embedding == "rope" else None

    def encode(self, x: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        """Tokens [B, L, Dv] through the blocks, then the norm (where it is: the tower ends here)."""
        for block in self.blocks.values():
            x = block(x, rope=rope)
        return self.norm(x) if self.norm is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> features [B, 1 + N, Dv] (normed; index 0 is the cls token).

        A pipeline stage's copy without the stem takes the previous stage's features [B, 1 + N, Dv].
        """
        if self.patch_embed is not None:
            x = self.stem(x)
        return self.encode(x, self.rope(x.device) if len(self.blocks) else None)
