"""Masked image modelling (vltrain/model/mim.py): masking, the normalised-pixel target, the loss in the
model (absent and free when its weight is 0, gradients into the decoder and the ViT when on), and the
closed-form size and FLOPs of its decoder (vltrain/model_math.py) against the built model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tests.test_presets import _math_sdpa
from vltrain.common.errors import UserError
from vltrain.config import LossConfig
from vltrain.model import VLModel
from vltrain.model.mim import encode_visible, norm_pix_target, num_masked, patchify, random_masking
from vltrain.model_config import ModelConfig
from vltrain.model_math import forward_flops_per_sample, mim_flops_per_sample, param_breakdown, param_count
from vltrain.presets import PRESETS, get_preset

TINY_VARIANTS = [
    {},
    {"pos_embedding": "rope", "norm": "rmsnorm"},
    {"mim_decoder_layers": 1, "mim_decoder_width": 32, "mim_decoder_heads": 2},
]


def _tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(get_preset("tiny"), **overrides)


def _batch(cfg: ModelConfig, b: int = 4, t: int = 12):
    """Smooth images (a 3x3 grid of colours, upsampled): the pixels of a hidden patch follow from its
    neighbours', as in photographs and unlike white noise."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, cfg.vocab_size, (b, t), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    coarse = torch.randn(b, 3, 3, 3, generator=g)
    images = F.interpolate(coarse, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=True)
    return images, ids, torch.ones(b, t, dtype=torch.bool)


# ---------------------------------------------------------------- masking and target
@pytest.mark.parametrize("ratio", [0.05, 0.4, 0.75, 0.9, 0.95])
def test_masking_hides_round_ratio_n_patches_per_sample(ratio):
    n = 64
    torch.manual_seed(0)
    ids_keep, mask = random_masking(8, n, ratio, "cpu")
    hidden = round(ratio * n)
    assert num_masked(n, ratio) == hidden
    assert mask.shape == (8, n) and (mask.sum(1) == hidden).all()
    assert ids_keep.shape == (8, n - hidden)
    for row_keep, row_mask in zip(ids_keep, mask, strict=True):  # the kept ids are exactly the visible patches
        assert sorted(row_keep.tolist()) == torch.nonzero(~row_mask).flatten().tolist()
    assert len({tuple(r.tolist()) for r in mask}) == 8  # random per sample
    torch.manual_seed(0)
    assert torch.equal(random_masking(8, n, ratio, "cpu")[1], mask)  # torch's RNG: reproducible from the seed


def test_masking_keeps_one_patch_of_each_kind():
    assert num_masked(4, 0.05) == 1 and num_masked(4, 0.95) == 3


def test_patchify_follows_the_vit_patch_order():
    """Patch k of patchify is the k-th token of the ViT's patch embedding (a conv, flattened row-major)."""
    p, side = 4, 16
    n = side // p
    index = torch.arange(n * n, dtype=torch.float32).reshape(n, n)
    images = index.repeat_interleave(p, 0).repeat_interleave(p, 1).expand(2, 3, side, side)
    patches = patchify(images, p)  # [2, 16, 48]
    assert patches.shape == (2, n * n, 3 * p * p)
    assert torch.equal(patches, torch.arange(n * n, dtype=torch.float32)[None, :, None].expand_as(patches))
    conv = torch.nn.Conv2d(3, 5, p, stride=p, bias=False)
    tokens = conv(images).flatten(2).transpose(1, 2)  # [2, N, 5]
    # the same tokens from patchify's pixels: the conv weight laid out in patchify's (row, col, channel) order
    w = conv.weight.permute(0, 2, 3, 1).reshape(5, -1)
    assert torch.allclose(patches @ w.t(), tokens, atol=1e-4)


def test_target_is_each_patch_normalised_by_its_own_mean_and_variance():
    torch.manual_seed(0)
    x = torch.rand(2, 10, 48) * 5 + 3
    t = norm_pix_target(x)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 10), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 10), atol=1e-4)
    scale = torch.rand(2, 10, 1) + 0.5  # brightness and contrast of a patch do not change its target
    assert torch.allclose(norm_pix_target(x * scale + 7), t, atol=1e-4)


@pytest.mark.parametrize("overrides", TINY_VARIANTS[:2])
def test_the_visible_encoder_is_the_vit_with_positions_kept(overrides):
    """All patches kept: the ViT's own forward. Some dropped: each kept patch keeps its position, so
    the result does not depend on the order the visible patches are given in."""
    cfg = _tiny(**overrides)
    torch.manual_seed(0)
    model = VLModel(cfg)
    images = _batch(cfg, b=2)[0]
    n = cfg.num_patches
    everything = torch.arange(n).expand(2, n)
    assert torch.allclose(encode_visible(model.vision, images, everything), model.vision(images), atol=1e-5)
    keep = torch.tensor([[1, 5, 9, 30], [0, 2, 3, 63]])
    out = encode_visible(model.vision, images, keep)
    flipped = encode_visible(model.vision, images, keep.flip(1))  # attention is order-free given positions
    assert torch.allclose(out[:, 0], flipped[:, 0], atol=1e-5) and torch.allclose(
        out[:, 1:], flipped[:, 1:].flip(1), atol=1e-5
    )
    assert not torch.allclose(out[:, 1:], encode_visible(model.vision, images, (keep + 1) % n)[:, 1:], atol=1e-3)


