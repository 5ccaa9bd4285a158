"""A profile's `[container]` table: the image every rank runs in (backends/container.py builds the
command from it). Its own module so that profiles.py stays under the module-size limit; profiles
re-exports `Container`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vltrain.common.schema import field

CONTAINER_IMAGE = r"[A-Za-z0-9_./:@+#\-]{1,512}"
CONTAINER_MOUNT = r"/[A-Za-z0-9_./+@\-]{0,511}(:/[A-Za-z0-9_./+@\-]{0,511}(:(ro|rw))?)?"


@dataclass(frozen=True, kw_only=True)
class Container:
    """The image every rank runs in: pyxis (srun --container-image, enroot) or Apptainer (apptainer exec)."""

    runtime: str = field("how the image runs", choices=("pyxis", "apptainer"))
    image: str = field(
        "the image: for pyxis a registry reference or a .sqsh file, for apptainer a .sif file or a docker:// URI",
        pattern=CONTAINER_IMAGE,
        allowed="1-512 characters of letters, digits and _ . / : @ + # -",
    )
    mounts: tuple[str, ...] = field(
        "host paths made visible in the container (SRC[:DST[:ro|rw]]; the run directory is added)",
        default=(),
        pattern=CONTAINER_MOUNT,
        allowed="absolute paths SRC[:DST[:ro|rw]] of letters, digits and _ . / + @ -",
        max_items=64,
    )
    workdir: str | None = field(
        "working directory inside the container (none: the run directory)",
        default=None,
        pattern=r"/[A-Za-z0-9_./+@\-]{0,511}",
        allowed="an absolute path of letters, digits and _ . / + @ -",
    )
    python: str = field(
        "the interpreter in the image (on its PATH, or a path); the image holds clusterctl, vltrain, submitit",
        default="python",
        pattern=r"[A-Za-z0-9_./+\-]{1,256}",
        allowed="a command name or path of letters, digits and _ . / + -",
    )
