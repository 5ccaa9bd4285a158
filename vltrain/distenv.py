"""Who am I in the job: rank, world size, local rank, node and rendezvous address, from the launcher.

One trainer, four launchers, each describing the job in its own environment variables:
  torchrun             RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  submitit (Slurm or   submitit.JobEnvironment (SLURM_* or SUBMITIT_LOCAL_*); master = first host
  its local executor)
  srun without submitit SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_JOB_NODELIST
  a plain `python`     a single process on 127.0.0.1 and a free port
`detect` is pure (an env mapping in, a DistEnv out); `export` writes the torch.distributed variables
that deepspeed.init_distributed reads (without them it tries MPI discovery and fails on mpi4py).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from vltrain.common.errors import UserError
from vltrain.rundir import JobEnv

PORT_BASE, PORT_SPAN = 20000, 20000  # rendezvous ports derived from the job id fall in [20000, 40000)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "submitit-slurm" | "submitit-local" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def port_for_job(job_id: str) -> int:
    """The same port on every rank of a job (and of its requeued attempts), different across jobs."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UserError(f"environment: {name} is not set; allowed: run under torchrun, srun or submitit")
        return default
    try:
        return int(raw.split("(")[0])  # SLURM_TASKS_PER_NODE looks like "4(x2)"
    except ValueError:
        raise UserError(f"environment: {name}={raw!r} is not an integer") from None


def _first_host(nodelist: str) -> str:
    """First hostname of a Slurm node list ("gpu[01-04,07],cpu3" -> "gpu01"), via submitit's parser."""
    if not nodelist:
        return "127.0.0.1"
    from submitit.slurm.slurm import _parse_node_list  # the parser submitit's JobEnvironment uses

    return _parse_node_list(nodelist)[0]


def detect(env: Mapping[str, str], free_port: int | None = None) -> DistEnv:
    """The job's layout from its environment (pure). `free_port` is used only for a single process."""
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        rank = _int(env, "RANK")
        return DistEnv(
            rank,
            world,
            _int(env, "LOCAL_RANK", 0),
            local_world,
            _int(env, "GROUP_RANK", rank // local_world),
            env["MASTER_ADDR"],
            _int(env, "MASTER_PORT"),
            "torchrun",
        )
    executor = env.get("SUBMITIT_EXECUTOR", "")
    if executor == "local":
        world = _int(env, "SUBMITIT_LOCAL_NTASKS", 1)
        return DistEnv(
            _int(env, "SUBMITIT_LOCAL_GLOBALID", 0),
            world,
            _int(env, "SUBMITIT_LOCAL_LOCALID", 0),
            world,
            _int(env, "SUBMITIT_LOCAL_NODEID", 0),
            "127.0.0.1",
            port_for_job(env.get("SUBMITIT_LOCAL_JOB_ID", "0")),
            "submitit-local",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        nodes = _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", 1))
        job = env.get("SLURM_ARRAY_JOB_ID", "") + env.get("SLURM_ARRAY_TASK_ID", "") or env.get("SLURM_JOB_ID", "0")
        return DistEnv(
            _int(env, "SLURM_PROCID"),
            world,
            _int(env, "SLURM_LOCALID", 0),
            max(1, world // nodes),
            _int(env, "SLURM_NODEID", 0),
            _first_host(env.get("SLURM_JOB_NODELIST", "")),
            port_for_job(job),
            "submitit-slurm" if executor == "slurm" else "slurm",
        )
    return DistEnv(0, 1, 0, 1, 0, "127.0.0.1", free_port or PORT_BASE, "single")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(wanted: str, cuda_available: bool, host: str = "") -> str:
    """'cuda' or 'cpu' for this run (pure). `wanted` is what the profile says (JobEnv.device; empty
    when run by hand: the machine decides). A CUDA profile on a machine without CUDA is an error:
    silently training a 30B model on CPU over gloo is not a fallback anyone wants."""
    if wanted == "cuda" and not cuda_available:
        raise UserError(
            f"{JobEnv.DEVICE}: cuda (the profile has GPUs) but CUDA is not available{' on ' + host if host else ''}; "
            "allowed: a node with GPUs and a CUDA build of torch, or a profile with gpu.kind = 'cpu'"
        )
    if wanted in ("cuda", "cpu"):
        return wanted
    return "cuda" if cuda_available else "cpu"


def backend(device: str) -> str:
    """nccl on CUDA, gloo on CPU."""
    return "nccl" if device == "cuda" else "gloo"


def cuda_index(local_rank: int, device_count: int) -> int:
    """The GPU of this rank: LOCAL_RANK modulo the GPUs it sees, so that sites that bind one GPU per
    task (each rank sees a single device 0) work as well as those that show all of a node's."""
    return local_rank % max(1, device_count)


def export(dist: DistEnv, device: str = "cpu", environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Write the torch.distributed variables init_distributed reads, DeepSpeed's accelerator, and
    TORCH_EXTENSIONS_DIR (this environment's own extension cache, `extensions_dir`) when unset.

    DS_ACCELERATOR is set from the run's device, overriding one inherited from the submitting
    shell (sbatch exports the caller's environment): a leaked 'cpu' would put a CUDA run on CPU."""
    environ.update(
        RANK=str(dist.rank),
        WORLD_SIZE=str(dist.world_size),
        LOCAL_RANK=str(dist.local_rank),
        LOCAL_WORLD_SIZE=str(dist.local_world_size),
        MASTER_ADDR=dist.master_addr,
        MASTER_PORT=str(dist.master_port),
        DS_ACCELERATOR=device,
    )
    if "TORCH_EXTENSIONS_DIR" not in environ:  # the user's choice stands
        import torch

        accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        environ["TORCH_EXTENSIONS_DIR"] = extensions_dir(sys.prefix, environ, accel)


def extensions_dir(prefix: str, environ: Mapping[str, str], accel: str = "cpu") -> str:
    """This environment's own cache of JIT-built extensions (DeepSpeed's shared-memory comm op on CPU):
    <cache>/torch_extensions/py311_cpu-<hash of the interpreter prefix>; pure.

    torch's default, <cache>/torch_extensions/py311_cpu, is one directory for every environment of a
    user: a build from another venv (other headers, other torch) fails torch's check and is rebuilt,
    tens of seconds to minutes on 2 cores, at every start that follows a start from the other. Keyed
    by the prefix in the user's cache rather than inside the venv, which may be read-only (a shared
    team environment, a container image)."""
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(os.path.realpath(prefix).encode()).hexdigest()[:12]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}"
    return os.path.join(cache, "torch_extensions", f"{tag}-{key}")


def current() -> DistEnv:
    """This process's layout (a free port is picked only when it runs alone)."""
    env = dict(os.environ)
    single = not any(k in env for k in ("RANK", "SUBMITIT_EXECUTOR", "SLURM_PROCID"))
    return detect(env, free_port() if single else None)
