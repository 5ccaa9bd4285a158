"""Tensor parallelism (vltrain.parallel.tensor_parallel) and the split q/k/v attention it needs."""

from __future__ import annotations

import pytest
import torch

from tests.test_pipeline_parallel import (
    assert_matches_reference,
    make_batch,
    run_layout,
    tiny_model,
)
from vltrain.model.layers import Attention
from vltrain.parallel.tensor_parallel import block_plan


def _fused(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as the fused-qkv model wrote it (DeepSpeed's module file holds exactly this)."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".attn.q.weight") or k.endswith(".cross.q.weight")]:
        base = key.removesuffix("q.weight")
        for kind in ("weight", "bias"):
            q, k, v = (out.pop(f"{base}{n}.{kind}") for n in ("q", "k", "v"))
            if base.endswith(".attn."):
                out[f"{base}qkv.{kind}"] = torch.cat([q, k, v])
            else:  # cross-attention kept q separate and fused k, v
                out[f"{base}q.{kind}"], out[f"{base}kv.{kind}"] = q, torch.cat([k, v])
    return out


def test_fused_qkv_checkpoint_loads_into_split_attention():
    src = tiny_model()
    old = _fused(src.state_dict())
    assert "vision.blocks.0.attn.qkv.weight" in old and "decoder.blocks.0.cross.kv.bias" in old
    assert not any(k.endswith((".k.weight", ".v.weight")) for k in old)
    torch.manual_seed(123)
    dst = type(src)(src.cfg, src.loss_cfg)  # different random weights
    dst.load_state_dict(old, strict=True)
    for name, p in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], p), name
    images, ids, mask = make_batch(src.cfg, 4)
    torch.manual_seed(5)
    a = src(images, ids, mask)["loss"]
    torch.manual_seed(5)
    assert torch.equal(dst(images, ids, mask)["loss"], a)


def test_attention_matches_fused_math():
    """The split Linears compute what the fused qkv did: same rows of one [3D, D] matrix.

    fp32 default tolerance: one [3D, D] GEMM and three [D, D] GEMMs may block their sums differently.
    """
    torch.manual_seed(0)
    attn = Attention(16, 4)
    x = torch.randn(2, 5, 16)
    w = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight])
    b = torch.cat([attn.q.bias, attn.k.bias, attn.v.bias])
    q, k, v = (t.view(2, 5, 4, 4).transpose(1, 2) for t in torch.nn.functional.linear(x, w, b).chunk(3, dim=-1))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attn(x), attn.out(y.transpose(1, 2).flatten(2)))


def test_block_plan_covers_every_linear_of_attention_and_mlp():
    model = tiny_model()
    for block, cross in ((model.vision.blocks["0"], False), (model.decoder.blocks["0"], True)):
        plan = block_plan(block)
        linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(plan) == linears
        assert any(k.startswith("cross.") for k in plan) is cross


@pytest.mark.slow
def test_tp2_matches_single_process(tmp_path):
    from tests.test_pipeline_parallel import reference_run

    assert_matches_reference(run_layout(tmp_path, world=2, tp=2, pp=1), reference_run())
