"""Tokenizer: training on shard captions, special ids, batch encoding, round trip, vocabulary limits."""

from __future__ import annotations

import pickle
import re

import pytest
import torch

from vltrain.common.errors import UserError
from vltrain.data.synth import write_synthetic_shards
from vltrain.tokenizer import Tokenizer, shard_captions, train_tokenizer, train_tokenizer_from_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_synthetic_shards(root, 150, 2, seed=11, image_size=16)
    return root


@pytest.fixture(scope="module")
def tok(shards):
    return train_tokenizer_from_shards(shards, 250, shards / "out" / "tok.model")


def test_special_ids_and_vocab(tok, shards):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.sp.id_to_piece(4) == "<mask>" and tok.vocab_size == 250
    loaded = Tokenizer.load(shards / "out" / "tok.model")
    assert loaded.vocab_size == 250 and not list((shards / "out").glob("*.tmp"))


def test_round_trip_on_the_corpus(tok, shards):
    captions = list(shard_captions(shards))
    assert len(captions) == 150
    for text in captions:
        ids = tok.encode(text)
        assert tok.unk_id not in ids and tok.decode(ids) == text


def test_encode_batch_layout(tok):
    texts = ["a red disk on the left", "three tiny cyan hexagons at the bottom against a gray background"]
    ids, mask = tok.encode_batch(texts, max_len=64)
    lengths = [len(tok.encode(t)) + 2 for t in texts]
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool and ids.shape == (2, max(lengths))
    for row, m, n in zip(ids, mask, lengths):
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id and row[n:].eq(tok.pad_id).all()
        assert m.sum() == n and m[:n].all()
    assert [tok.decode(r) for r in ids] == texts
    short, short_mask = tok.encode_batch(texts, max_len=5)
    assert short.shape == (2, 5) and short[:, -1].eq(tok.eos_id).all() and short_mask.all()
    fixed, _ = tok.encode_batch(texts[:1], max_len=64, pad_to_max=True)
    assert fixed.shape == (1, 64)


def test_decode_stops_at_eos_and_skips_specials(tok):
    body = tok.encode("a blue star")
    assert tok.decode([tok.bos_id, *body, tok.eos_id, *tok.encode("junk"), tok.pad_id]) == "a blue star"
    assert tok.decode(torch.tensor([tok.bos_id, tok.mask_id, *body])) == "a blue star"


def test_too_large_vocab_names_the_limit_and_the_limit_trains(shards, tmp_path):
    captions = list(shard_captions(shards))
    with pytest.raises(UserError) as err:
        train_tokenizer(captions, 5000, tmp_path / "big.model")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("--vocab-size: 5000 is too large for this corpus; allowed: at most ")
    limit = int(re.search(r"at most (\d+)", msg).group(1))
    assert not (tmp_path / "big.model").exists()
    assert train_tokenizer(captions, limit, tmp_path / "limit.model").vocab_size == limit
    with pytest.raises(UserError, match="too small for this corpus; allowed: at least"):
        train_tokenizer(captions, 10, tmp_path / "small.model")


def test_training_is_deterministic(shards, tmp_path):
    captions = list(shard_captions(shards))
    train_tokenizer(captions, 200, tmp_path / "a.model")
    train_tokenizer(captions, 200, tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no captions"):
        train_tokenizer(["", "  "], 100, tmp_path / "x.model")
    with pytest.raises(UserError, match="cannot be read"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")


def test_pickles_for_dataloader_workers(tok):
    clone = pickle.loads(pickle.dumps(tok))
    text = "two pink stars on the right"
    assert clone.encode(text) == tok.encode(text) and clone.vocab_size == tok.vocab_size
