"""Checkpoints that resume exactly, become visible only when complete, are verified before they are
trusted, and refuse the wrong run.

This module is the protocol and knows no engine: each engine (vltrain.engines.api.TrainEngine) writes
and reads its own files inside the checkpoint directory (`engine.save`, `engine.load`), and the engine
that reads a checkpoint's weights is found by meta.json's "format" (vltrain.engines.ENGINES).

Layout of one checkpoint (`<run_dir>/checkpoints/step_0000120/`):
  <format>/                the engine's files: ds/ (DeepSpeed's save_checkpoint: model states, ZeRO
                           optimizer shards, LR schedule) or dcp/ (torch.distributed.checkpoint of model
                           and optimizer: __<rank>_0.distcp per rank, .metadata from rank 0, any layout on load)
  trainer_rank00000.pt     per rank: step, samples seen, loader position, python/numpy/torch RNG states,
                           and what the engine keeps beside its files ("engine": under fsdp the LR schedule,
                           loss scaler and step counters)
  meta.json                step, samples, world size, format, config hash, schema version, and `files`: the size
                           and CRC-32 of every other file, each computed by the rank that wrote it
  COMPLETE                 written last, before the rename; holds the step and meta.json's size and CRC-32
Every rank writes into `checkpoints/.tmp-step_0000120/`; after a barrier rank 0 writes COMPLETE and
renames the directory (lingua's and submitit's temporary-name-then-rename). A job killed mid-write
leaves only a `.tmp-` directory, which resume ignores and the next save removes. A write that fails
(a full disk, a quota) ends the run on every rank with one line (`CheckpointWriteError`) and removes
the `.tmp-` directory: the previous checkpoint stays the newest.

Resume (`select`) takes the newest `step_*` holding COMPLETE whose files match meta.json (each rank
checks the files it wrote; the ranks agree on the verdict); a damaged one is renamed to
`.bad-step_0000120` (kept for inspection, never deleted, ignored by `latest` and `prune`) and the one
before it is tried. One made by another config is refused, not loaded. A DeepSpeed checkpoint resumes
only on its own rank count; a DCP one on any (DCP reshards model and optimizer; the loader position
is mapped by `remap_loader_state`).

Why CRC-32 and not SHA-256: the checksum guards against truncation, torn writes and flipped bits,
not against an adversary; zlib's CRC-32 runs at ~3.9 GB/s on one core against SHA-256's ~1.2 GB/s
(measured on the 2-core CI box), needs no dependency, and misses a random corruption with
probability 2^-32. Each rank checksums only its own files, right after writing them (from the page
cache), so a 61 GB module file costs rank 0 ~16 s rather than ~50 s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from vltrain import diskspace
from vltrain.common.errors import UserError
from vltrain.engines import ENGINES, engine_for_format, spec, strategy_of_format
from vltrain.rundir import RunDir

if TYPE_CHECKING:
    from vltrain.engines.api import TrainEngine

SCHEMA_VERSION = 1  # `files` in meta.json is optional: checkpoints written before it load unverified
LEGACY_FORMAT = ENGINES["deepspeed"].checkpoint_format  # meta.json without "format": written before DCP
MARKER = "COMPLETE"
META = "meta.json"
BAD_PREFIX = ".bad-"  # a checkpoint that failed verification, moved aside (never deleted)
_NAME = re.compile(r"step_(\d+)")
_PART = re.compile(r"files_rank(\d+)\.json")  # each rank's share of the manifest, merged by rank 0
_CHUNK = 8 << 20


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (a full disk, a quota, a read-only or failing filesystem).
    Every rank raises it with the same line; the run ends FAILED (not retried: a retry meets the
    same full disk) and the previous checkpoint stays the newest."""

    kind = "checkpoint_write"


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


