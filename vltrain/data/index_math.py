"""What the loader's shard index costs a rank in host memory (torch- and numpy-free, for the planner).

A rank loads the index of its own shards only (shard i goes to data-parallel rank i mod W), as arrays
per shard (vltrain.data.shards.ShardIndex): per sample the image member's and the text member's data
offsets (uint32 while the tar is under 4 GiB; sizes are read from the tar header before the data) and
the key (uint32 above the shard's first key when keys are img2dataset's digits): 12 bytes. Each shard adds a fixed cost
for its path, arrays and Python objects. Forked loader workers share these pages: nothing per sample
in them is written after the fork (numpy keeps refcounts in the array header, not in its data).
"""

from __future__ import annotations

import math

INDEX_BYTES_PER_SAMPLE: float = 4 + 4 + 4  # image offset, text offset, key
INDEX_BYTES_PER_SHARD: float = 2400.0  # the ShardIndex, its dict and 4 arrays, its path (bench_index: ~2.3 KB)
SAMPLES_PER_SHARD: int = 10_000  # img2dataset's default shard size (--number_sample_per_shard)


def rank_shards(num_shards: int, rank: int, world_size: int) -> range:
    """The shards (positions in the sorted shard list) one data-parallel rank trains on: i mod W == rank,
    fixed for the run, so that a rank never needs another rank's index. With fewer shards than ranks,
    all of them (the loader then interleaves samples over the ranks, reading every shard)."""
    if num_shards < world_size:
        return range(num_shards)
    return range(rank, num_shards, world_size)


def shards_per_rank(num_shards: int, data_parallel: int) -> int:
    """Shards one rank reads: its share of the shards, rounded up (shard i -> rank i mod W); with fewer
    shards than ranks every rank reads them all (the loader then splits samples, not shards)."""
    if num_shards < data_parallel:
        return num_shards
    return math.ceil(num_shards / data_parallel)


def index_host_bytes(dataset_samples: int, data_parallel: int) -> float:
    """Bytes of shard index one rank holds (in its main process; workers share it) for a dataset of
    `dataset_samples` in img2dataset-sized shards split over `data_parallel` ranks."""
    if dataset_samples <= 0:
        return 0.0
    dp = max(1, data_parallel)
    num_shards = math.ceil(dataset_samples / SAMPLES_PER_SHARD)
    shards = shards_per_rank(num_shards, dp)
    samples = min(dataset_samples, shards * SAMPLES_PER_SHARD)
    return samples * INDEX_BYTES_PER_SAMPLE + shards * INDEX_BYTES_PER_SHARD
