"""VLModel on CPU with the tiny preset: shapes, training signal, checkpointing, variants, losses."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vltrain.common.errors import UserError
from vltrain.config import LossConfig
from vltrain.model import VLModel
from vltrain.model.layers import apply_rope, rope_tables
from vltrain.model.losses import itc_loss, mask_tokens
from vltrain.model_config import ModelConfig

PAD, BOS, EOS, MASK = 0, 2, 3, 4


def tiny(**overrides) -> ModelConfig:
    from vltrain.presets import get_preset

    return dataclasses.replace(get_preset("tiny"), **overrides)


def make_batch(cfg: ModelConfig, lengths=(16, 12, 9, 14), seed=1):
    """A batch as the loader yields it: bos + tokens + eos, right-padded, bool mask."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    ids = torch.randint(5, cfg.vocab_size, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1], ids[i, n:] = BOS, EOS, PAD
        mask[i, :n] = True
    images = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    return {"images": images, "input_ids": ids, "attention_mask": mask, "keys": [f"{i:06d}" for i in range(b)]}


def model_and_batch(**overrides):
    cfg = tiny(**overrides)
    torch.manual_seed(0)
    return VLModel(cfg, LossConfig()), make_batch(cfg)


def forward(model, batch):
    return model(batch["images"], batch["input_ids"], batch["attention_mask"])


def test_shapes_and_normalised_embeddings():
    model, batch = model_and_batch()
    e = model.cfg.embed_dim
    img = model.encode_image(batch["images"])
    txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert img.shape == txt.shape == (4, e)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    caps = model.generate(batch["images"], max_len=10)
    assert caps.shape == (4, 10) and caps.dtype == torch.int64
    assert not ((caps == BOS) | (caps == MASK)).any()


def test_text_embedding_ignores_padding():
    model, batch = model_and_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    longer = torch.cat([ids, torch.full((4, 5), PAD)], 1), torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(model.encode_text(ids, mask), model.encode_text(*longer))


def test_loss_parts_finite_and_weighted():
    model, batch = model_and_batch()
    model.loss_cfg = LossConfig(itc=0.5, mlm=2.0, caption=1.0)
    out = forward(model, batch)
    assert all(torch.isfinite(out[k]) and out[k].ndim == 0 for k in ("loss", "itc", "mlm", "caption"))
    assert out["loss"].requires_grad and not out["itc"].requires_grad
    torch.testing.assert_close(out["loss"].detach(), 0.5 * out["itc"] + 2.0 * out["mlm"] + out["caption"])


def test_overfits_a_fixed_batch_and_generate_reproduces_it():
    """20 AdamW steps must cut the loss (every part), then 40 more make greedy decoding recite the captions:
    this also pins generate's alignment (starts after bos, stops at eos, pads after)."""
    model, batch = model_and_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _step in range(60):
        out = forward(model, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    first, at20 = history[0], history[19]
    assert at20["loss"] < 0.6 * first["loss"]
    assert at20["itc"] < first["itc"] and at20["mlm"] < first["mlm"] and at20["caption"] < 0.5 * first["caption"]
    model.eval()
    ids = batch["input_ids"]
    torch.testing.assert_close(model.generate(batch["images"], ids.shape[1] - 1), ids[:, 1:], rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [{}, {"pos_embedding": "rope", "norm": "rmsnorm"}])
def test_activation_checkpointing_same_loss_and_grads(overrides):
    model, batch = model_and_batch(**overrides)
    grads = []
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        model.zero_grad()
        torch.manual_seed(123)  # same MLM masking in both runs
        out = forward(model, batch)
        out["loss"].backward()
        grads.append((out["loss"].detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l0, l1)
    assert len(g0) == len(g1) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g0, g1))