def check_compatible(path: Path, config_hash: str, world_size: int, fmt: str = LEGACY_FORMAT) -> dict[str, Any]:
    """meta.json of `path`, or a one-line UserError when this run (whose engine writes `fmt`) cannot
    resume from it. A checkpoint of an engine that reshards (DCP) resumes on any rank count; one of
    another (DeepSpeed) on its own rank count only."""
    meta = read_meta(path)
    written = meta.get("format", LEGACY_FORMAT)
    was, now = strategy_of_format(written), strategy_of_format(fmt)
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
    if was != now:
        raise UserError(
            f"{path}: written under parallel.strategy '{was}' but this run uses "
            f"'{now}'; allowed: --set parallel.strategy={was}, or a new run directory"
        )
    if not spec(now).reshards and meta.get("world_size") != world_size:
        raise UserError(
            f"{path}: written by {meta.get('world_size')} ranks but this run has {world_size}; "
            f"allowed: resume with {meta.get('world_size')} ranks, or a new run directory"
        )
    return meta


def check_newest(run_dir: str | Path, config_hash: str, world_size: int, fmt: str = LEGACY_FORMAT) -> None:
    """check_compatible on the newest complete checkpoint whose meta.json reads (a quick refusal before
    the slow start; a damaged one is left to `select`, once the ranks can agree on it)."""
    for _, path in reversed(complete_checkpoints(run_dir)):
        if verify(path, only=lambda rel: False) is None:  # meta.json alone: it reads and matches COMPLETE
            check_compatible(path, config_hash, world_size, fmt)
            return


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, CRC-32 as 8 hex digits) of a file, read in 8 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def verify(path: Path, rank: int = 0, world_size: int = 1, only: Callable[[str], bool] | None = None) -> str | None:
    """What is wrong with checkpoint `path` as this rank sees it, or None when nothing is: meta.json
    must parse and match the size and CRC-32 that COMPLETE records for it; each file in its manifest
    that `rank` checks (those written by a rank r with r % world_size == rank, or those `only`
    picks) must exist with the recorded size and CRC-32. A checkpoint without a manifest (written
    before there was one) passes unverified."""
    meta_path = path / META
    try:
        raw = meta_path.read_bytes()
    except OSError as e:
        return f"{META}: cannot be read ({e.strerror or e})"
    try:
        marker = (path / MARKER).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        marker = []
    if len(marker) >= 4 and marker[1] == META:  # "<step> meta.json <size> <crc32>"
        crc = f"{zlib.crc32(raw):08x}"
        if str(len(raw)) != marker[2] or crc != marker[3]:
            return (
                f"{META}: {len(raw):,} bytes with CRC-32 {crc}, but {MARKER} records {marker[2]} bytes with {marker[3]}"
            )
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{META}: not valid JSON ({e})"
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        return f"{META}: not a checkpoint's metadata (no step)"
    files = meta.get("files")
    if files is None:
        return None
    if not isinstance(files, dict):
        return f"{META}: files is not a table of file sizes and checksums"
    for rel, entry in sorted(files.items()):
        try:
            size, crc, writer = int(entry["size"]), str(entry["crc32"]), int(entry["rank"])
        except (KeyError, TypeError, ValueError):
            return f"{META}: files.{rel} is not {{size, crc32, rank}}"
        if not (only(rel) if only is not None else writer % max(1, world_size) == rank):
            continue
        f = path / rel
        try:
            actual = f.stat().st_size
        except FileNotFoundError:
            return f"{rel}: missing ({size:,} bytes written)"
        except OSError as e:
            return f"{rel}: cannot be read ({e.strerror or e})"
        if actual != size:
            return f"{rel}: {actual:,} bytes, {size:,} written (truncated or overwritten)"
        try:
            _, actual_crc = file_digest(f)
        except OSError as e:
            return f"{rel}: cannot be read ({e.strerror or e})"
        if actual_crc != crc:
            return f"{rel}: CRC-32 {actual_crc}, {crc} written (the bytes changed)"
    return None


