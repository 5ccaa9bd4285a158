"""Named model sizes (torchtitan style: a dict of factories), from a CPU-test model to the seeds' 30B ones.

Pure and torch-free (clusterctl reads presets on its fast path). Sizes are checked by
tests/test_presets.py: `model_math.param_count` equals the model built on the meta device, and the
paper-scale presets land within 1% of the totals their seed papers state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from vltrain.common.errors import UserError
from vltrain.model_config import ModelConfig


def tiny() -> ModelConfig:
    """~0.8M parameters: trains on a laptop CPU in minutes; the model of the tests and `make demo`.

    32 px images with 4 px patches (64 patches), as in the learnability measurement of docs/data.md;
    vocabulary 1,000 = the SentencePiece size that docs/data.md recommends for the synthetic captions;
    48 tokens, the length docs/data.md names for no truncation of synthetic captions.
    """
    return ModelConfig(
        name="tiny",
        image_size=32,
        patch_size=4,
        vision_width=96,
        vision_layers=2,
        vision_heads=4,
        text_width=96,
        text_layers=1,
        fusion_layers=1,
        text_heads=4,
        decoder_layers=1,
        vocab_size=1000,
        max_text_len=48,
        embed_dim=64,
    )


def small() -> ModelConfig:
    """~51M parameters for one GPU: ViT-S/16 (Touvron et al. 2021) with a 384-wide text tower."""
    return ModelConfig(
        name="small",
        image_size=224,
        patch_size=16,
        vision_width=384,
        vision_layers=12,
        vision_heads=6,
        text_width=384,
        text_layers=4,
        fusion_layers=2,
        text_heads=6,
        decoder_layers=2,
        vocab_size=32000,
        max_text_len=64,
        embed_dim=256,
    )


def base() -> ModelConfig:
    """~267M parameters: ViT-B/16 + BERT-base split 6 unimodal / 6 fusion layers (ALBEF, Li et al.
    2021) and a 6-block captioning decoder (BLIP-style); a single-node baseline."""
    return ModelConfig(
        name="base",
        image_size=224,
        patch_size=16,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        text_width=768,
        text_layers=6,
        fusion_layers=6,
        text_heads=12,
        decoder_layers=6,
        vocab_size=32000,
        max_text_len=64,
        embed_dim=256,
    )


def large() -> ModelConfig:
    """~1.0B parameters for one GPU: ViT-L/14 (Dosovitskiy et al. 2021; 304M) with a 24 + 4 fusion
    block text encoder and a 4-block decoder of width 1280. The model of bench/gpu_check.py: big
    enough that one H100 runs it at the MFU a real run would see, small enough to train on one GPU."""
    return ModelConfig(
        name="large",
        image_size=224,
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        text_width=1280,
        text_layers=24,
        fusion_layers=4,
        text_heads=16,
        decoder_layers=4,
        vocab_size=32000,
        max_text_len=77,
        embed_dim=512,
    )


def vl_seed000() -> ModelConfig:
    """Seed 000: a pre-trained image encoder, cross-attention fusion and a text decoder; 224 px and a
    SentencePiece vocabulary of 64,000 (from the seed). The seed states no size: ours is `base`
    (ViT-B/16 + BERT-base split 6 unimodal / 6 fusion, 6-block decoder, ALBEF/BLIP-style) with the
    seed's vocabulary, ~291M parameters, the scale at which ZeRO-2 data parallel on 32 GPUs (the
    seed's setup) is the natural choice; 64 tokens per caption as in `base`.
    """
    return dataclasses.replace(base(), name="vl-seed000", vocab_size=64000)


def crossmodal_xl() -> ModelConfig:
    """CrossModal-Transformer-XL, seed 002: 30.5B = ~18B text encoder + ~12.5B vision and fusion.

    224 px, vocabulary 64,000, 77 tokens (all from the seed). Text encoder: 39 blocks of 6144
    (48 heads of 128) + embeddings = 18.06B. Vision + fusion: ViT 30 x 4096 /14 px (6.05B), 6 fusion
    blocks (3.47B) and the 5-block captioning decoder (2.90B), which also cross-attends the image, so
    we count it with the "multimodal fusion layers": 12.42B. Total 30.49B (-0.04%).
    """
    return ModelConfig(
        name="crossmodal-xl",
        image_size=224,
        patch_size=14,
        vision_width=4096,
        vision_layers=30,
        vision_heads=32,
        text_width=6144,
        text_layers=39,
        fusion_layers=6,
        text_heads=48,
        decoder_layers=5,
        vocab_size=64000,
        max_text_len=77,
        embed_dim=1024,
    )


def vl_30b() -> ModelConfig:
    """Seed 001: 30.5B, a pre-trained image encoder joined to a decoder-only LM by cross-attention.

    224 px and vocabulary 64,000 from the seed; 77 tokens (CLIP's length; the seed gives none).
    The decoder dominates (Flamingo-like): 48 causal blocks of 6144 with cross-attention (26.6B);
    a ViT 30 x 2048 /14 px (1.51B); a thin 2 + 2-block text encoder (1.30B + 1.11B) feeds the
    contrastive and MLM objectives the seed pre-trains with. Total 30.51B (+0.03%).
    """
    return ModelConfig(
        name="vl-30b",
        image_size=224,
        patch_size=14,
        vision_width=2048,
        vision_layers=30,
        vision_heads=16,
        text_width=6144,
        text_layers=2,
        fusion_layers=2,
        text_heads=48,
        decoder_layers=48,
        vocab_size=64000,
        max_text_len=77,
        embed_dim=1024,
    )


def vl_22b() -> ModelConfig:
    """Seed 003: 22B across vision and language encoders with cross-modal fusion; RoPE, RMSNorm.

    336 px (24 x 24 patches of 14 px), vocabulary 65,000, rotary positions and RMSNorm: all from the
    seed; 77 tokens (not given). ViT 24 x 4096 (4.84B), text encoder 38 x 5120 (12.29B), 6 fusion +
    6 decoder blocks (2.45B each). Total 22.04B (+0.19%).
    """
    return ModelConfig(
        name="vl-22b",
        image_size=336,
        patch_size=14,
        vision_width=4096,
        vision_layers=24,
        vision_heads=32,
        text_width=5120,
        text_layers=38,
        fusion_layers=6,
        text_heads=40,
        decoder_layers=6,
        vocab_size=65000,
        max_text_len=77,
        embed_dim=1024,
        pos_embedding="rope",
        norm="rmsnorm",
    )


def vl_seed004() -> ModelConfig:
    """Seed 004: 256 px images, 1,024-token texts, vocabulary 32,000 (from the seed); 2.34B by our choice.

    The seed states no parameter count. Its visual side is "a masked autoencoder variant", so the
    vision tower is MAE's reference ViT-L/16 (He et al. 2022; 256 patches at 256 px, 0.30B). Text is
    1,024 tokens per sample, 4x the image tokens, so the text side sets the cost: a 24 x 2048
    encoder (GPT-3 XL shape, Brown et al. 2020; 1.28B with embeddings) plus 6 fusion and 6 decoder
    blocks (0.38B each). Training costs ~2.2e13 FLOPs per sample (3x forward), so the seed's
    2 months on 256 A100s at 40% MFU make ~3.6M steps of 2,048 samples; a 10x larger model would
    make ~0.4M, few for a from-scratch pre-training. The size fits ZeRO-2 on 80 GB with room for
    1,024-token activations.
    """
    return ModelConfig(
        name="vl-seed004",
        image_size=256,
        patch_size=16,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        text_width=2048,
        text_layers=24,
        fusion_layers=6,
        text_heads=16,
        decoder_layers=6,
        vocab_size=32000,
        max_text_len=1024,
        embed_dim=512,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "base": base,
    "large": large,
    "vl-seed000": vl_seed000,
    "crossmodal-xl": crossmodal_xl,
    "vl-30b": vl_30b,
    "vl-22b": vl_22b,
    "vl-seed004": vl_seed004,
}

# What each paper-scale preset must match: (seed file prefix, stated total parameters).
PAPER_TOTALS: dict[str, tuple[str, float]] = {
    "crossmodal-xl": ("002", 30.5e9),
    "vl-30b": ("001", 30.5e9),
    "vl-22b": ("003", 22e9),
}


def get_preset(name: str, flag: str = "model") -> ModelConfig:
    """The preset's ModelConfig, or a one-line UserError naming the flag and the allowed presets."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise UserError(f"{flag}: unknown preset {name!r}; allowed: {', '.join(PRESETS)}") from None


def resolve_model(model: str | ModelConfig) -> ModelConfig:
    """A train config's `model`, a preset name or a ModelConfig, as a ModelConfig."""
    return model if isinstance(model, ModelConfig) else get_preset(model)
