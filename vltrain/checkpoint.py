"""Checkpoints that resume exactly, become visible only when complete, and refuse the wrong run.

Layout of one checkpoint (`<run_dir>/checkpoints/step_0000120/`):
  ds/                      DeepSpeed's save_checkpoint (model states, ZeRO optimizer shards, LR schedule)
  trainer_rank00000.pt     per rank: step, samples seen, loader position, python/numpy/torch RNG states
  meta.json                step, samples, world size, config hash, schema version (read before loading)
  COMPLETE                 written last, before the rename
Every rank writes into `checkpoints/.tmp-step_0000120/`; after a barrier rank 0 writes COMPLETE and
renames the directory (lingua's and submitit's temporary-name-then-rename). A job killed mid-write
leaves only a `.tmp-` directory, which resume ignores and the next save removes. Resume takes the
newest `step_*` holding COMPLETE; one made by another config is refused, not loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vltrain.common.errors import UserError
from vltrain.rundir import RunDir

SCHEMA_VERSION = 1
DS_TAG = "ds"
MARKER = "COMPLETE"
_NAME = re.compile(r"step_(\d+)")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return RunDir(run_dir).checkpoints


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"  # zero-padded: names sort in step order


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.fullmatch(p.name)
            if m and (p / MARKER).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1][1] if done else None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text(encoding="utf-8"))


def check_compatible(path: Path, config_hash: str, world_size: int) -> dict[str, Any]:
    """meta.json of `path`, or a one-line UserError when this run cannot resume from it."""
    meta = read_meta(path)
    if meta.get("schema") != SCHEMA_VERSION:
        raise UserError(
            f"{path}: checkpoint schema {meta.get('schema')}; allowed: schema {SCHEMA_VERSION} "
            f"(written by this vltrain), or a new run directory"
        )
    if meta.get("config_hash") != config_hash:
        raise UserError(
            f"{path}: written by config {meta.get('config_hash')} but this run's config is {config_hash}; "
            f"allowed: the same model, optimizer, loss, global batch, ZeRO stage, precision and seed, "
            f"or a new run directory"
        )
    if meta.get("world_size") != world_size:
        raise UserError(
            f"{path}: written by {meta.get('world_size')} ranks but this run has {world_size}; "
            f"allowed: resume with {meta.get('world_size')} ranks, or a new run directory"
        )
    return meta


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    """Without the trainer's barrier (a direct call): the default group's, through the helper."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        from vltrain.collectives import Collectives, comm_device

        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        Collectives(comm_device(dist.get_backend(), local_rank), dist.get_world_size()).barrier()


_OWN = re.compile(r"(?:^|_)rank_?0*(\d+)(?:_|\.)")  # zero_pp_rank_3_mp_rank_00_..., trainer_rank00003.pt


def owned_files(directory: Path, rank: int) -> list[Path]:
    """The files of a checkpoint this rank wrote, by DeepSpeed's and our naming: those whose data-
    parallel rank is `rank`; rank 0 also owns the shared ones (mp_rank_00_model_states.pt under
    ZeRO 0-2, meta.json, `latest`). Each writer fsyncs its own: on NFS or Lustre an fsync from
    another client does not flush the writer's cache."""
    out = []
    for p in sorted(directory.rglob("*")):
        if not p.is_file():
            continue
        name = p.name.replace("mp_rank_", "mp-rank-")  # the model-parallel rank is not the data-parallel one
        m = _OWN.search(name)
        if (int(m.group(1)) if m else 0) == rank:
            out.append(p)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    engine,
    run_dir: str | Path,
    *,
    step: int,
    samples: int,
    rank: int,
    world_size: int,
    config_hash: str,
    trainer_state: dict[str, Any],
    keep: int,
    barrier=None,
) -> Path:
    """Collective: every rank calls it at the same step. Returns the final path once it is visible.
    `barrier`: the trainer's (vltrain.collectives, on the process group's device)."""
    _barrier_ = barrier or _barrier
    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an attempt killed while writing
        tmp.mkdir(parents=True)
    _barrier_()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    state = {
        "schema": SCHEMA_VERSION,
        "step": step,
        "samples": samples,
        "rank": rank,
        "world_size": world_size,
        "config_hash": config_hash,
        "rng": rng_state(),
        **trainer_state,
    }
    torch.save(state, tmp / f"trainer_rank{rank:05d}.pt")
    _barrier_()  # every rank's files are written (rank 0's listing below sees them all)
    for f in owned_files(tmp, rank):  # durable before COMPLETE says so
        _fsync(f)
    _barrier_()
    if rank == 0:
        meta = {
            "schema": SCHEMA_VERSION,
            "step": step,
            "samples": samples,
            "world_size": world_size,
            "config_hash": config_hash,
            "time": time.time(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        with (tmp / MARKER).open("w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # same step saved before a crash that came before the next checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(run_dir, keep)
    _barrier_()  # nobody moves on (or exits) before the checkpoint is visible
    return final


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and leftover temporary dirs."""
    done = complete_checkpoints(run_dir)
    for _, path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for p in checkpoints_dir(run_dir).glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def mmap_loads(engine):
    """DeepSpeed's checkpoint engine with torch.load(mmap=True) for the duration: under ZeRO 0-2 every
    rank reads the whole module file (mp_rank_00_model_states.pt, 61 GB for a 30B model in bf16);
    mapped, the 8 ranks of a node share one copy in the page cache instead of 8 in their heaps."""
    ce = engine.checkpoint_engine
    original = ce.load

    def load(path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)

    ce.load = load
    try:
        yield
    finally:
        ce.load = original


def load(engine, path: Path, rank: int) -> dict[str, Any]:
    """Restore model, optimizer and schedule into `engine`; return this rank's trainer state (RNG not yet applied)."""
    with mmap_loads(engine):
        load_path, _ = engine.load_checkpoint(
            str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise UserError(
            f"{path}: DeepSpeed found no checkpoint under {DS_TAG}/; allowed: a directory written by vltrain"
        )
    # Our own file (trusted: written by this trainer into the run directory); RNG states need pickle.
    return torch.load(path / f"trainer_rank{rank:05d}.pt", weights_only=False)


def module_state(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, without DeepSpeed (for evaluation on one process)."""
    files = sorted((path / DS_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise UserError(f"{path}: no model states under {DS_TAG}/; allowed: a complete vltrain checkpoint")
    return torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)["module"]
