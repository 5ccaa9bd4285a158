"""ViT image encoder (Dosovitskiy et al. 2021): patch embedding, cls token, pre-norm blocks.

Positions are learned (one vector per patch + cls) or axial 2D rotary (row, column) with the cls
token at (0, 0) and patches from (1, 1), so every patch keeps a distinct position.
"""

from __future__ import annotations

import torch
from torch import nn

from vltrain.common.errors import UserError
from vltrain.model.layers import Block, make_norm, rope_tables
from vltrain.model_config import ModelConfig
from vltrain.model_math import mlp_hidden


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w, self.cfg = cfg.vision_width, cfg
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, w)) if cfg.pos_embedding == "learned" else None
        self.blocks = nn.ModuleList(
            Block(w, cfg.vision_heads, mlp_hidden(cfg, w), cfg.norm) for _ in range(cfg.vision_layers)
        )
        self.norm = make_norm(cfg.norm, w)

    def _rope(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        side = self.cfg.image_size // self.cfg.patch_size
        r, c = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
        pos = torch.stack([r.flatten(), c.flatten()], dim=-1) + 1  # [N, 2]
        pos = torch.cat([torch.zeros(1, 2, dtype=pos.dtype, device=device), pos])  # cls at (0, 0)
        return rope_tables(pos, self.cfg.vision_width // self.cfg.vision_heads)

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> patch embeddings with cls (and learned positions) [B, 1 + N, Dv].

        Separate from forward so that the first pipeline stage can run it without the blocks.
        """
        if images.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise UserError(
                f"images: size {tuple(images.shape[-2:])} does not match model.image_size "
                f"{self.cfg.image_size}; allowed: [B, 3, {self.cfg.image_size}, {self.cfg.image_size}]"
            )
        images = images.to(self.patch_embed.weight.dtype)  # the loader yields float32; ZeRO bf16 casts the model
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, Dv]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+N, Dv]
        return x + self.pos if self.pos is not None else x

    def rope(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._rope(device) if self.cfg.pos_embedding == "rope" else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> features [B, 1 + N, Dv] (normed; index 0 is the cls token)."""
        x, rope = self.stem(images), self.rope(images.device)
        for block in self.blocks:
            x = block(x, rope=rope)
        return self.norm(x)
