"""The data loader alone vs the trainer it feeds, tiny config, 0, 1 and 2 loader workers; loader start-up
with vs without the shard index.

Data: the demo's (configs/tiny.toml): 4,000 synthetic samples in 8 shards at the preset's image size
and a 1,000-piece tokenizer, made here in a temporary directory. Both sides use the trainer's own
loader (a real `Session` built from configs/tiny.toml, its `ShardLoader` copied with the worker count
changed): shards -> decoded, augmented images, tokenized text, MLM draws, in micro batches.

- loader alone: a fresh iterator (its start-up, forking the workers, left out), then samples/s over
  the next batches;
- trainer: the session's own `train_step` (DeepSpeed engine, loss bookkeeping) pulling from its
  loader with that worker count, samples/s over whole optimizer steps, data wait included (the
  trainer's `samples_per_s`); the share of its step time spent waiting for batches is printed too.

Loader and trainer, at each worker count, are timed in alternating rounds so that load from other
processes hits them alike; each row is the ratio of the medians with the spread of the per-round
ratios. The loader must never be the bottleneck: goal >= 3x the trainer's rate. Start-up: building
the `ShardLoader` (where the index is read) with the index beside the shards vs without it (as in a
read-only directory: every tar header read), alternating, 3 of each per round; goal <= 0.1x.

The trainer runs with torch's threads (OMP_NUM_THREADS); on a machine loaded by other processes, 2
threads on 2 cores slow it several-fold more than 1 thread does (OpenMP threads waiting on each other),
which inflates the ratios: read them from a quiet machine, or with OMP_NUM_THREADS=1.

    OMP_NUM_THREADS=2 python bench/bench_data.py [--rounds 5]

`rows(rounds)` returns the rows as dicts (name, ratio, spread, goal, ok, detail) for bench/run_all.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORKERS = (0, 1, 2)
SAMPLES, SHARDS = 4000, 8  # the demo's data (configs/tiny.toml)
LOADER_BATCHES = 24  # timed micro batches of the loader alone, per round
TRAINER_STEPS = 5  # timed optimizer steps of the trainer, per round
STARTUP_PAIRS = 3  # start-ups with and without the index per round (alternating; the round keeps the medians)
LOADER_GOAL, STARTUP_GOAL = 3.0, 0.1


def make_data(tmp: Path, image_size: int) -> tuple[str, str]:
    from vltrain.data.synth import write_synthetic_shards
    from vltrain.tokenizer import train_tokenizer_from_shards

    write_synthetic_shards(tmp / "shards", n=SAMPLES, shards=SHARDS, seed=0, image_size=image_size)
    train_tokenizer_from_shards(tmp / "shards", 1000, tmp / "tok.model")
    return str(tmp / "shards"), str(tmp / "tok.model")


def make_session(config: str, tmp: Path):
    """A real trainer session on the tiny config with the generated data; no checkpoints, no evaluation."""
    from vltrain import distenv
    from vltrain.config import load_train_config
    from vltrain.loop import Session, StopRequests
    from vltrain.metrics import EventLog
    from vltrain.presets import resolve_model

    cfg = load_train_config(config, {})
    shards, tok = make_data(tmp, resolve_model(cfg.model).image_size)
    data = dataclasses.replace(cfg.data, shards=shards, tokenizer=tok, eval_shards="", workers=0)
    cfg = dataclasses.replace(cfg, data=data, checkpoint_every=0, eval_every=0)
    os.environ.pop("VLTRAIN_COUNTRY", None)  # no energy tracker in the timed loop
    (tmp / "run").mkdir()
    stops = StopRequests()
    return Session(cfg, tmp / "run", distenv.current(), EventLog(tmp / "run", False, 0), stops), stops


def with_workers(loader, workers: int):
    """The trainer's loader (same shards, index, transform, tokenizer, batch) with another worker count."""
    out = copy.copy(loader)
    out.workers = workers
    return out


def loader_rate(loader) -> float:
    """Samples/s of the loader alone: a fresh iterator, its first batch (start-up) left out."""
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(len(next(it)["keys"]) for _ in range(LOADER_BATCHES))
    dt = time.perf_counter() - t0
    with contextlib.suppress(Exception):
        it.close()  # stops the generator, and with it the DataLoader's workers
    return n / dt


def trainer_rate(session, batches) -> tuple[float, float]:
    """Samples/s of the trainer's own step pulling from `batches`, and the share of it spent waiting."""
    m = 2 + len(session.LOSSES)  # train_step's numbers: ..., seconds (m + 3), data-wait seconds (m + 4), skipped
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(TRAINER_STEPS):
        local, _ = session.train_step(batches)
        waited += float(local[m + 4])
    dt = time.perf_counter() - t0
    return TRAINER_STEPS * session.cfg.global_batch / dt, waited / dt


