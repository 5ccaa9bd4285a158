"""A profile's [container] as the job script runs it: pyxis flags on srun, or `apptainer exec` around Python.

Only the command that starts each rank changes; the batch script itself (the profile's set-up lines,
clusterctl's `export`s, sbatch's own lines) runs on the host, and both runtimes hand the host
environment to the ranks. Both take the same mount syntax (SRC[:DST[:ro|rw]]), so a profile's
`container.mounts` go through as they are. Every function here is pure.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clusterctl.planning.profiles import ClusterProfile, Container

# The side job that runs clusterctl itself (the follow-up that retries a run after its job failed):
# it calls sbatch, squeue and sacct, which images rarely carry, so it runs on the host. Every other
# side job (the evaluation after training) runs the trainer, in the run's container like its attempts.
HOST_SIDE_KINDS = ("followup",)


def mounts(container: Container, run_dir: Path) -> list[str]:
    """What the job sees in the container: the run directory at its host path (submitit's pickles and
    logs, the checkpoints; the job names them by their host paths), then the profile's mounts (the
    data, the registry's directory: clusterctl does not guess them)."""
    own = str(Path(run_dir).absolute())
    return [own, *(m for m in container.mounts if m != own)]


def pyxis_args(container: Container, run_dir: Path, env: Iterable[str]) -> list[str]:
    """srun's pyxis flags. --container-env names clusterctl's exported variables: pyxis passes every
    exported host variable into the container, but a variable the image also sets keeps the image's
    value unless named there (pyxis' documented precedence), and clusterctl's NCCL, thread and
    trainer settings must win. --container-writable: caches the ranks write outside the mounts
    (DeepSpeed's and Triton's kernel builds) fail on a read-only image (enroot's ENROOT_ROOTFS_WRITABLE
    is a site setting)."""
    return [
        f"--container-image={container.image}",
        f"--container-mounts={','.join(mounts(container, run_dir))}",
        f"--container-workdir={container.workdir or Path(run_dir).absolute()}",
        f"--container-env={','.join(sorted(env))}",
        "--container-writable",
    ]


def apptainer_python(container: Container, run_dir: Path, gpu_kind: str) -> str:
    """The interpreter command of each rank under Apptainer: `apptainer exec --bind ... --pwd ...
    [--nv] IMAGE python` (submitit's `python`, which it runs as `<python> -u -m submitit.core._submit`).
    --nv binds the host's NVIDIA driver into the container, for CUDA profiles only."""
    argv = [
        "apptainer",
        "exec",
        "--bind",
        ",".join(mounts(container, run_dir)),
        "--pwd",
        container.workdir or str(Path(run_dir).absolute()),
        *(["--nv"] if gpu_kind == "cuda" else []),
        container.image,
        container.python,
    ]
    return shlex.join(argv)


def launch(profile: ClusterProfile, run_dir: Path, env: Iterable[str]) -> tuple[list[str], str | None]:
    """(extra srun arguments, the interpreter command) for one job of `profile`: ([], None), this
    machine's Python, without a container."""
    c = profile.container
    if c is None:
        return [], None
    if c.runtime == "pyxis":
        return pyxis_args(c, run_dir, env), shlex.quote(c.python)
    return [], apptainer_python(c, run_dir, profile.gpu.kind)
