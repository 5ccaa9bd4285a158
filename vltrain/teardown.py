"""How a process that trained leaves: with the exit code its attempt decided, without C++ static destruction."""

from __future__ import annotations

import contextlib
import os
import sys


class NativeTeardown:
    """Skip C++ static destruction at the end of a process that trained (either engine).

    Measured here: about 1 in 6-8 pipelined attempts that had ended cleanly (checkpoint complete, every
    file closed) died at interpreter exit with "terminate called without an active exception" (SIGABRT,
    exit 134: a joinable native thread destroyed during static destruction, with no Python frame left;
    destroy_process_group() first did not prevent it; cf. pytorch/pytorch#179291). clusterctl reads 134 as
    an NCCL abort and retries, and torchrun reports the run failed. The same abort ended a DeepSpeed
    two-process stop/resume test in CI once (after ~1,200 clean ones), so every run installs it. So once the attempt has decided its exit
    code, the last atexit handler (registered first: atexit runs last-in first-out, so every other handler,
    submitit's result file included, has run) flushes and leaves with that code through os._exit."""

    code: int | None = None
    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            import atexit

            atexit.register(cls._exit)
            cls._installed = True

    @classmethod
    def decide(cls, code: int) -> None:
        cls.code = code

    @classmethod
    def _exit(cls) -> None:
        if cls.code is None:
            return  # not decided (a failure): the usual teardown
        code = 1 if getattr(sys, "last_value", None) is not None else cls.code  # the caller failed after us
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
