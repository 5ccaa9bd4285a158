"""SentencePiece tokenizer: training on captions, loading, batch encoding with the agreed special ids.

Ids: pad=0, unk=1, bos=2, eos=3 and the user-defined "<mask>" = 4 (docs/data.md). The model type is
BPE (as in LLaMA's SentencePiece tokenizer) rather than SentencePiece's default unigram: on a
narrow corpus such as the synthetic captions, unigram cannot grow past about one piece per distinct
word (~260 here), while BPE keeps its intermediate merges and trains a ~1000-piece vocabulary.
torch is imported only by `encode_batch`, so training a tokenizer stays light.
"""

from __future__ import annotations

import io
import itertools
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vltrain.common.atomic import atomic_write
from vltrain.common.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_PIECE = "<mask>"
MAX_SENTENCES = 2_000_000  # sentences SentencePiece samples from a larger corpus (its own default is 1M)


class Tokenizer:
    """A loaded SentencePiece model; picklable (it carries its serialized proto) for DataLoader workers."""

    def __init__(self, model_proto: bytes, path: str = "<memory>"):
        self._open(model_proto, path)

    def _open(self, model_proto: bytes, path: str) -> None:
        """Load the proto and check its special ids (construction and unpickling)."""
        import sentencepiece as spm

        self.path = path
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        ids = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.piece_to_id(MASK_PIECE))
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID):
            raise UserError(
                f"data.tokenizer: {path} has special ids {ids} for pad/unk/bos/eos/<mask>; "
                f"allowed: a model from `vltrain tokenizer train` (0, 1, 2, 3, 4)"
            )
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id = ids
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        try:
            proto = Path(path).read_bytes()
        except OSError:
            raise UserError(
                f"data.tokenizer: {path} cannot be read; allowed: a SentencePiece .model file "
                f"from `vltrain tokenizer train`"
            ) from None
        try:
            return cls(proto, str(path))
        except (RuntimeError, OSError):
            raise UserError(
                f"data.tokenizer: {path} is not a SentencePiece model; allowed: a .model file "
                f"from `vltrain tokenizer train`"
            ) from None

    def __getstate__(self) -> dict:
        return {"model_proto": self._proto, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self._open(state["model_proto"], state["path"])

    def encode(self, text: str) -> list[int]:
        """Pieces only, without bos/eos."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], max_len: int, pad_to_max: bool = False):
        """(ids int64 [B,T], mask bool [B,T]): bos + pieces + eos, cut to max_len keeping eos, right-padded.

        T is the longest row (at most max_len), or max_len with pad_to_max (fixed shapes).
        """
        import torch

        if max_len < 3:
            raise ValueError(f"max_len {max_len} leaves no room for a token between bos and eos")
        rows = [[self.bos_id, *pieces[: max_len - 2], self.eos_id] for pieces in self.sp.encode(list(texts))]
        width = max_len if pad_to_max else max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids, ids != self.pad_id

    def decode(self, ids) -> str:
        """Text of a row of ids: stops at the first eos; pad, bos and <mask> are dropped."""
        out = []
        for i in ids.tolist() if hasattr(ids, "tolist") else ids:
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id, self.mask_id):
                out.append(int(i))
        return self.sp.decode(out)


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_path: str | Path, seed: int = 0, character_coverage: float = 1.0
) -> Tokenizer:
    """Train a BPE SentencePiece model on texts and write it atomically to out_path.

    A vocabulary the corpus cannot fill is a one-line UserError naming the largest size that fits
    (SentencePiece finds this in well under a second on caption corpora, before the merges run).
    character_coverage 1.0 gives every character seen a piece, so no caption of the corpus maps to
    unk; SentencePiece suggests 0.9995 for corpora with large character sets (CJK web text).
    """
    import sentencepiece as spm

    lines = (line for line in (t.replace("\n", " ").strip() for t in texts) if line)
    first = next(lines, None)  # streamed: SentencePiece samples at most MAX_SENTENCES itself
    if first is None:
        raise UserError("--shards: no captions found; allowed: shards with KEY.txt captions")
    if vocab_size < 8:
        raise UserError(f"--vocab-size: {vocab_size}; allowed: at least 8")
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type="bpe",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=[MASK_PIECE],
            character_coverage=character_coverage,
            input_sentence_size=MAX_SENTENCES,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e)
        if m := _TOO_HIGH.search(msg):
            raise UserError(
                f"--vocab-size: {vocab_size} is too large for this corpus; allowed: at most {m.group(2)}"
            ) from None
        if m := _TOO_LOW.search(msg):
            raise UserError(
                f"--vocab-size: {vocab_size} is too small for this corpus; allowed: at least {m.group(2)}"
            ) from None
        raise
    out = Path(out_path)
    atomic_write(out, buf.getvalue(), mode=None)
    return Tokenizer(buf.getvalue(), str(out))


def shard_captions(shards: str | Path) -> Iterator[str]:
    """Captions (KEY.txt) of the shards, streamed without reading the images' bytes into samples."""
    from vltrain.data.shards import iter_samples, resolve_shards

    for sample in iter_samples(resolve_shards(shards, what="--shards"), select=lambda name: name.endswith(".txt")):
        if "txt" in sample:
            yield sample["txt"].decode("utf-8")


def train_tokenizer_from_shards(shards: str | Path, vocab_size: int, out_path: str | Path, seed: int = 0) -> Tokenizer:
    return train_tokenizer(shard_captions(shards), vocab_size, out_path, seed=seed)


def tokenizer_for_run(path: Path, shards: str, vocab_size: int, seed: int, is_main: bool, comm: Any) -> Tokenizer:
    """Collective: the run's tokenizer at `path` (data.tokenizer, or the run directory's), trained by rank 0
    on the shards' captions when it is not there yet; every rank gets rank 0's error, if any, as its own."""
    error: list[str | None] = [None]
    if is_main and not path.is_file():
        try:
            train_tokenizer_from_shards(shards, vocab_size, path, seed=seed)
        except UserError as e:  # "--vocab-size: V is too large for this corpus; allowed: at most N"
            msg = str(e).replace("--vocab-size", "model.vocab_size")
            error = [msg.replace("this corpus", f"the captions of {shards}")]
    comm.broadcast_objects(error, src=0)
    if error[0]:
        raise UserError(error[0])
    tok = Tokenizer.load(path)
    if tok.vocab_size != vocab_size:
        raise UserError(
            f"model.vocab_size: {vocab_size} but the tokenizer {path} has {tok.vocab_size} "
            f"pieces; allowed: equal sizes (vltrain tokenizer train --vocab-size {vocab_size})"
        )
    return tok