def move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `.bad-<name>` (or `.bad-<name>-N` when that exists): out of the
    way of `latest` and `prune`, which only see `step_*`, and kept for whoever wants to look."""
    target = path.parent / f"{BAD_PREFIX}{path.name}"
    n = 1
    while target.exists():
        target = path.parent / f"{BAD_PREFIX}{path.name}-{n}"
        n += 1
    os.replace(path, target)
    with contextlib.suppress(OSError):
        _fsync(path.parent)
    return target


def select(
    run_dir: str | Path, rank: int = 0, world_size: int = 1, comm=None, warn: Callable[[str], None] | None = None
) -> tuple[Path | None, list[str]]:
    """Collective: every rank calls it. The newest complete checkpoint that verifies, and the damaged
    ones moved aside on the way ("step_0000120: <why>"). Each rank checks its own files; the ranks
    agree (the first rank's finding wins), so all of them resume from the same one. Rank 0 moves a
    damaged one to `.bad-<name>` and says so through `warn` (stderr by default)."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    sync = _Sync(comm, None, rank, world_size)
    moved: list[str] = []
    for _, path in reversed(complete_checkpoints(run_dir)):
        problem = sync.first_problem(verify(path, rank, world_size))
        if problem is None:
            return path, moved
        moved.append(f"{path.name}: {problem}")
        if rank == 0:
            bad = move_aside(path)
            warn(
                f"vltrain: warning: checkpoint {path.name} is damaged ({problem}); moved it to "
                f"{RunDir.CHECKPOINTS}/{bad.name} and trying the one before it"
            )
        sync.barrier()
    return None, moved


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
_DCP_OWN = re.compile(r"__(\d+)_\d+\.distcp")  # DCP's FileSystemWriter: __<rank>_<file>.distcp


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
        m = _DCP_OWN.fullmatch(name) or _OWN.search(name)
        if (int(m.group(1)) if m else 0) == rank:
            out.append(p)
    return out


def _fsync(path: Path) -> None:
    """Flush a file's data or a directory's entries (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    engine: TrainEngine,
    run_dir: str | Path,
    *,
    step: int,
    samples: int,
    rank: int,
    world_size: int,
    config_hash: str,
    trainer_state: dict[str, Any],
    keep: int,
    barrier: Callable[[], None] | None = None,
    comm: Any = None,
) -> Path:
    """Collective: every rank calls it at the same step. Returns the final path once it is visible.

    `comm`: the trainer's vltrain.collectives.Collectives (on the process group's device); `barrier`
    stands in for it in single-process callers. At each point where the ranks wait for each other
    they also agree on whether a write failed anywhere (a full disk, a quota): if one did, rank 0
    removes the `.tmp-` directory and every rank raises the same CheckpointWriteError, instead of one
    rank failing while the others wait in the next collective until the time-out."""
    w = _Write(engine, Path(run_dir), step, rank, world_size, keep, _Sync(comm, barrier, rank, world_size))
    w.agree(w.start() if rank == 0 else None)
    # every rank's files are written before rank 0 lists them
    w.agree(w.write_files({"samples": samples, "config_hash": config_hash}, trainer_state))
    w.agree(w.write_manifest_part())
    w.agree(w.publish(samples, config_hash) if rank == 0 else None)  # nobody moves on before it is visible
    return w.final


class _Write:
    """One checkpoint as this rank writes it: its temporary and final directories, and the steps of the
    protocol, each returning the write error it met (None: none) for the ranks to agree on."""

    def __init__(
        self, engine: TrainEngine, run_dir: Path, step: int, rank: int, world_size: int, keep: int, sync: _Sync
    ) -> None:
        self.engine, self.run_dir, self.step, self.rank, self.world_size = engine, run_dir, step, rank, world_size
        self.keep, self.sync = keep, sync
        self.root = checkpoints_dir(run_dir)
        self.final = self.root / step_dir_name(step)
        self.tmp = self.root / f".tmp-{self.final.name}"
        self.free_before = diskspace.free_bytes(self.root)
        self.renamed = False

    def agree(self, error: BaseException | None) -> None:
        """The ranks' point of agreement: when a write failed on any of them, every rank raises the first
        one's line (rank 0 removes the temporary directory: never the newest, and its space back)."""
        problem = None
        if error is not None:
            need = estimate_bytes(self.engine, self.run_dir)
            problem = diskspace.write_problem(error, need, self.root, self.final.name, self.free_before, self.keep)
        problem = self.sync.first_problem(problem)
        if problem is None:
            return
        if self.rank == 0 and not self.renamed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.sync.barrier()
        raise CheckpointWriteError(problem)

    def start(self) -> OSError | None:
        """Rank 0: a fresh temporary directory (one left by an attempt killed while writing is removed)."""
        try:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        except OSError as e:
            return e
        return None

    def write_files(self, fields: dict[str, Any], trainer_state: dict[str, Any]) -> BaseException | None:
        """The engine's files, then this rank's trainer state (step, samples, RNG, the engine's extra state)."""
        errors: list[BaseException] = []
        try:
            engine_state = self.engine.save(self.tmp, errors)  # its own files; a failed write goes to `errors`
            state = {
                "schema": SCHEMA_VERSION,
                "step": self.step,
                "samples": fields["samples"],
                "rank": self.rank,
                "world_size": self.world_size,
                "config_hash": fields["config_hash"],
                "rng": rng_state(),
                "engine": engine_state,
                **trainer_state,
            }
            with open(self.tmp / f"trainer_rank{self.rank:05d}.pt", "wb") as f:  # a Python file: ENOSPC keeps errno
                torch.save(state, f)
        except Exception as e:
            if not diskspace.is_write_error(e):
                raise
            errors.append(e)
        return errors[0] if errors else None

    def write_manifest_part(self) -> OSError | None:
        """This rank's files made durable (before COMPLETE says so), with their sizes and CRC-32s."""
        try:
            files = {}
            for f in owned_files(self.tmp, self.rank):
                if _PART.fullmatch(f.name):
                    continue
                _fsync(f)
                size, crc = file_digest(f)  # from the page cache, just written
                files[f.relative_to(self.tmp).as_posix()] = {"size": size, "crc32": crc, "rank": self.rank}
            _write_durable(self.tmp / f"files_rank{self.rank:05d}.json", json.dumps(files).encode())
        except OSError as e:
            return e
        return None

    def publish(self, samples: int, config_hash: str) -> OSError | None:
        """Rank 0: meta.json (with the merged manifest), COMPLETE, the rename; then older ones pruned."""
        try:
            meta = {
                "schema": SCHEMA_VERSION,
                "step": self.step,
                "samples": samples,
                "world_size": self.world_size,
                "format": self.engine.checkpoint_format,
                "config_hash": config_hash,
                "time": time.time(),
                "files": _merge_parts(self.tmp, self.world_size),
            }
            raw = (json.dumps(meta, indent=2) + "\n").encode()
            _write_durable(self.tmp / META, raw)
            _write_durable(self.tmp / MARKER, f"{self.step}\n{META} {len(raw)} {zlib.crc32(raw):08x}\n".encode())
            if self.final.exists():  # same step saved before a crash that came before the next checkpoint
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
            self.renamed = True
            _fsync(self.root)
        except OSError as e:
            return e
        prune(self.run_dir, self.keep)
        return None


