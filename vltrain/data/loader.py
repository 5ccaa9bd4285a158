"""The training/eval data loader: deterministic order, rank and worker split, exact resume.

Contract (docs/data.md, "Order and resume"):
- Epoch e's order is a pure function of (seed, e): a seeded permutation of the shards, cut into
  blocks of whole shards holding at least `shuffle_buffer` samples, each block shuffled by its own
  seeded permutation (shuffle_buffer <= a shard's size is a within-shard shuffle; 0 keeps tar order).
- Training splits shards over ranks (shard i -> rank i mod W, vltrain.data.index_math.rank_shards):
  a rank opens and holds only its shards' indexes, and its epoch order is the above over its shards
  (seeded with its rank too). Every rank takes the smallest rank's sample count per epoch (counted
  from img2dataset's stats files, not the indexes), dropping the rest of its own order (a different
  tail each epoch), so all take the same number of steps. With fewer shards than ranks, and in
  evaluation (train=False: tar order, nothing dropped), ranks interleave positions r, r+W, ... over
  every shard instead.
- A rank's samples form one stream across epochs; batch n is stream items [nB, (n+1)B), so a batch
  may straddle an epoch boundary. DataLoader worker w builds batches n = w, w+k, ... and torch
  returns them round-robin, so the batch sequence does not depend on the worker count.
- The position is (epoch, samples of this epoch the rank has consumed), counted as batches are
  handed out. Resuming recomputes the order and seeks by tar offset: skipped samples are not read.
- Augmentation draws from a generator seeded by (seed, epoch, key); so do MLM's masking numbers
  (training batches' "mlm_draws", another stream): the mask of a sample is the same whatever the
  worker count, micro batch, world size or padding.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vltrain.common.errors import UserError
from vltrain.config import DataConfig
from vltrain.data.shards import IMAGE_EXTS, ShardIndex, rank_index, read_member, resolve_shards, shard_index
from vltrain.data.transforms import ImageTransform

STATE_VERSION = 2  # 2: shards split over ranks in training (1: positions interleaved over all shards)
_SHARD_PERM, _BLOCK_PERM, _AUGMENT, _MLM = 0, 1, 2, 3  # stream tags: independent seeded generators


def key_digest(key: str) -> int:
    """A stable 64-bit number for a sample key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class EpochOrder:
    """Epoch position -> (shard, sample in shard), without materialising the whole epoch's order."""

    def __init__(
        self, sizes: list[int], seed: int, epoch: int, shuffle: bool, block_samples: int, stream: tuple[int, ...] = ()
    ):
        self.seed, self.epoch, self.shuffle, self.stream = seed, epoch, shuffle and block_samples > 0, stream
        order = (
            np.random.default_rng([seed, epoch, _SHARD_PERM, *stream]).permutation(len(sizes))
            if shuffle
            else range(len(sizes))
        )
        self.blocks: list[list[int]] = [[]]
        filled = 0
        for shard in order:
            if filled >= max(block_samples, 1) and self.blocks[-1]:
                self.blocks.append([])
                filled = 0
            self.blocks[-1].append(int(shard))
            filled += sizes[shard]
        self.sizes = sizes
        self.starts = [0, *itertools.accumulate(sum(sizes[s] for s in b) for b in self.blocks)]
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.starts[-1]

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != b:
            shards = np.concatenate([np.full(self.sizes[s], s) for s in self.blocks[b]])
            local = np.concatenate([np.arange(self.sizes[s]) for s in self.blocks[b]])
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.epoch, _BLOCK_PERM, b, *self.stream]).permutation(
                    len(shards)
                )
                shards, local = shards[perm], local[perm]
            self._cached = (b, shards, local)
        return self._cached[1], self._cached[2]

    def __getitem__(self, pos: int) -> tuple[int, int]:
        b = bisect.bisect_right(self.starts, pos) - 1
        shards, local = self._block(b)
        return int(shards[pos - self.starts[b]]), int(local[pos - self.starts[b]])


