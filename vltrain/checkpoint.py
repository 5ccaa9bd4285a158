"""Checkpoints that resume exactly, become visible only when complete, are verified before they are
trusted, and refuse the wrong run.

Layout of one checkpoint (`<run_dir>/checkpoints/step_0000120/`):
  ds/                      parallel.strategy "deepspeed": DeepSpeed's save_checkpoint (model states, ZeRO
                           optimizer shards, LR schedule)
  dcp/                     parallel.strategy "fsdp": torch.distributed.checkpoint of model and optimizer
                           (__<rank>_0.distcp per rank, .metadata from rank 0), any layout on load
  trainer_rank00000.pt     per rank: step, samples seen, loader position, python/numpy/torch RNG states
                           (under fsdp also the LR schedule, loss scaler and step counters)
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
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vltrain.common.errors import UserError
from vltrain.rundir import RunDir

SCHEMA_VERSION = 1  # `files` in meta.json is optional: checkpoints written before it load unverified
DS_TAG = "ds"
DCP_DIR = "dcp"
FORMATS = {"ds": "deepspeed", "dcp": "fsdp"}  # meta.json "format" -> the parallel.strategy that writes it
MARKER = "COMPLETE"
META = "meta.json"
BAD_PREFIX = ".bad-"  # a checkpoint that failed verification, moved aside (never deleted)
_NAME = re.compile(r"step_(\d+)")
_PART = re.compile(r"files_rank(\d+)\.json")  # each rank's share of the manifest, merged by rank 0
_CHUNK = 8 << 20
_MB = 1e6


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


def check_compatible(path: Path, config_hash: str, world_size: int, fmt: str = "ds") -> dict[str, Any]:
    """meta.json of `path`, or a one-line UserError when this run (whose engine writes `fmt`) cannot
    resume from it. A DCP checkpoint resumes on any rank count; a DeepSpeed one on its own only."""
    meta = read_meta(path)
    written = meta.get("format", "ds")  # checkpoints from before DCP are DeepSpeed's
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
    if written != fmt:
        raise UserError(
            f"{path}: written under parallel.strategy '{FORMATS.get(written, written)}' but this run uses "
            f"'{FORMATS[fmt]}'; allowed: --set parallel.strategy={FORMATS.get(written, written)}, or a new run directory"
        )
    if fmt == "ds" and meta.get("world_size") != world_size:
        raise UserError(
            f"{path}: written by {meta.get('world_size')} ranks but this run has {world_size}; "
            f"allowed: resume with {meta.get('world_size')} ranks, or a new run directory"
        )
    return meta


def check_newest(run_dir: str | Path, config_hash: str, world_size: int, fmt: str = "ds") -> None:
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
    comm=None,
) -> Path:
    """Collective: every rank calls it at the same step. Returns the final path once it is visible.

    `comm`: the trainer's vltrain.collectives.Collectives (on the process group's device); `barrier`
    stands in for it in single-process callers. At each point where the ranks wait for each other
    they also agree on whether a write failed anywhere (a full disk, a quota): if one did, rank 0
    removes the `.tmp-` directory and every rank raises the same CheckpointWriteError, instead of one
    rank failing while the others wait in the next collective until the time-out."""
    sync = _Sync(comm, barrier, rank, world_size)
    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    free_before = free_bytes(root)
    renamed = False

    def agree(error: BaseException | None) -> None:
        problem = None if error is None else write_problem(error, engine, run_dir, root, final.name, free_before, keep)
        problem = sync.first_problem(problem)
        if problem is None:
            return
        if rank == 0 and not renamed:
            shutil.rmtree(tmp, ignore_errors=True)  # never the newest, and its space back for the failure record
        sync.barrier()
        raise CheckpointWriteError(problem)

    error: BaseException | None = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by an attempt killed while writing
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    agree(error)
    errors: list[BaseException] = []
    fmt = getattr(engine, "checkpoint_format", "ds")
    extra: dict[str, Any] = {}
    try:
        if fmt == "dcp":
            _save_dcp(engine, tmp / DCP_DIR, errors)
            extra["engine"] = engine.extra_state()
        else:
            ds = getattr(engine, "ds", engine)  # vltrain.engine.DeepSpeedEngine, or DeepSpeed's own
            with _keep_going(ds, errors):  # a failed write inside DeepSpeed must not skip its collectives
                ds.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        state = {
            "schema": SCHEMA_VERSION,
            "step": step,
            "samples": samples,
            "rank": rank,
            "world_size": world_size,
            "config_hash": config_hash,
            "rng": rng_state(),
            **extra,
            **trainer_state,
        }
        with open(tmp / f"trainer_rank{rank:05d}.pt", "wb") as f:  # a Python file: ENOSPC keeps its errno
            torch.save(state, f)
    except Exception as e:
        if not is_write_error(e):
            raise
        errors.append(e)
    agree(errors[0] if errors else None)  # every rank's files are written (rank 0's listing below sees them all)
    error = None
    try:
        files = {}
        for f in owned_files(tmp, rank):  # durable before COMPLETE says so
            if _PART.fullmatch(f.name):
                continue
            _fsync(f)
            size, crc = file_digest(f)  # from the page cache, just written
            files[f.relative_to(tmp).as_posix()] = {"size": size, "crc32": crc, "rank": rank}
        _write_durable(tmp / f"files_rank{rank:05d}.json", json.dumps(files).encode())
    except OSError as e:
        error = e
    agree(error)
    error = None
    if rank == 0:
        try:
            meta = {
                "schema": SCHEMA_VERSION,
                "step": step,
                "samples": samples,
                "world_size": world_size,
                "format": fmt,
                "config_hash": config_hash,
                "time": time.time(),
                "files": _merge_parts(tmp, world_size),
            }
            raw = (json.dumps(meta, indent=2) + "\n").encode()
            _write_durable(tmp / META, raw)
            _write_durable(tmp / MARKER, f"{step}\n{META} {len(raw)} {zlib.crc32(raw):08x}\n".encode())
            if final.exists():  # same step saved before a crash that came before the next checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
            renamed = True
            _fsync(root)
        except OSError as e:
            error = e
        else:
            prune(run_dir, keep)
    agree(error)  # nobody moves on (or exits) before the checkpoint is visible
    return final


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


def _save_dcp(engine, directory: Path, errors: list[BaseException]) -> None:
    """engine.save (DCP, collective). DCP gathers every rank's write result to rank 0 and raises the
    same CheckpointException on every rank when one failed: its first write error goes to `errors`
    (the ranks then agree on it as on any other), anything else is raised."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        engine.save(directory)
    except CheckpointException as e:
        inner = [getattr(f, "exc", f) for _, f in sorted(e.failures.items())]
        write = [x for x in inner if isinstance(x, BaseException) and is_write_error(x)]
        if not write:
            raise
        errors.append(write[0])