class _Sync:
    """A checkpoint's points of agreement. With the trainer's Collectives: who found a problem (an
    all_reduce of one flag per rank, which is also the barrier), then the first one's line from that
    rank (a broadcast), so every rank acts on the same verdict. Without (one process): the barrier
    given, and the local problem."""

    def __init__(self, comm, barrier, rank: int, world_size: int) -> None:
        self.comm, self.rank, self.world = comm, rank, world_size
        self._barrier = barrier or (comm.barrier if comm is not None else _barrier)

    def barrier(self) -> None:
        self._barrier()

    def first_problem(self, problem: str | None) -> str | None:
        if self.comm is None or not getattr(self.comm, "active", False):
            self._barrier()
            return problem
        flags = torch.zeros(self.world, dtype=torch.float64)
        flags[self.rank] = float(problem is not None)
        failed = torch.nonzero(self.comm.all_reduce_sum(flags)).flatten().tolist()
        if not failed:
            return None
        box = [problem if self.rank == failed[0] else None]
        self.comm.broadcast_objects(box, src=int(failed[0]))
        return box[0]


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _merge_parts(tmp: Path, world_size: int) -> dict[str, dict[str, Any]]:
    """The manifest: every rank's files_rankNNNNN.json, merged, then removed (meta.json holds it)."""
    files: dict[str, dict[str, Any]] = {}
    for r in range(world_size):
        part = tmp / f"files_rank{r:05d}.json"
        try:
            files.update(json.loads(part.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise OSError(errno.EIO, f"rank {r}'s file list {part.name} cannot be read ({e})") from None
    for r in range(world_size):
        (tmp / f"files_rank{r:05d}.json").unlink()
    return dict(sorted(files.items()))


def checkpoint_bytes(path: Path) -> int:
    """The size of a complete checkpoint: its manifest's sum, else what its files hold."""
    try:
        files = read_meta(path).get("files")
        if isinstance(files, dict):
            return sum(int(e["size"]) for e in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def estimate_bytes(engine: TrainEngine, run_dir: str | Path) -> int:
    """What the next checkpoint of this run will take on disk: the newest complete one's size, else the
    engine's estimate (vltrain.engines.api.TrainEngine.checkpoint_bytes); 0 when unknown."""
    done = complete_checkpoints(run_dir)
    if done:
        with contextlib.suppress(OSError):
            return checkpoint_bytes(done[-1][1])
    return engine.checkpoint_bytes()


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and leftover temporary dirs."""
    done = complete_checkpoints(run_dir)
    for _, path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for p in checkpoints_dir(run_dir).glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


def load(engine: TrainEngine, path: Path, rank: int) -> dict[str, Any]:
    """Restore model, optimizer and schedule into `engine`; return this rank's trainer state (RNG not yet applied).

    A checkpoint of an engine that reshards (DCP), written by another rank count: the engine reshards
    model and optimizer; rank r takes the trainer state of rank r mod the old count (loader positions and
    engine state agree across ranks; the loop maps the loader's with `remap_loader_state`)."""
    engine.load(path)
    source = rank
    if spec(engine.strategy).reshards:
        source = rank % int(read_meta(path).get("world_size", 1))
    # Our own file (trusted: written by this trainer into the run directory); RNG states need pickle.
    state = torch.load(path / f"trainer_rank{source:05d}.pt", weights_only=False)
    engine.load_extra_state(state.get("engine") or {})
    return state


def remap_loader_state(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """A loader state saved by (data-parallel) rank `state["rank"]` of `state["world_size"]`, for
    `rank` of `world_size` (pure; unchanged when the size is the same).

    Every rank consumes the same count, and rank r of W reads epoch positions r, r+W, ...: after p
    samples each, the first p x W positions of the epoch are consumed, whatever W. So rank r' of W'
    resumes at p x W // W': the same global position, so every later optimizer step sees the same
    set of samples as on the old rank count (split differently over ranks and micro batches). When
    p x W is not a multiple of W' (the global batch does not divide by the new size), up to W' - 1
    samples are repeated. An epoch past the new per-rank size starts the next epoch."""
    old = int(state["world_size"])
    if old == world_size:
        return state
    if "per_rank" in state:  # loader state 2: shards split over ranks; the loader keeps the epoch's share
        return state | {"rank": rank, "world_size": world_size}
    consumed = int(state["position"]) * old // world_size
    per_rank = int(state["num_samples"]) // world_size
    epoch = int(state["epoch"]) + consumed // per_rank
    return state | {"rank": rank, "world_size": world_size, "epoch": epoch, "position": consumed % per_rank}


def checkpoint_format(path: Path) -> str:
    """The format a checkpoint was written in (meta.json's), that of checkpoints before DCP when unreadable."""
    try:
        return str(read_meta(path).get("format", LEGACY_FORMAT))
    except (OSError, ValueError):
        return LEGACY_FORMAT


def module_state(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, without a process group (evaluation on one process): read by
    the engine of its format, whatever rank count and layout wrote them."""
    return engine_for_format(checkpoint_format(path)).read_module_state(path)


def verify_module(path: Path) -> str | None:
    """`verify` of meta.json and the files that hold the model weights (what evaluation reads)."""
    return verify(path, only=engine_for_format(checkpoint_format(path)).is_module_file)
