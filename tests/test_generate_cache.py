"""Greedy captioning with a KV cache (vltrain.model.generate) against VLModel.generate, which re-runs the
decoder over the whole prefix at every step: the same tokens, and one token per row through each decoder
block per step instead of the whole prefix."""

from __future__ import annotations

import pytest
import torch

from tests.test_model import PAD, forward, model_and_batch
from vltrain.common.errors import UserError
from vltrain.model.generate import greedy_captions


def count_decoder_tokens(model) -> tuple[list[int], list]:
    """Rows x positions that enter the first decoder block's MLP, one entry per call (the decoder's work)."""
    calls: list[int] = []
    block = next(iter(model.decoder.blocks.values()))
    hook = block.mlp.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0] * args[0].shape[1]))
    return calls, [hook]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"pos_embedding": "rope", "norm": "rmsnorm"}, {"decoder_layers": 3}],
    ids=["learned-positions", "rope", "three-blocks"],
)
def test_cached_greedy_equals_recomputed_token_for_token(overrides):
    model, batch = model_and_batch(**overrides)
    model.eval()
    with torch.no_grad():
        reference = model.generate(batch["images"], 12)
        cached = greedy_captions(model, batch["images"], 12)
    torch.testing.assert_close(cached, reference, rtol=0, atol=0)


def test_cached_greedy_stops_and_pads_as_the_reference_on_a_trained_model():
    """Overfitted to recite the batch's captions (each ends in eos at a different step): the cache path
    must stop rows at eos and pad after, as the reference does."""
    model, batch = model_and_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = forward(model, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        cached = greedy_captions(model, batch["images"], ids.shape[1] - 1)
        reference = model.generate(batch["images"], ids.shape[1] - 1)
    torch.testing.assert_close(cached, reference, rtol=0, atol=0)
    assert (cached == PAD).any()  # some rows ended before the others (what the test is about)
    torch.testing.assert_close(cached, ids[:, 1:], rtol=0, atol=0)


def test_each_step_runs_the_decoder_on_the_new_token_only():
    model, batch = model_and_batch()
    model.eval()
    b, steps = batch["images"].shape[0], 10
    never = lambda done: False  # run every step: the random model may end a row early
    calls, hooks = count_decoder_tokens(model)
    with torch.no_grad():
        greedy_captions(model, batch["images"], steps, all_done=never)
    assert calls == [b] * steps  # O(1) per step: B new tokens, not the prefix
    calls.clear()
    with torch.no_grad():
        out = model.generate(batch["images"], steps)
    for h in hooks:
        h.remove()
    # the reference: the whole prefix each step (1 + 2 + ... tokens per row), which the cache removes
    assert calls == [b * (t + 1) for t in range(len(calls))] and (len(calls) == steps or (out == PAD).any())


def test_max_len_outside_the_model_is_refused():
    model, batch = model_and_batch()
    with pytest.raises(UserError, match="generate: max_len 0; allowed: 1 to"):
        greedy_captions(model, batch["images"], 0)