@contextlib.contextmanager
def _keep_going(engine, errors: list[BaseException]):
    """For the duration, DeepSpeed's file writes (its checkpoint engine's save, the recovery scripts it
    copies) record a write error in `errors` instead of raising it: DeepSpeed's save_checkpoint holds
    barriers, and a rank that left it early would leave the others waiting in them."""
    patched = []
    for owner, name in ((getattr(engine, "checkpoint_engine", None), "save"), (engine, "_copy_recovery_script")):
        fn = getattr(owner, name, None) if owner is not None else None
        if not callable(fn):
            continue

        def wrapper(*args, _fn=fn, **kwargs):
            try:
                return _fn(*args, **kwargs)
            except Exception as e:
                if not is_write_error(e):
                    raise
                errors.append(e)
                return None

        patched.append((owner, name, vars(owner).get(name, _UNSET)))
        setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for owner, name, before in patched:
            if before is _UNSET:
                delattr(owner, name)
            else:
                setattr(owner, name, before)


_UNSET = object()
# torch.save to a path writes through C++ and loses errno: a failed write reads like this
_TORCH_WRITE_WORDS = ("unexpected pos", "file write failed", "PytorchStreamWriter failed", "No space left", "quota")


def is_write_error(exc: BaseException) -> bool:
    """A failed file write (full disk, quota, read-only or failing filesystem), not a lost peer."""
    if isinstance(exc, OSError):
        return not isinstance(exc, (ConnectionError, TimeoutError))
    return isinstance(exc, RuntimeError) and any(w in str(exc) for w in _TORCH_WRITE_WORDS)


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (or its nearest
    existing parent); -1 when unknown."""
    try:
        st = os.statvfs(_existing(Path(path)))
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def filesystem(path: str | Path) -> str:
    """The device and mount point holding `path`, e.g. '/dev/nvme0n1p2 mounted at /scratch' (Linux's
    /proc/self/mountinfo; 'the filesystem' elsewhere)."""
    target = os.path.realpath(_existing(Path(path)))
    best: tuple[str, str] | None = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[1])):
            best = (tail[1] if tail[1] not in ("none", "") else tail[0], mount)
    return f"{best[0]} mounted at {best[1]}" if best else "the filesystem"


def checkpoint_bytes(path: Path) -> int:
    """The size of a complete checkpoint: its manifest's sum, else what its files hold."""
    try:
        files = read_meta(path).get("files")
        if isinstance(files, dict):
            return sum(int(e["size"]) for e in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def estimate_bytes(engine, run_dir: str | Path) -> int:
    """What the next checkpoint of this run will take on disk: the newest complete one's size, else
    the model in its dtype plus ZeRO's fp32 master weights and Adam's two moments (12 bytes a
    parameter over all ranks); 0 when unknown."""
    done = complete_checkpoints(run_dir)
    if done:
        with contextlib.suppress(OSError):
            return checkpoint_bytes(done[-1][1])
    module = getattr(engine, "module", None)
    if module is None:
        return 0
    params = list(module.parameters())
    return sum(p.numel() * (p.element_size() + 12) for p in params)


def _mb(n: float) -> str:
    return f"{n / _MB:.1f}" if 0 <= n < 10 * _MB else f"{n / _MB:,.0f}"


def write_problem(
    exc: BaseException, engine, run_dir: str | Path, where: Path, name: str, free_before: int, keep: int
) -> str:
    """One line for a failed checkpoint write: 'no space left on <device> (<path>): N MB free, the
    checkpoint needs ~M MB; allowed: ...' when the disk is full (ENOSPC, or torch's errno-less write
    failure with less free space than a checkpoint takes), 'disk quota exceeded ...' for EDQUOT, else
    what the write said."""
    need = estimate_bytes(engine, run_dir)
    now = free_bytes(where)
    fs = filesystem(where)
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    code = getattr(exc, "errno", None)
    torch_write = isinstance(exc, RuntimeError) and any(w in text for w in _TORCH_WRITE_WORDS)
    quota = code == errno.EDQUOT or "quota" in text.lower()
    full = code == errno.ENOSPC or "No space left" in text or (torch_write and 0 <= now < max(need, _MB))
    free = free_before if free_before >= 0 else now
    needs = f"~{_mb(need)} MB" if need else "more"
    if full or quota:
        head = "disk quota exceeded" if quota else "no space left"
        return (
            f"{head} on {fs} ({where}): {_mb(free)} MB free, checkpoint {name} needs {needs}; allowed: "
            f"free space there{' (or a larger quota)' if quota else ''}, a lower keep_checkpoints (now {keep}), "
            f"or a run directory on a larger filesystem"
        )
    return (
        f"cannot write checkpoint {name} to {where} ({type(exc).__name__}: {text}); {_mb(free)} MB free on "
        f"{fs}, it needs {needs}; allowed: a writable run directory with room for {keep + 1} checkpoints"
    )


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
    """Restore model, optimizer and schedule into `engine`; return this rank's trainer state (RNG not yet applied).

    A DCP checkpoint written by another rank count: DCP reshards model and optimizer; rank r takes the
    trainer state of rank r mod the old count (loader positions and engine state agree across ranks;
    the loop maps the loader's with `remap_loader_state`)."""
    if getattr(engine, "checkpoint_format", "ds") == "dcp":
        engine.load(path / DCP_DIR)
        written = int(read_meta(path).get("world_size", 1))
        state = torch.load(path / f"trainer_rank{rank % written:05d}.pt", weights_only=False)
        engine.load_extra_state(state["engine"])
        return state
    ds = getattr(engine, "ds", engine)
    with mmap_loads(ds):
        load_path, _ = ds.load_checkpoint(
            str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise UserError(
            f"{path}: DeepSpeed found no checkpoint under {DS_TAG}/; allowed: a directory written by vltrain"
        )
    # Our own file (trusted: written by this trainer into the run directory); RNG states need pickle.
    return torch.load(path / f"trainer_rank{rank:05d}.pt", weights_only=False)


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
    consumed = int(state["position"]) * old // world_size
    per_rank = int(state["num_samples"]) // world_size
    epoch = int(state["epoch"]) + consumed // per_rank
    return state | {"rank": rank, "world_size": world_size, "epoch": epoch, "position": consumed % per_rank}


def module_state(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, without DeepSpeed or a process group (evaluation on one
    process). DCP: full tensors of every `model.` entry its metadata lists, read with no_dist=True
    (whatever rank count and layout wrote them)."""
    if (path / DCP_DIR).is_dir():
        return _dcp_module_state(path / DCP_DIR)
    files = sorted((path / DS_TAG).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise UserError(f"{path}: no model states under {DS_TAG}/; allowed: a complete vltrain checkpoint")
    return torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)["module"]


def _dcp_module_state(directory: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    try:
        entries = reader.read_metadata().state_dict_metadata
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(
            f"{directory}: DCP metadata cannot be read ({e}); allowed: a complete vltrain checkpoint"
        ) from None
    model = {
        key.removeprefix("model."): torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in entries.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    if not model:
        raise UserError(f"{directory}: no model states in the DCP checkpoint; allowed: a complete vltrain checkpoint")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model
