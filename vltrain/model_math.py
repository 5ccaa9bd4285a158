"""Closed-form size, compute and activation memory of `vltrain.model.VLModel` (pure, torch-free).

The planner (clusterctl plan/estimate) imports this on its fast path, so it must not import torch.
`param_count` is exact: tests/test_presets.py checks it against the model built on the meta device
for every preset, so a change to the model that is not mirrored here fails a test.

Architecture being counted (see vltrain/model/): pre-norm transformer blocks with biased linears and
a GELU MLP of width int(mlp_ratio * width).
  vision  : Conv2d patch embedding, cls token, learned positions (none with RoPE), ViT blocks, norm
  text    : token embedding (shared with the decoder and tied to both LM heads), learned positions
            (shared by encoder and decoder; none with RoPE), `text_layers` self-attention blocks, and
            the norm of the unimodal output that feeds the contrastive head
  fusion  : `fusion_layers` blocks (self-attn + cross-attn to image features + MLP), final norm (MLM)
  decoder : `decoder_layers` causal blocks (self-attn + cross-attn + MLP), final norm (LM head tied)
  heads   : image and text contrastive projections (no bias), the learnable temperature
  mim     : (only when masked image modelling is on, `mim=True`) MAE's decoder: a linear from the ViT
            width, a mask token, learned positions, `mim_decoder_layers` self-attention blocks, a
            norm and a linear head to the patch pixels (vltrain/model/mim.py)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vltrain.config import LossConfig
    from vltrain.model_config import ModelConfig


def mlp_hidden(cfg: ModelConfig, width: int) -> int:
    """MLP hidden size; the model uses this same function so the two never disagree."""
    return int(cfg.mlp_ratio * width)


# ---------------------------------------------------------------- parameters
def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm(cfg: ModelConfig, width: int) -> int:
    return 2 * width if cfg.norm == "layernorm" else width  # LayerNorm: weight + bias; RMSNorm: weight


def _self_block(cfg: ModelConfig, w: int) -> int:
    attn = _linear(w, 3 * w) + _linear(w, w)  # fused qkv + output projection
    mlp = _linear(w, mlp_hidden(cfg, w)) + _linear(mlp_hidden(cfg, w), w)
    return 2 * _norm(cfg, w) + attn + mlp


def _cross_block(cfg: ModelConfig, w: int, kv_w: int) -> int:
    cross = _linear(w, w) + _linear(kv_w, 2 * w) + _linear(w, w)  # q from text, k/v from image, output
    return _self_block(cfg, w) + _norm(cfg, w) + cross


def _mim_params(cfg: ModelConfig) -> int:
    wd, _, layers = cfg.mim_decoder_shape()
    return (
        _linear(cfg.vision_width, wd)  # ViT width -> decoder width
        + wd  # mask token
        + (cfg.num_patches + 1) * wd  # learned positions (cls + patches)
        + layers * _self_block(cfg, wd)
        + _norm(cfg, wd)
        + _linear(wd, 3 * cfg.patch_size**2)  # pixels of a patch
    )


def param_breakdown(cfg: ModelConfig, mim: bool = False) -> dict[str, int]:
    """Parameters per part: vision, text, fusion, decoder, heads, and mim when the run uses masked
    image modelling (TrainConfig.uses_mim(); the decoder is built only then) (sums to `param_count`)."""
    wv, wt, learned = cfg.vision_width, cfg.text_width, cfg.pos_embedding == "learned"
    n_tok = cfg.num_patches + 1  # patches + cls
    vision = (
        _linear(3 * cfg.patch_size**2, wv)  # patch embedding (a conv with kernel = stride = patch)
        + wv  # cls token
        + (n_tok * wv if learned else 0)
        + cfg.vision_layers * _self_block(cfg, wv)
        + _norm(cfg, wv)
    )
    text = (
        cfg.vocab_size * wt
        + (cfg.max_text_len * wt if learned else 0)
        + cfg.text_layers * _self_block(cfg, wt)
        + _norm(cfg, wt)
    )
    fusion = cfg.fusion_layers * _cross_block(cfg, wt, wv) + _norm(cfg, wt)
    decoder = cfg.decoder_layers * _cross_block(cfg, wt, wv) + _norm(cfg, wt)
    heads = wv * cfg.embed_dim + wt * cfg.embed_dim + 1  # projections + logit_scale
    out = {"vision": vision, "text": text, "fusion": fusion, "decoder": decoder, "heads": heads}
    return out | ({"mim": _mim_params(cfg)} if mim else {})


def param_count(cfg: ModelConfig, mim: bool = False) -> int:
    """Total trainable parameters (tied weights counted once), equal to the model's numel sum."""
    return sum(param_breakdown(cfg, mim).values())


