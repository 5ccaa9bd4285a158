"""Imports that torch and DeepSpeed make at a trainer's start for features it never uses, kept out.

Measured on slurm-local (issue 29, bench/bench_start.py --detail): of a 2-node run's ~6.3 s to its first
step, 1.7 s per rank went to importing torch._dynamo and torch._inductor (sympy, networkx, ...) for
`torch.compile`, which vltrain does not call:

- torch.optim.Optimizer.add_param_group is wrapped by `torch._disable_dynamo`, which imports
  torch._dynamo on its first call (~0.9 s) to mark the method as one torch.compile must not trace;
- DeepSpeed's ZeRO 1-2 imports its Muon optimizer whatever the optimizer is (deepspeed/runtime/zero/
  utils.py is_zero_supported_optimizer, stage_1_and_2._get_flat_partition_unpadded), and that module
  decorates a function with `torch.compile()`, whose decorator form imports torch._dynamo to look up the
  default backend (~0.8 s more with torch._inductor).

Both are deferred, not removed: the wrapped method runs as it would outside a compiled region (where
torch._dynamo.disable changes nothing), and Muon's kernels are compiled at their first call, as
torch.compile would compile them anyway. Written by hand because neither library has a switch for it;
tests/test_startup_path.py fails when a torch or DeepSpeed upgrade brings the imports back.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

MUON_MODULES = ("deepspeed.runtime.zero.muon.original_muon", "deepspeed.runtime.zero.muon.muon_optimizer")


@contextlib.contextmanager
def optimizer_without_dynamo() -> Iterator[None]:
    """While building optimizers: add_param_group called as itself, not through torch._dynamo.disable
    (torch._compile._disable_dynamo caches the disabled function on the wrapped one as `__dynamo_disable`;
    it is given the function itself, and taken back after, so later calls behave as torch's)."""
    fn = getattr(torch.optim.Optimizer.add_param_group, "__wrapped__", None)
    if fn is None or getattr(fn, "__dynamo_disable", None) is not None or "torch._dynamo" in sys.modules:
        yield  # another torch, or torch._dynamo is loaded already: nothing to save
        return
    setattr(fn, "__dynamo_disable", fn)
    try:
        yield
    finally:
        if getattr(fn, "__dynamo_disable", None) is fn:
            delattr(fn, "__dynamo_disable")


def _deferred_compile(real: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile with the compile (and torch._dynamo's import) at the compiled function's first call."""

    def compile_(model: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            compiled: list[Callable[..., Any]] = []

            @functools.wraps(fn)
            def call(*args: Any, **kw: Any) -> Any:
                if not compiled:
                    compiled.append(real(fn, **kwargs))
                return compiled[0](*args, **kw)

            return call

        return wrap if model is None else wrap(model)

    return compile_


def import_muon_lazily() -> None:
    """Import DeepSpeed's Muon modules (if this DeepSpeed has them) with torch.compile deferred, so that
    ZeRO's unconditional imports of them find them loaded and import no torch._dynamo."""
    if all(m in sys.modules for m in MUON_MODULES) or "torch._dynamo" in sys.modules:
        return
    real = torch.compile
    setattr(torch, "compile", _deferred_compile(real))  # noqa: B010 (mypy: a module's function)
    try:
        for name in MUON_MODULES:
            with contextlib.suppress(ImportError):  # an older DeepSpeed without Muon
                importlib.import_module(name)
    finally:
        setattr(torch, "compile", real)  # noqa: B010
