"""The architecture of the vision-language model: one typed, validated config (pure, torch-free).

Named sizes of it are in `vltrain.presets`; the model is built from it by `vltrain.model`, and its
parameter count, FLOPs and activation memory are computed from it by `vltrain.model_math`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vltrain.common.errors import UserError
from vltrain.common.schema import field


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of the vision-language model (see docs/architecture.md, 'Model')."""

    name: str = field("preset name", default="custom")
    # vision: ViT over image patches
    image_size: int = field("input image side (px)", default=224, min=16, max=1024)
    patch_size: int = field("ViT patch side (px)", default=16, min=2, max=64)
    vision_width: int = field("ViT hidden size", min=8, max=32768)
    vision_layers: int = field("ViT blocks", min=1, max=256)
    vision_heads: int = field("ViT attention heads", min=1, max=256)
    # text: bidirectional encoder; its last `fusion_layers` blocks cross-attend image features
    text_width: int = field("text hidden size (encoder and decoder)", min=8, max=32768)
    text_layers: int = field("text encoder blocks (self-attention only)", min=0, max=256)
    fusion_layers: int = field("text encoder blocks with cross-attention to the image", min=1, max=256)
    text_heads: int = field("text attention heads", min=1, max=256)
    # decoder: causal, cross-attends image features, LM head tied to the token embedding
    decoder_layers: int = field("causal decoder blocks", min=1, max=256)
    mlp_ratio: float = field("MLP hidden = ratio x width", default=4.0, min=1.0, max=16.0)
    vocab_size: int = field("tokenizer vocabulary", min=16, max=1_000_000)
    max_text_len: int = field("tokens per caption incl. bos/eos", default=77, min=8, max=8192)
    embed_dim: int = field("contrastive embedding size", default=256, min=8, max=8192)
    pos_embedding: str = field("position encoding", default="learned", choices=("learned", "rope"))
    norm: str = field("normalisation", default="layernorm", choices=("layernorm", "rmsnorm"))
    # masked image modelling decoder (built only when a run's loss.mim > 0 in some stage; vltrain/model/mim.py)
    mim_decoder_layers: int = field("MIM decoder blocks", default=4, min=1, max=64)
    mim_decoder_width: int = field(
        "MIM decoder hidden size (0: half the ViT width, or the ViT width when vision_heads is odd)",
        default=0,
        min=0,
        max=32768,
    )
    mim_decoder_heads: int = field(
        "MIM decoder attention heads (0: the decoder width over the ViT's head size)", default=0, min=0, max=256
    )

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise UserError(
                f"model.image_size: {self.image_size} is not divisible by model.patch_size "
                f"{self.patch_size}; allowed: a multiple of the patch size"
            )
        for w, h, what in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if w % h:
                raise UserError(
                    f"model.{what}_width: {w} is not divisible by model.{what}_heads {h}; allowed: a multiple of the head count"
                )
            if self.pos_embedding == "rope" and (w // h) % 2:
                raise UserError(
                    f"model.{what}_heads: head size {w // h} is odd; allowed: an even head size with pos_embedding = 'rope'"
                )
        width, heads = self.mim_decoder_width or self._mim_auto_width(), self.mim_decoder_heads
        if not heads and width % (self.vision_width // self.vision_heads):
            raise UserError(
                f"model.mim_decoder_width: {width} is not divisible by the ViT's head size "
                f"{self.vision_width // self.vision_heads}; allowed: a multiple of it, or set model.mim_decoder_heads"
            )
        if heads and width % heads:
            raise UserError(
                f"model.mim_decoder_width: {width} is not divisible by model.mim_decoder_heads {heads}; "
                "allowed: a multiple of the head count"
            )

    def _mim_auto_width(self) -> int:
        return self.vision_width // 2 if self.vision_heads % 2 == 0 else self.vision_width

    def mim_decoder_shape(self) -> tuple[int, int, int]:
        """(width, heads, layers) of the MIM decoder: MAE's decoder is narrower than its encoder (512
        for ViT-L's 1024); by default half the ViT width with the ViT's head size."""
        width = self.mim_decoder_width or self._mim_auto_width()
        heads = self.mim_decoder_heads or width // (self.vision_width // self.vision_heads)
        return width, heads, self.mim_decoder_layers

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2