# ---------------------------------------------------------------- forward FLOPs
# Matmul FLOPs only, 2*m*n*k per (m x k) @ (k x n) product, as in Kaplan et al. 2020 and Narayanan
# et al. 2021: norms, softmax, GELU and embedding look-ups are O(s*h) and left out. Attention counts
# QK^T and AV in full (4*s*s_kv*h) even for the causal decoder, which is what SDPA's math and
# FlopCounterMode count; flash kernels skip half of the causal part.
def _attn_flops(s: int, s_kv: int, w: int, kv_w: int, fused_qkv: bool) -> float:
    if fused_qkv:
        proj = 2 * s * w * 3 * w
    else:
        proj = 2 * s * w * w + 2 * s_kv * kv_w * 2 * w
    return proj + 4 * s * s_kv * w + 2 * s * w * w  # projections, QK^T + AV, output projection


def _mlp_flops(cfg: ModelConfig, s: int, w: int) -> float:
    return 2 * 2 * s * w * mlp_hidden(cfg, w)


def mim_flops_per_sample(cfg: ModelConfig, mask_ratio: float) -> float:
    """Matmul FLOPs of MIM's own forward per sample: the patch embedding and the ViT over cls + the
    visible patches, the decoder over cls + all patches, its pixel head (vltrain/model/mim.py)."""
    n, wv = cfg.num_patches, cfg.vision_width
    hidden = min(n - 1, max(1, round(mask_ratio * n)))  # as vltrain.model.mim.num_masked
    sk, sn = 1 + n - hidden, 1 + n
    wd, _, layers = cfg.mim_decoder_shape()
    pixels = 3 * cfg.patch_size**2
    encoder = 2 * n * pixels * wv + cfg.vision_layers * (_attn_flops(sk, sk, wv, wv, True) + _mlp_flops(cfg, sk, wv))
    decoder = 2 * sk * wv * wd + layers * (_attn_flops(sn, sn, wd, wd, True) + _mlp_flops(cfg, sn, wd))
    return float(encoder + decoder + 2 * n * wd * pixels)


# The training objectives (LossConfig's weights) and the parts of the forward each one needs. The
# model runs ITC, MLM and captioning in every forward whatever their weights (vltrain/model/vl_model.py
# `_run`), MIM only when its weight is > 0; model FLOPs (MFU) count the objectives that train.
OBJECTIVES = ("itc", "mlm", "caption", "mim")


def active_objectives(loss: LossConfig) -> tuple[str, ...]:
    """The objectives with weight > 0 in `loss` (a LossConfig or a stage's): what MFU counts."""
    return tuple(name for name in OBJECTIVES if getattr(loss, name) > 0)


def forward_flops_breakdown(
    cfg: ModelConfig, text_len: int | None = None, mim_mask_ratio: float = 0.0
) -> dict[str, float]:
    """Matmul FLOPs of one sample's forward by part: "vision" (the ViT over all patches, shared by ITC,
    MLM and captioning), "itc" (the clean-text encoder pass and both projections), "mlm" (the
    masked-text encoder pass, fusion, MLM logits), "caption" (decoder, LM logits) and, when
    `mim_mask_ratio` > 0, "mim" (`mim_flops_per_sample`). The parts sum to the whole forward.

    The text encoder's unimodal blocks run twice (clean text for the contrastive loss, masked text
    for MLM, as in ALBEF); fusion and decoder blocks run once; the MLM and LM heads produce logits at
    every text position. The two contrastive similarity matrices (image-to-text and text-to-image,
    4 * global_batch * embed_dim FLOPs per sample) depend on the batch and are left out: < 0.001% of
    the total for the paper-scale presets at batch 8,192 (but ~2% for tiny).
    """
    t = text_len or cfg.max_text_len
    wv, wt = cfg.vision_width, cfg.text_width
    sv = cfg.num_patches + 1
    vision = 2 * cfg.num_patches * 3 * cfg.patch_size**2 * wv + cfg.vision_layers * (
        _attn_flops(sv, sv, wv, wv, True) + _mlp_flops(cfg, sv, wv)
    )
    self_text = _attn_flops(t, t, wt, wt, True) + _mlp_flops(cfg, t, wt)
    cross_text = self_text + _attn_flops(t, sv, wt, wv, False)
    logits = 2 * t * wt * cfg.vocab_size  # one tied head over every text position
    out = {
        "vision": float(vision),
        "itc": float(cfg.text_layers * self_text + 2 * wv * cfg.embed_dim + 2 * wt * cfg.embed_dim),
        "mlm": float(cfg.text_layers * self_text + cfg.fusion_layers * cross_text + logits),
        "caption": float(cfg.decoder_layers * cross_text + logits),
    }
    return out | ({"mim": mim_flops_per_sample(cfg, mim_mask_ratio)} if mim_mask_ratio > 0 else {})