@pytest.mark.parametrize(
    "overrides",
    [
        {"pos_embedding": "rope"},
        {"norm": "rmsnorm"},
        {"pos_embedding": "rope", "norm": "rmsnorm", "text_layers": 0},
    ],
)
def test_variants_train(overrides):
    model, batch = model_and_batch(**overrides)
    out = forward(model, batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_model_takes_the_float32_batch():
    """DeepSpeed's bf16 mode casts the model, not the batch: the float32 images must still work."""
    model, batch = model_and_batch(pos_embedding="rope", norm="rmsnorm")
    model.to(torch.bfloat16)
    out = forward(model, batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.vision.patch_embed.weight.grad.dtype == torch.bfloat16
    assert model.generate(batch["images"], 5).shape == (4, 5)


def test_rope_depends_only_on_relative_position():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)

    def score(pq, pk):
        cq, sq = rope_tables(torch.tensor([[pq]]), 16)
        ck, sk = rope_tables(torch.tensor([[pk]]), 16)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(3, 1), score(10, 8))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_image_size_must_divide_by_patch():
    with pytest.raises(UserError, match="model.image_size: 30 is not divisible by model.patch_size 4"):
        tiny(image_size=30)


def test_wrong_image_size_is_a_user_error():
    model, _batch = model_and_batch()
    with pytest.raises(UserError, match="images: size"):
        model.encode_image(torch.randn(2, 3, 64, 64))


def test_mask_tokens_spares_specials_and_follows_the_rate():
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (64, 48))
    ids[:, 0], ids[:, 40], ids[:, 41:] = BOS, EOS, PAD
    mask = ids != PAD
    torch.manual_seed(7)
    masked, labels = mask_tokens(
        ids, mask, mask_prob=0.15, mask_id=MASK, vocab_size=1000, special_ids=(PAD, BOS, EOS, MASK)
    )
    chosen = labels != -100
    assert not chosen[:, [0, 40]].any() and not chosen[:, 41:].any()
    assert (masked[~chosen] == ids[~chosen]).all() and (labels[chosen] == ids[chosen]).all()
    rate = chosen.float().sum() / (64 * 39)
    assert 0.12 < rate < 0.18
    frac_mask = (masked[chosen] == MASK).float().mean()
    assert 0.7 < frac_mask < 0.9
    torch.manual_seed(7)
    again, _ = mask_tokens(ids, mask, mask_prob=0.15, mask_id=MASK, vocab_size=1000, special_ids=(PAD, BOS, EOS, MASK))
    assert torch.equal(masked, again)  # torch's global RNG: restoring its state reproduces the masking


def test_logit_scale_starts_at_the_configured_temperature():
    model = VLModel(tiny(), LossConfig(init_temperature=0.05))
    assert abs(model.logit_scale.exp().item() - 20.0) < 1e-3


def _itc_rank(rank: int, world: int, init_file: str, img, txt, scale, result):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = img.shape[0] // world
    i = img[rank * b : (rank + 1) * b].clone().requires_grad_()
    t = txt[rank * b : (rank + 1) * b].clone().requires_grad_()
    loss = itc_loss(i, t, scale)
    loss.backward()
    result[rank] = (loss.detach(), i.grad, t.grad)
    dist.destroy_process_group()


def test_itc_uses_negatives_from_every_rank(tmp_path):
    """Two gloo ranks: the mean of the rank losses is the one-process loss on the whole batch, and each
    rank's gradient (through the differentiable all_gather) is `world` times the full-batch one."""
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(2.0)
    full_i, full_t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    full = itc_loss(full_i, full_t, scale)
    full.backward()
    result = mp.Manager().dict()
    mp.spawn(_itc_rank, args=(2, str(tmp_path / "init"), img, txt, scale, result), nprocs=2)
    torch.testing.assert_close((result[0][0] + result[1][0]) / 2, full.detach())
    for r in (0, 1):
        torch.testing.assert_close(result[r][1], 2 * full_i.grad[r * 4 : (r + 1) * 4])
        torch.testing.assert_close(result[r][2], 2 * full_t.grad[r * 4 : (r + 1) * 4])
