"""Scheduler backends: where a run's jobs run, behind one interface (clusterctl.backends.api.Backend).

A profile's `executor` names its backend; each lives in `clusterctl/backends/<name>` and is imported
only when a run needs it (torchx's table of scheduler modules), so `status` on a machine without
Slurm never loads Slurm's code. To add one: a module with a `BACKEND` instance, and its name in
clusterctl.specs.EXECUTORS (docs/architecture.md, "Where to add a backend").
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from clusterctl.specs import EXECUTORS

if TYPE_CHECKING:
    from clusterctl.backends.api import Backend

BACKENDS: dict[str, str] = {name: f"clusterctl.backends.{name}" for name in EXECUTORS}


@functools.cache
def get_backend(executor: str) -> Backend:
    """The backend of an executor name (from a profile or a registry row), imported on first use."""
    if executor not in BACKENDS:
        raise ValueError(f"executor {executor!r} has no backend; known: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[executor]).BACKEND