def forward_flops_per_sample(
    cfg: ModelConfig,
    text_len: int | None = None,
    mim_mask_ratio: float = 0.0,
    objectives: Iterable[str] | None = None,
) -> float:
    """Matmul FLOPs of one sample's training forward for `objectives` (default: all that run, i.e.
    ITC, MLM, captioning, and MIM when `mim_mask_ratio` > 0: pass it when the step's loss.mim > 0).

    Pass `objectives=active_objectives(loss)` for model FLOPs (MFU): only the parts those objectives
    need (`forward_flops_breakdown`), the ViT once if any of ITC, MLM, captioning is among them. "mim"
    among `objectives` needs `mim_mask_ratio` > 0.
    """
    parts = forward_flops_breakdown(cfg, text_len, mim_mask_ratio)
    if objectives is None:
        objectives = OBJECTIVES[:3] + (("mim",) if mim_mask_ratio > 0 else ())
    wanted = set(objectives)
    unknown = sorted(wanted - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"objectives: unknown {unknown[0]!r}; allowed: {', '.join(OBJECTIVES)}")
    if "mim" in wanted and mim_mask_ratio <= 0:
        raise ValueError(f"mim_mask_ratio: {mim_mask_ratio} with 'mim' among the objectives; allowed: > 0")
    needs_vision = bool(wanted & {"itc", "mlm", "caption"})
    return float(sum(parts[k] for k in wanted) + (parts["vision"] if needs_vision else 0.0))


# ---------------------------------------------------------------- activation memory
# Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 2):
# a transformer layer keeps s*b*h*(34 + 5*a*s/h) bytes for backward with 2-byte activations and
# 1-byte dropout masks. Split by sub-layer: attention 11*sbh + 5*a*s^2*b, MLP 19*sbh (i.e. (3+4r)*sbh
# for MLP ratio r), two norms 4*sbh. A cross-attention sub-layer keeps its norm input and query
# input (4*sbh), Q, context and mask (5*sbh), K and V of the image tokens (4*s_kv*h) and the scores
# (5*a*s*s_kv). We keep the paper's byte counts (dropout masks included) as a safe upper bound and
# scale them by bytes_per_el / 2. Per sample, so b = 1.
def _self_layer_bytes(cfg: ModelConfig, s: int, w: int, heads: int) -> float:
    r = mlp_hidden(cfg, w) / w
    return s * w * (11 + 3 + 4 * r + 4) + 5 * heads * s * s


def _cross_layer_bytes(cfg: ModelConfig, s: int, s_kv: int, w: int, heads: int) -> float:
    cross = 9 * s * w + 4 * s_kv * w + 5 * heads * s * s_kv
    return _self_layer_bytes(cfg, s, w, heads) + cross


def activation_bytes_per_sample(cfg: ModelConfig, checkpointing: bool, bytes_per_el: int = 2) -> float:
    """Activation memory kept for backward by one sample's forward (all three losses).

    Without checkpointing: every block's working set. With checkpointing (every block wrapped):
    each block's input (s*h elements) plus one block's working set, the largest, recomputed during
    its backward. Both add the image features the cross-attention blocks read and the MLM/LM logits
    (bytes_per_el each, plus an fp32 copy for the cross-entropy).
    """
    t, sv = cfg.max_text_len, cfg.num_patches + 1
    wv, wt = cfg.vision_width, cfg.text_width
    scale = bytes_per_el / 2  # the paper's constants are bytes at 2 bytes per element
    layers = (
        [(sv * wv, _self_layer_bytes(cfg, sv, wv, cfg.vision_heads))] * cfg.vision_layers
        + [(t * wt, _self_layer_bytes(cfg, t, wt, cfg.text_heads))] * (2 * cfg.text_layers)
        + [(t * wt, _cross_layer_bytes(cfg, t, sv, wt, cfg.text_heads))] * (cfg.fusion_layers + cfg.decoder_layers)
    )
    if checkpointing:
        held = sum(inp for inp, _ in layers) * bytes_per_el + max(work for _, work in layers) * scale
    else:
        held = sum(work for _, work in layers) * scale
    image_features = sv * wv * bytes_per_el
    logits = 2 * t * cfg.vocab_size * (bytes_per_el + 4)
    return float(held + image_features + logits)


def largest_layer_params(cfg: ModelConfig) -> int:
    """Parameters of the largest single module ZeRO-3 gathers at once (a block or the token embedding)."""
    wv, wt = cfg.vision_width, cfg.text_width
    return max(
        _self_block(cfg, wv),
        _self_block(cfg, wt),
        _cross_block(cfg, wt, wv),
        cfg.vocab_size * wt,  # token embedding, tied to the LM head
    )
