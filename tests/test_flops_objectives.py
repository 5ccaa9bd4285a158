"""Model FLOPs by objective (vltrain.model_math): what MFU counts when some loss weights are 0."""

from __future__ import annotations

import dataclasses

import pytest
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tests.test_presets import _batch, _math_sdpa
from vltrain.config import LossConfig
from vltrain.model import VLModel
from vltrain.model_math import (
    active_objectives,
    forward_flops_breakdown,
    forward_flops_per_sample,
)
from vltrain.presets import get_preset


def test_breakdown_matches_the_modules_flop_counts(monkeypatch):
    """Exact, per module: the ViT is the "vision" part, the decoder the "caption" part less the tied
    head's logits, the two projections are in "itc"; the parts add up to the whole forward."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", _math_sdpa)
    cfg = dataclasses.replace(get_preset("tiny"), decoder_layers=2, fusion_layers=1)
    b, t = 3, 20
    with FlopCounterMode(display=False) as counter:
        VLModel(cfg)(*_batch(cfg, b, t))
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    parts = forward_flops_breakdown(cfg, t)
    logits = 2 * t * cfg.text_width * cfg.vocab_size
    assert by_module["VLModel.vision"] == b * parts["vision"]
    assert by_module["VLModel.decoder"] == b * (parts["caption"] - logits)
    projections = by_module["VLModel.image_proj"] + by_module["VLModel.text_proj"]
    assert projections == b * 2 * (cfg.vision_width + cfg.text_width) * cfg.embed_dim
    assert sum(parts.values()) == forward_flops_per_sample(cfg, t)


def test_objectives_count_only_what_they_need():
    cfg = get_preset("base")
    parts = forward_flops_breakdown(cfg, mim_mask_ratio=0.75)
    whole = forward_flops_per_sample(cfg, mim_mask_ratio=0.75)
    assert whole == pytest.approx(sum(parts.values()))
    assert forward_flops_per_sample(cfg, objectives=("itc",)) == pytest.approx(parts["vision"] + parts["itc"])
    assert forward_flops_per_sample(cfg, objectives=("caption", "itc")) == pytest.approx(
        parts["vision"] + parts["itc"] + parts["caption"]
    )
    # MIM alone runs its own ViT pass over the visible patches, not the full one
    assert forward_flops_per_sample(cfg, mim_mask_ratio=0.75, objectives=("mim",)) == pytest.approx(parts["mim"])
    assert forward_flops_per_sample(cfg, objectives=("itc", "mlm", "caption")) == forward_flops_per_sample(cfg)


def test_active_objectives_are_the_weights_above_zero():
    assert active_objectives(LossConfig()) == ("itc", "mlm", "caption")
    assert active_objectives(LossConfig(mlm=0.0, caption=0.0, mim=1.0)) == ("itc", "mim")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"objectives": ("itc", "contrastive")}, "objectives"), ({"objectives": ("mim",)}, "mim_mask_ratio")],
)
def test_bad_objectives_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        forward_flops_per_sample(get_preset("tiny"), **kwargs)
    assert "\n" not in str(err.value) and "allowed" in str(err.value)
