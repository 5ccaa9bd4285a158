"""Presets and the torch-free model math against the real model (meta device, FLOP counter, saved tensors)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vltrain.common.errors import UserError
from vltrain.model import VLModel
from vltrain.model_config import ModelConfig
from vltrain.model_math import activation_bytes_per_sample, forward_flops_per_sample, param_breakdown, param_count
from vltrain.presets import PAPER_TOTALS, PRESETS, get_preset

TINY_VARIANTS = [{}, {"pos_embedding": "rope", "norm": "rmsnorm"}, {"text_layers": 0, "mlp_ratio": 2.5}]


def _meta_numel(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        m = VLModel(cfg)
    parts = {
        "vision": m.vision,
        "text": (m.embed, m.text.blocks, m.text.unimodal_norm),
        "fusion": (m.text.fusion, m.text.norm),
        "decoder": m.decoder,
        "heads": (m.image_proj, m.text_proj),
    }
    count = {
        k: sum(p.numel() for mod in (v if isinstance(v, tuple) else (v,)) for p in mod.parameters())
        for k, v in parts.items()
    }
    count["heads"] += m.logit_scale.numel()
    count["total"] = sum(p.numel() for p in m.parameters())
    return count


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_equals_meta_model(name):
    cfg = get_preset(name)
    measured = _meta_numel(cfg)
    assert param_count(cfg) == measured.pop("total")
    assert param_breakdown(cfg) == measured  # per part, and the parts cover every parameter


@pytest.mark.parametrize("overrides", TINY_VARIANTS)
def test_param_count_variants(overrides):
    cfg = dataclasses.replace(get_preset("tiny"), **overrides)
    assert param_count(cfg) == _meta_numel(cfg)["total"]


@pytest.mark.parametrize("name", list(PAPER_TOTALS))
def test_paper_presets_match_seed_totals(name):
    _, total = PAPER_TOTALS[name]
    assert abs(param_count(get_preset(name)) / total - 1) < 0.01


def test_crossmodal_xl_split():
    # seed 002: "roughly 18B dedicated to the textual encoder and 12.5B to the visual encoder and fusion"
    b = param_breakdown(get_preset("crossmodal-xl"))
    assert abs(b["text"] / 18e9 - 1) < 0.02
    assert abs((b["vision"] + b["fusion"] + b["decoder"] + b["heads"]) / 12.5e9 - 1) < 0.02


@pytest.mark.parametrize(
    "name, image, vocab, text_len, extra",
    [
        ("crossmodal-xl", 224, 64_000, 77, {}),  # seed 002
        ("vl-30b", 224, 64_000, None, {}),  # seed 001
        ("vl-22b", 336, 65_000, None, {"pos_embedding": "rope", "norm": "rmsnorm"}),  # seed 003
        ("vl-seed004", 256, 32_000, 1024, {}),  # seed 004
    ],
)
def test_seed_facts(name, image, vocab, text_len, extra):
    cfg = get_preset(name)
    assert (cfg.image_size, cfg.vocab_size) == (image, vocab)
    assert text_len is None or cfg.max_text_len == text_len
    assert all(getattr(cfg, k) == v for k, v in extra.items())
    assert cfg.name == name


def test_tiny_is_cpu_sized():
    cfg = get_preset("tiny")
    assert param_count(cfg) < 2_000_000 and cfg.image_size <= 64 and cfg.vocab_size <= 1024


def test_unknown_preset_lists_allowed():
    with pytest.raises(UserError, match=r"model: unknown preset 'huge'; allowed: tiny, small, base, .*vl-seed004"):
        get_preset("huge")


def test_model_math_and_presets_do_not_import_torch():
    code = "import sys, vltrain.model_math, vltrain.presets; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _math_sdpa(q, k, v, attn_mask=None, is_causal=False, **_):
    # Plain matmul attention: FlopCounterMode has no formula for the CPU flash kernel, but counts bmm.
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return s.softmax(-1) @ v


def _batch(cfg: ModelConfig, b: int, t: int):
    ids = torch.randint(5, cfg.vocab_size, (b, t))
    ids[:, 0], ids[:, -1] = 2, 3
    return torch.randn(b, 3, cfg.image_size, cfg.image_size), ids, torch.ones(b, t, dtype=torch.bool)


@pytest.mark.parametrize("overrides", TINY_VARIANTS)
def test_forward_flops_match_flop_counter(monkeypatch, overrides):
    """Exact: the formula counts every matmul of the forward except the two B x B contrastive
    similarity matrices (2*B*B*E FLOPs each), which depend on the batch and are added here."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", _math_sdpa)
    cfg = dataclasses.replace(get_preset("tiny"), **overrides)
    b, t = 3, 20
    with FlopCounterMode(display=False) as counter:
        VLModel(cfg)(*_batch(cfg, b, t))
    assert counter.get_total_flops() == b * forward_flops_per_sample(cfg, t) + 2 * 2 * b * b * cfg.embed_dim


def test_flops_grow_with_text_len():
    cfg = get_preset("tiny")
    assert forward_flops_per_sample(cfg) == forward_flops_per_sample(cfg, cfg.max_text_len)
    assert forward_flops_per_sample(cfg, 16) < forward_flops_per_sample(cfg, 32)


def _saved_bytes_per_sample(cfg: ModelConfig, checkpointing: bool, b: int = 4) -> float:
    """Bytes autograd keeps for backward after the forward (parameters excluded, shared storage once)."""
    torch.manual_seed(0)
    model = VLModel(cfg)
    model.set_activation_checkpointing(checkpointing)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*_batch(cfg, b, cfg.max_text_len))
    return sum(kept.values()) / b


def test_activation_bytes_bound_the_measured_ones():
    """The Korthikanti formula counts dropout masks and 2-byte softmax copies that our model does not
    keep, so it is an upper bound: within 2x of what autograd really saves (fp32, so bytes_per_el=4).
    With checkpointing, autograd keeps only block inputs; the formula adds one block's working set."""
    cfg = get_preset("tiny")
    plain, ckpt = (_saved_bytes_per_sample(cfg, c) for c in (False, True))
    assert plain <= activation_bytes_per_sample(cfg, False, 4) <= 2 * plain
    assert ckpt <= activation_bytes_per_sample(cfg, True, 4) < activation_bytes_per_sample(cfg, False, 4)
    assert ckpt < plain / 3


@pytest.mark.parametrize("name", list(PRESETS))
def test_checkpointing_saves_memory_for_every_preset(name):
    cfg = get_preset(name)
    assert 0 < activation_bytes_per_sample(cfg, True) < activation_bytes_per_sample(cfg, False)
    assert activation_bytes_per_sample(cfg, False, 4) > activation_bytes_per_sample(cfg, False, 2)