class _Batches(torch.utils.data.IterableDataset):
    """The batches of one rank from a start position; each DataLoader worker builds every k-th batch."""

    def __init__(
        self,
        index: list[ShardIndex],
        plan: dict[str, Any],
        transform: ImageTransform,
        tokenizer,
        max_len: int,
        pad_to_max: bool = False,
    ):
        super().__init__()
        self.index, self.plan, self.transform, self.tokenizer, self.max_len = index, plan, transform, tokenizer, max_len
        self.pad_to_max = pad_to_max
        self.sizes = [len(s) for s in index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        p = self.plan
        handles: OrderedDict[str, Any] = OrderedDict()
        orders: dict[int, EpochOrder] = {}
        try:
            for n in itertools.count(worker, workers):
                first = p["start"] + n * p["batch_size"]
                last = first + p["batch_size"]
                if not p["train"]:
                    last = min(last, p["per_rank"])
                    if first >= last:
                        return
                items = []
                for s in range(first, last):
                    epoch, k = divmod(s, p["per_rank"])
                    if epoch not in orders:
                        order = EpochOrder(self.sizes, p["seed"], epoch, p["train"], p["block"], p["stream"])
                        orders = {epoch: order}
                    items.append((epoch, *orders[epoch][k * p["stride"] + p["offset"]]))
                yield self._batch(items, handles)
        finally:
            for h in handles.values():
                h.close()

    def _read(self, handles: OrderedDict, path: str, offset: int, key: str, exts: tuple[str, ...]) -> bytes:
        """A member's data; read_member checks its header against the index (name, inside the tar)."""
        if path not in handles:
            if len(handles) >= 8:  # a few open shards per worker: blocks span shards, the order is local
                handles.popitem(last=False)[1].close()
            handles[path] = open(path, "rb")  # noqa: SIM115 - a small cache of open shards, closed on eviction
        handles.move_to_end(path)
        return read_member(handles[path], offset, path, key, exts)

    def _batch(self, items: list[tuple[int, int, int]], handles: OrderedDict) -> dict[str, Any]:
        images, texts, keys = [], [], []
        for epoch, shard, i in items:
            idx = self.index[shard]
            key = idx.key(i)
            text = _caption(self._read(handles, idx.path, idx.text(i), key, ("txt",)), idx.path, key)
            rng = np.random.default_rng([self.plan["seed"], epoch, _AUGMENT, key_digest(key)])
            image, text = self.transform(self._read(handles, idx.path, idx.image(i), key, IMAGE_EXTS), text, rng)
            images.append(image)
            texts.append(text)
            keys.append(key)
        input_ids, attention_mask = self.tokenizer.encode_batch(texts, self.max_len, pad_to_max=self.pad_to_max)
        batch = {
            "images": torch.from_numpy(np.stack(images)),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "keys": keys,
            "captions": texts,
        }
        if self.plan["train"]:
            seeds = [[self.plan["seed"], epoch, _MLM, key_digest(key)] for (epoch, _, _), key in zip(items, keys)]
            batch["mlm_draws"] = mlm_draws(seeds, attention_mask)
        return batch


def _caption(raw: bytes, path: str, key: str) -> str:
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise UserError(
            f"data.shards: {path}: sample {key[:120]!r}: its caption is not UTF-8 ({e.reason} at byte {e.start}); "
            "allowed: UTF-8 captions in KEY.txt"
        ) from None


def mlm_draws(seeds: list[list[int]], attention_mask: torch.Tensor) -> torch.Tensor:
    """MLM's random numbers for a batch: float32 [3, B, T], uniform in [0, 1) at each real token (the
    choice, the <mask>/random/keep roll, the random token; vltrain.model.losses.mask_tokens), drawn from
    a generator per sample seeded by `seeds[b]`, in text order; 1.0 at padding. Pure."""
    mask = attention_mask.numpy().astype(bool)
    out = np.ones((3, *mask.shape), dtype=np.float32)
    for b, seed in enumerate(seeds):
        out[:, b, mask[b]] = np.random.default_rng(seed).random((3, int(mask[b].sum())), dtype=np.float32)
    return torch.from_numpy(out)


class ShardLoader:
    """Batches {"images", "input_ids", "attention_mask", "keys", "captions"} for one rank.

    train=True never ends (epoch after epoch); train=False is one pass in tar order, after which the
    position returns to the start. Call load_state_dict before iterating; one iterator at a time.
    Text is padded to the batch's longest caption, or to `max_len` with pad_to_max (fixed shapes, as
    pipeline stages need).
    """

    def __init__(
        self,
        shards: str,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        image_size: int,
        tokenizer,
        max_len: int,
        train: bool,
        data_cfg: DataConfig | None = None,
        workers: int | None = None,
        pin_memory: bool = False,
        pad_to_max: bool = False,
    ):
        cfg = data_cfg or DataConfig()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1:
            raise UserError(f"batch size: {batch_size}; allowed: 1 or more samples")
        paths = resolve_shards(shards)
        self.split = train and len(paths) >= world_size  # shards split over ranks, else positions interleaved
        self.rank, self.world_size, self.batch_size, self.seed, self.train = rank, world_size, batch_size, seed, train
        if self.split:
            self.index, self.num_samples, self.samples_per_epoch = rank_index(paths, rank, world_size)
        else:
            self.index = [s for s in (shard_index(p) for p in paths) if len(s)]  # every shard, beside the tars
            self.num_samples = sum(len(s) for s in self.index)
            self.samples_per_epoch = (
                self.num_samples // world_size if train else len(range(rank, self.num_samples, world_size))
            )
        if self.samples_per_epoch == 0:
            raise UserError(
                f"data.shards: {shards} holds {self.num_samples} samples, fewer than one per rank for each of the "
                f"{world_size} ranks' shards; allowed: at least one sample per rank"
            )
        self.workers = max(0, cfg.workers if workers is None else workers)  # -1 (auto) is the trainer's to size
        self.pin_memory = pin_memory
        self.block = cfg.shuffle_buffer
        self.transform = ImageTransform(image_size, train, cfg.random_crop, cfg.hflip, cfg.randaugment)
        self.tokenizer, self.max_len, self.pad_to_max = tokenizer, max_len, pad_to_max
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "per_rank": self.samples_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version", 1) < 2 and self.split and self.world_size > 1:
            raise UserError(
                "checkpoint data state: version 1 (ranks interleaved over every shard), but this loader splits "
                "shards over ranks; allowed: resume with the vltrain that wrote it, or a world size of 1"
            )
        for name in ("seed", "world_size", "num_samples"):
            if state.get(name) != getattr(self, name):
                raise UserError(
                    f"checkpoint data state: {name} is {state.get(name)} but this run has "
                    f"{getattr(self, name)}; allowed: resume with the same data, seed and world size"
                )
        position = int(state["position"])
        if state.get("per_rank", self.samples_per_epoch) != self.samples_per_epoch:  # another rank count's state,
            position = position * self.samples_per_epoch // int(state["per_rank"])  # remapped: the same share
        if not 0 <= position < self.samples_per_epoch:
            raise UserError(
                f"checkpoint data state: position {state['position']} outside this rank's "
                f"{self.samples_per_epoch} samples per epoch; allowed: a state from this loader"
            )
        self.epoch, self.position = int(state["epoch"]), position

    def __iter__(self):
        plan = {
            "start": self.epoch * self.samples_per_epoch + self.position,
            "batch_size": self.batch_size,
            "per_rank": self.samples_per_epoch,
            "train": self.train,
            "seed": self.seed,
            "block": self.block,
            "stride": 1 if self.split else self.world_size,
            "offset": 0 if self.split else self.rank,
            "stream": (self.rank,) if self.split and self.world_size > 1 else (),
        }
        dataset = _Batches(self.index, plan, self.transform, self.tokenizer, self.max_len, self.pad_to_max)
        if self.workers:
            batches = iter(
                torch.utils.data.DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.workers,
                    pin_memory=self.pin_memory,
                    worker_init_fn=pin_worker,
                    persistent_workers=False,
                    # the workers' base seed from a generator of our own, not the process's torch RNG: drawing
                    # from that would shift what the trainer draws next (MIM's masks) with the worker count
                    generator=torch.Generator().manual_seed(self.seed),
                )
            )
        else:
            batches = iter(dataset)
        for batch in batches:  # the position moves only when a batch is handed out, not when prefetched
            consumed = self.epoch * self.samples_per_epoch + self.position + len(batch["keys"])
            self.epoch, self.position = divmod(consumed, self.samples_per_epoch)
            yield batch
        if not self.train:
            self.epoch, self.position = 0, 0