# ---------------------------------------------------------------- the loss in the model
def test_mim_is_zero_and_not_built_when_its_weight_is_zero():
    cfg = _tiny()
    model = VLModel(cfg, LossConfig())
    assert model.mim_decoder is None
    out = model(*_batch(cfg))
    assert out["mim"].item() == 0.0 and not out["mim"].requires_grad
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_mim_on_or_off_leaves_the_other_losses_and_weights_alone():
    """The decoder is created and initialised after the rest and MIM draws its masks last: the other
    weights, and the other losses of a step, are the same with MIM on, off, or not built."""
    cfg, batch = _tiny(), _batch(_tiny())
    outs, states = [], []
    for loss, mim in ((LossConfig(), None), (LossConfig(), True), (LossConfig(mim=1.0), None)):
        torch.manual_seed(0)
        model = VLModel(cfg, loss, mim=mim)
        states.append(model.state_dict())
        torch.manual_seed(1)
        outs.append(model(*batch))
    for k in ("itc", "mlm", "caption"):
        assert outs[0][k] == outs[1][k] == outs[2][k]
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    assert outs[1]["mim"] == 0 and outs[2]["mim"] > 0
    assert outs[2]["loss"].item() == pytest.approx(outs[0]["loss"].item() + outs[2]["mim"].item(), rel=1e-6)


def test_gradient_reaches_decoder_and_vit_when_on_and_not_the_decoder_when_off():
    cfg = _tiny()
    torch.manual_seed(0)
    model = VLModel(cfg, LossConfig(itc=0.0, mlm=0.0, caption=0.0, mim=1.0))
    model(*_batch(cfg))["loss"].backward()
    decoder_grads = [p.grad for p in model.mim_decoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in decoder_grads)
    assert (
        model.vision.patch_embed.weight.grad.abs().sum() > 0
        and model.vision.blocks["0"].mlp.fc1.weight.grad.abs().sum() > 0
    )
    assert model.embed.tok.weight.grad is None or model.embed.tok.weight.grad.abs().sum() == 0  # MIM alone: no text

    model.zero_grad(set_to_none=True)
    model.loss_cfg = LossConfig(mim=0.0)  # what the loop does at a stage boundary
    out = model(*_batch(cfg))
    out["loss"].backward()
    assert out["mim"] == 0 and all(p.grad is None for p in model.mim_decoder.parameters())
    assert model.vision.patch_embed.weight.grad.abs().sum() > 0


def test_mim_weight_without_the_decoder_is_one_line():
    cfg = _tiny()
    model = VLModel(cfg, LossConfig())
    model.loss_cfg = LossConfig(mim=1.0)
    with pytest.raises(UserError, match=r"^loss\.mim: > 0 but the model was built without its MIM decoder"):
        model(*_batch(cfg))


@pytest.mark.parametrize("overrides", TINY_VARIANTS)
def test_mim_loss_falls_when_trained(overrides):
    """A few AdamW steps on one fixed batch: reconstruction improves (the loss is the MSE of normalised
    pixels, ~1 for a prediction of zeros)."""
    cfg = _tiny(**overrides)
    torch.manual_seed(0)
    model = VLModel(cfg, LossConfig(itc=0.0, mlm=0.0, caption=0.0, mim=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch, losses = _batch(cfg, b=8), []
    for _ in range(8):
        out = model(*batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["mim"].item())
    assert 0.5 < losses[0] < 2.0 and losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------- size and compute
@pytest.mark.parametrize("overrides", TINY_VARIANTS)
def test_param_count_with_mim_is_the_models(overrides):
    cfg = _tiny(**overrides)
    with torch.device("meta"):
        model = VLModel(cfg, mim=True)
    assert param_count(cfg, mim=True) == sum(p.numel() for p in model.parameters())
    assert param_breakdown(cfg, mim=True)["mim"] == sum(p.numel() for p in model.mim_decoder.parameters())
    assert "mim" not in param_breakdown(cfg)


def test_presets_keep_their_size_without_mim_and_get_a_light_decoder_with_it():
    for name in PRESETS:
        cfg = get_preset(name)
        extra = param_count(cfg, mim=True) - param_count(cfg)
        assert 0 < extra < 0.2 * param_breakdown(cfg)["vision"] + 200_000, name
        width, heads, _ = cfg.mim_decoder_shape()
        assert width in (cfg.vision_width // 2, cfg.vision_width) and width % heads == 0


@pytest.mark.parametrize("overrides", TINY_VARIANTS)
def test_mim_flops_match_flop_counter(monkeypatch, overrides):
    """Exact: what MIM adds to the forward's matmuls is `mim_flops_per_sample` per sample."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", _math_sdpa)
    cfg = _tiny(**overrides)
    b, t = 3, 20
    model = VLModel(cfg, mim=True)
    totals = []
    for loss in (LossConfig(), LossConfig(mim=1.0, mim_mask_ratio=0.6)):
        model.loss_cfg = loss
        with FlopCounterMode(display=False) as counter:
            model(*_batch(cfg, b, t))
        totals.append(counter.get_total_flops())
    assert totals[1] - totals[0] == b * mim_flops_per_sample(cfg, 0.6)
    assert forward_flops_per_sample(cfg, t, mim_mask_ratio=0.6) - forward_flops_per_sample(cfg, t) == pytest.approx(
        mim_flops_per_sample(cfg, 0.6)
    )


@pytest.mark.parametrize(
    "overrides, msg",
    [
        ({"mim_decoder_width": 50}, "model.mim_decoder_width: 50 is not divisible by the ViT's head size 24"),
        ({"mim_decoder_width": 48, "mim_decoder_heads": 5}, "model.mim_decoder_width: 48 is not divisible by"),
    ],
)
def test_bad_decoder_shapes_are_one_line(overrides, msg):
    with pytest.raises(UserError, match="^" + msg) as e:
        _tiny(**overrides)
    assert "\n" not in str(e.value)
