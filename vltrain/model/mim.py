"""Masked image modelling, MAE-style (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Per sample, a random `mask_ratio` of the patches is hidden; the ViT encodes the visible patches and
the cls token only; a light decoder (a few narrow Blocks) gets the encoded visible tokens back in
place, a learned mask token at every hidden patch, and reconstructs each hidden patch's pixels,
normalised per patch (MAE's norm_pix_loss); the loss is the MSE over the hidden patches only.

MAE, not SimMIM (all patches encoded, hidden ones replaced by a mask token): the contrastive,
MLM and captioning losses already encode the whole, unmasked image once, so MIM's own encoder pass
is extra work, and MAE's costs (1 - mask_ratio) of it (a quarter at 0.75) against SimMIM's whole
pass. The encoder here is the model's ViT (the same modules, weights and positions), called on a
subset of its tokens.

Shapes: B batch, N patches, K = N - round(mask_ratio * N) visible, P = 3 * patch^2 pixels per patch,
Dv ViT width, Dd decoder width.
"""

from __future__ import annotations

import torch
from torch import nn

from vltrain.model.layers import Block, make_norm
from vltrain.model.vision import VisionEncoder
from vltrain.model_config import ModelConfig
from vltrain.model_math import mlp_hidden


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """images [B, 3, S, S] -> [B, N, P], patches in row-major order (the ViT's), pixels (row, col, channel)."""
    b, c, s, _ = images.shape
    n = s // patch
    x = images.reshape(b, c, n, patch, n, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, n * n, patch * patch * c)


def norm_pix_target(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch normalised by its own mean and variance (MAE's norm_pix_loss target; its
    unbiased variance and eps 1e-6), in float32."""
    x = patches.float()
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    return (x - mean) / (var + eps).sqrt()


def num_masked(num_patches: int, ratio: float) -> int:
    """round(ratio * N) patches hidden, at least one and leaving at least one visible."""
    return min(num_patches - 1, max(1, round(ratio * num_patches)))


def random_masking(batch: int, num_patches: int, ratio: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking with torch's global RNG: -> (ids_keep [B, K] of the visible
    patches, ascending; mask [B, N] bool, True = hidden)."""
    hidden = num_masked(num_patches, ratio)
    noise = torch.rand(batch, num_patches, device=device)
    ids_keep = noise.argsort(dim=1)[:, : num_patches - hidden].sort(dim=1).values  # [B, K]
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return ids_keep, mask


def encode_visible(vision: VisionEncoder, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """The ViT over the cls token and the visible patches: -> [B, 1 + K, Dv] (normed).

    VisionEncoder.forward with the hidden patches dropped after its stem (patch embedding, cls, learned
    positions); rotary positions are gathered with them, so each visible patch keeps its place.
    """
    x = vision.stem(images)  # [B, 1 + N, Dv]
    pick = torch.cat([torch.zeros_like(ids_keep[:, :1]), ids_keep + 1], dim=1)  # [B, 1 + K], cls first
    x = torch.gather(x, 1, pick.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, 1 + K, Dv]
    rope = vision.rope(images.device)  # ([1 + N, d/2] x 2) or None
    if rope is not None:
        cos, sin = rope
        rope = (cos[pick].unsqueeze(1), sin[pick].unsqueeze(1))  # [B, 1, 1 + K, d/2]: per-sample positions
    return vision.encode(x, rope)


class MIMDecoder(nn.Module):
    """MAE's decoder: visible tokens projected to Dd, mask tokens at the hidden patches, learned
    positions (whatever the ViT uses: the decoder is trained from scratch and discarded), a few
    Blocks, a linear head to pixels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width, heads, layers = cfg.mim_decoder_shape()
        self.embed = nn.Linear(cfg.vision_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_hidden(cfg, width), cfg.norm) for _ in range(layers))
        self.norm = make_norm(cfg.norm, width)
        self.pred = nn.Linear(width, 3 * cfg.patch_size**2)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
        """latent [B, 1 + K, Dv], ids_keep [B, K] -> predicted pixels of every patch [B, N, P]."""
        x = self.embed(latent)  # [B, 1 + K, Dd]
        b, _, w = x.shape
        full = self.mask_token.expand(b, num_patches, w)  # [B, N, Dd]
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, w), x[:, 1:])  # visible back in place
        x = torch.cat([x[:, :1], full], dim=1) + self.pos  # [B, 1 + N, Dd]
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x)[:, 1:])  # [B, N, P]


def mim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over the hidden patches only (float32)."""
    per_patch = (pred.float() - target).pow(2).mean(-1)  # [B, N]
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()


def mim_forward(vision: VisionEncoder, decoder: MIMDecoder, images: torch.Tensor, ratio: float) -> torch.Tensor:
    """The MIM loss of a batch of images (scalar, float32)."""
    b, n, patch = images.shape[0], vision.cfg.num_patches, vision.cfg.patch_size
    ids_keep, mask = random_masking(b, n, ratio, images.device)
    pred = decoder(encode_visible(vision, images, ids_keep), ids_keep, n)
    return mim_loss(pred, norm_pix_target(patchify(images.float(), patch)), mask)