def pin_worker(worker_id: int) -> None:
    """Pin a data-loader worker to one CPU of its rank's set, counting from the end (the rank's own
    process and its threads keep the first), and to one thread: decoding images in 8 workers x 8
    OpenMP threads on a 16-core task is 64 threads fighting for 16 cores."""
    import os

    torch.set_num_threads(1)
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[-1 - worker_id % (len(cpus) - 1)]})


def loader_settings(
    workers: int, device: str, local_world_size: int, env: dict[str, str] | None = None, cpus: int | None = None
) -> dict[str, Any]:
    """Data-loader workers and pinned memory for a rank (pure but for the CPU count). On GPUs the
    loader must keep up with the model: workers from the CPUs per task (Slurm's, else the node's
    share), one CPU left for the rank itself, at most 8; batches in pinned memory for async copies.
    On CPU runs the cores are the model's: no workers. `workers` >= 0 in the config wins."""
    pin = device == "cuda"
    if workers >= 0:
        return {"workers": workers, "pin_memory": pin}
    if device != "cuda":
        return {"workers": 0, "pin_memory": False}
    env = dict(os.environ) if env is None else env
    per_task = int(env.get("SLURM_CPUS_PER_TASK", "0") or 0)
    if not per_task:
        total = cpus if cpus is not None else len(os.sched_getaffinity(0))
        per_task = max(1, total // max(1, local_world_size))
    return {"workers": min(8, max(1, per_task - 1)), "pin_memory": pin}
