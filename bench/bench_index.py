"""One training rank's shard-index memory at paper scale, without writing a single image.

    .venv/bin/python bench/bench_index.py --samples 100000000 [--world 64] [--per-shard 10000]

Builds, in a temporary directory it removes, what sits beside N samples in img2dataset's layout (shards
of --per-shard samples, keys of 9 digits): per shard a tar that is sparse (its size set, no byte of
data written: no images), img2dataset's `NNNNN_stats.json`, and the loader's index in its real format
(`NNNNN.tar.idx.npz`, written by vltrain.data.shards.write_index, member offsets laid out as
webdataset's TarWriter would place a jpg, a txt and a json per sample). Then loads the indexes of
rank 0 of --world exactly as ShardLoader does (vltrain.data.shards.rank_index) and prints

    index bytes per sample: X

X = tracemalloc's growth over that load (numpy reports its buffers to tracemalloc; the ShardIndex
objects, their arrays and the list are counted, garbage freed by then is not) divided by the samples
the rank holds. The arrays' nbytes per sample and the files the load opened are printed beside it.
Goal (issue 23): <= 16 at N = 100,000,000 on 64 ranks.
"""

from __future__ import annotations

import argparse
import builtins
import json
import math
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vltrain.data.shards import INDEX_SUFFIX, ShardIndex, rank_index, write_index

GOAL = 16.0


def _shard_arrays(shard: int, n: int, per_shard: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
    """A shard's index arrays and tar size: per sample a jpg (5-60 KB), a txt and a json, each a 512-byte
    header then data padded to 512, as TarWriter writes them; keys f"{shard:05d}{i:04d}" (img2dataset's)."""
    blocks = lambda size: 1 + (size + 511) // 512
    jpg = rng.integers(5_000, 60_000, n)
    txt = rng.integers(40, 200, n)
    per_sample = (blocks(jpg) + blocks(txt) + blocks(np.full(n, 300))) * 512
    start = np.concatenate([[0], np.cumsum(per_sample)[:-1]])
    image = start + 512
    text = image + (blocks(jpg) - 1) * 512 + 512
    tar_size = int(per_sample.sum()) + 1024  # two zero blocks end a tar
    dtype = np.uint32 if tar_size < 2**32 else np.uint64
    digits = max(4, len(str(per_shard - 1)))  # img2dataset: shard id, then the sample's number in it
    arrays = {
        "image": image.astype(dtype),
        "text": text.astype(dtype),
        "key_meta": np.array([shard * 10**digits, 5 + digits], np.int64),
        "key_data": np.arange(n, dtype=np.uint32),
    }
    return arrays, tar_size


def build(root: Path, samples: int, per_shard: int, seed: int = 0) -> list[Path]:
    """The tars (sparse), stats files and real index files of `samples` samples; the tars' paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for shard in range(math.ceil(samples / per_shard)):
        n = min(per_shard, samples - shard * per_shard)
        arrays, size = _shard_arrays(shard, n, per_shard, rng)
        tar = root / f"{shard:05d}.tar"
        with open(tar, "wb") as f:
            f.truncate(size)  # sparse: no data written
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n}))
        if not write_index(ShardIndex(str(tar), arrays), tar.stat()):
            raise SystemExit(f"could not write the index of {tar}")
        paths.append(tar)
    return paths


def measure(paths: list[Path], rank: int, world: int) -> dict[str, Any]:
    """Load one rank's indexes as the loader does; its memory per sample and the index files it opened."""
    opened: list[str] = []
    real_open = builtins.open

    def watching(file, *args, **kwargs):
        if str(file).endswith(INDEX_SUFFIX):
            opened.append(os.path.basename(str(file)))
        return real_open(file, *args, **kwargs)

    builtins.open = watching
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        t = time.perf_counter()
        index, total, per_rank = rank_index(paths, rank, world)
        seconds = time.perf_counter() - t
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        builtins.open = real_open
    samples = sum(len(s) for s in index)
    return {
        "dataset_samples": total,
        "rank_samples": samples,
        "per_rank_epoch": per_rank,
        "shards": len(index),
        "bytes_per_sample": held / samples,
        "array_bytes_per_sample": sum(s.nbytes for s in index) / samples,
        "index_files_opened": len(opened),
        "load_s": seconds,
    }


def run(samples: int, world: int, per_shard: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        t = time.perf_counter()
        paths = build(root, samples, per_shard)
        built = time.perf_counter() - t
        return {"samples": samples, "world": world, "build_s": built, **measure(paths, 0, world)}
    finally:
        shutil.rmtree(root)


def rows(rounds: int, samples: int = 10_000_000) -> list[dict[str, Any]]:
    """For run_all: one row (the figure is a count, not a timing: one measurement, whatever the rounds)."""
    r = run(samples, 64, 10_000)
    x = r["bytes_per_sample"]
    return [
        {
            "name": f"index bytes per sample, rank 0 of 64, N={samples:,} (tracemalloc)",
            "ratio": x,
            "spread": None,
            "goal": f"<= {GOAL:g}",
            "ok": x <= GOAL,
            "detail": f"arrays {r['array_bytes_per_sample']:.2f} B; {r['index_files_opened']} of "
            f"{math.ceil(samples / 10_000)} index files opened",
        }
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=10_000_000)
    ap.add_argument("--world", type=int, default=64, help="data-parallel ranks (rank 0 is measured)")
    ap.add_argument("--per-shard", type=int, default=10_000, help="samples per shard (img2dataset's default)")
    args = ap.parse_args()
    for name in ("samples", "world", "per_shard"):
        if getattr(args, name) < 1:
            sys.exit(f"--{name.replace('_', '-')}: {getattr(args, name)}; allowed: 1 or more")
    r = run(args.samples, args.world, args.per_shard)
    print(
        f"N={r['samples']:,} samples in {math.ceil(r['samples'] / args.per_shard):,} shards, built in "
        f"{r['build_s']:.1f} s; rank 0 of {r['world']}: {r['shards']} shards, {r['rank_samples']:,} samples "
        f"({r['per_rank_epoch']:,} per epoch), {r['index_files_opened']} index files opened, loaded in "
        f"{r['load_s']:.2f} s; arrays {r['array_bytes_per_sample']:.2f} B/sample"
    )
    print(f"index bytes per sample: {r['bytes_per_sample']:.2f}")


if __name__ == "__main__":
    main()
