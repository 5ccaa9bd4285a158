"""A thread that ends a rank hung outside any collective (exit 75: clusterctl requeues the run)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from vltrain.failures import record_failure
from vltrain.rundir import EXIT_COMM_ERROR, STALL_TIMEOUT_S


class Watchdog:
    """Exit 75 (cluster failure: clusterctl requeues the run) when no optimizer step has finished for
    too long. NCCL's timeout catches a rank waiting inside a collective for a lost peer; a rank hung
    outside one (a stuck data loader, a dead NFS mount, a deadlock) would otherwise hold every GPU
    of the job until the time limit. The first step (compilation, data start-up, checkpoint load)
    gets twice the limit."""

    def __init__(self, limit_s: float, run_dir: str | Path = ".", on_stall=None, poll_s: float | None = None) -> None:
        self.limit_s, self.run_dir = limit_s, run_dir
        self.on_stall = on_stall or self._exit
        self.poll_s = poll_s if poll_s is not None else min(30.0, limit_s / 10)
        self.last = time.monotonic()
        self.stepped = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._watch, name="vltrain-watchdog", daemon=True)
        self._thread.start()
        return self

    def progress(self) -> None:
        self.last = time.monotonic()
        self.stepped = True

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self.last
            if idle > (self.limit_s if self.stepped else 2 * self.limit_s):
                self.on_stall(idle)
                return

    def _exit(self, idle: float) -> None:
        print(
            f"vltrain: no optimizer step for {idle:.0f} s (limit {self.limit_s:g} s, {STALL_TIMEOUT_S}); "
            f"exit {EXIT_COMM_ERROR} so that the run is requeued",
            file=sys.stderr,
            flush=True,
        )
        record_failure(self.run_dir, TimeoutError(f"no optimizer step for {idle:.0f} s"), "stall")
        os._exit(EXIT_COMM_ERROR)