def startup_s(shards: str, loader, loader_cfg, index: bool) -> float:
    """Seconds to build a ShardLoader like the trainer's, with the shard index or without (scanning)."""
    from vltrain.data import shards as shard_mod
    from vltrain.data.loader import ShardLoader

    saved = shard_mod.read_index, shard_mod.write_index
    if not index:  # as where the directory is read-only: no index to read, none written
        shard_mod.read_index, shard_mod.write_index = (lambda path, st: None), (lambda index, st: False)
    try:
        t0 = time.perf_counter()
        ShardLoader(
            shards,
            rank=loader.rank,
            world_size=loader.world_size,
            batch_size=loader.batch_size,
            seed=loader.seed,
            image_size=loader.transform.size,
            tokenizer=loader.tokenizer,
            max_len=loader.max_len,
            train=True,
            data_cfg=loader_cfg,
            workers=0,
        )
        return time.perf_counter() - t0
    finally:
        shard_mod.read_index, shard_mod.write_index = saved


def _row(name: str, ratios: list[float], ratio: float, goal: str, ok: bool, detail: str) -> dict[str, Any]:
    return {
        "name": name,
        "ratio": round(ratio, 3),
        "spread": (round(min(ratios), 3), round(max(ratios), 3)),
        "goal": goal,
        "ok": ok,
        "detail": detail,
    }


def rows(rounds: int = 5, config: str | None = None) -> list[dict[str, Any]]:
    """One row per worker count (loader alone / trainer, samples/s) and one for the loader's start-up
    with / without the shard index; all measured in this call, in alternating rounds."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    session, stops = make_session(config or str(REPO / "configs" / "tiny.toml"), tmp)
    feeds: dict[int, Any] = {}  # the trainer's iterators, one per worker count, live across rounds
    try:
        base = session.loader
        loaders = {k: with_workers(base, k) for k in WORKERS}
        feeds.update((k, iter(with_workers(base, k))) for k in WORKERS)
        for k in WORKERS:  # warm-up: workers started, first-call paths, allocator
            loader_rate(loaders[k])
            trainer_rate(session, feeds[k])
        alone: dict[int, list[float]] = {k: [] for k in WORKERS}
        trained: dict[int, list[float]] = {k: [] for k in WORKERS}
        waits: dict[int, list[float]] = {k: [] for k in WORKERS}
        starts: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for k in WORKERS:
                alone[k].append(loader_rate(loaders[k]))
                rate, wait = trainer_rate(session, feeds[k])
                trained[k].append(rate)
                waits[k].append(wait)
            pairs = [
                [startup_s(session.cfg.data.shards, base, session.cfg.data, index) for index in (True, False)]
                for _ in range(STARTUP_PAIRS)
            ]
            for i, index in enumerate((True, False)):
                starts[index].append(statistics.median(p[i] for p in pairs))
        out = []
        for k in WORKERS:
            ratio = statistics.median(alone[k]) / statistics.median(trained[k])
            out.append(
                _row(
                    f"data loader alone / trainer, samples/s, tiny, {k} worker{'s' if k != 1 else ''}",
                    [a / t for a, t in zip(alone[k], trained[k])],
                    ratio,
                    f">= {LOADER_GOAL:g}x",
                    ratio >= LOADER_GOAL,
                    f"loader {statistics.median(alone[k]):,.0f} samples/s, trainer {statistics.median(trained[k]):,.0f} "
                    f"samples/s with {statistics.median(waits[k]):.1%} of its time waiting for data",
                )
            )
        ratio = statistics.median(starts[True]) / statistics.median(starts[False])
        out.append(
            _row(
                f"loader start-up with / without the shard index, {SAMPLES:,} samples in {SHARDS} shards",
                [a / b for a, b in zip(starts[True], starts[False])],
                ratio,
                f"<= {STARTUP_GOAL:g}x",
                ratio <= STARTUP_GOAL,
                f"{statistics.median(starts[True]) * 1000:.0f} ms vs {statistics.median(starts[False]) * 1000:.0f} ms",
            )
        )
        return out
    finally:
        for it in feeds.values():
            with contextlib.suppress(Exception):
                it.close()
        session.close()
        stops.restore()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (the spread is over these)")
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"))
    args = ap.parse_args()
    print(
        f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}; medians of {args.rounds} alternating rounds "
        f"(loader: {LOADER_BATCHES} micro batches, trainer: {TRAINER_STEPS} optimizer steps per round)"
    )
    for r in rows(args.rounds, args.config):
        lo, hi = r["spread"]
        mark = "ok" if r["ok"] else "NOT MET"
        print(f"{r['name']}: {r['ratio']:.2f}x (spread {lo:.2f}-{hi:.2f}, goal {r['goal']}: {mark}); {r['detail']}")


if __name__ == "__main__":
    main()
