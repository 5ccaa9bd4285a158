"""Energy and carbon measured during training: one codecarbon tracker per node, never per rank.

Known ways trackers get this wrong, and what this module does about each:
- one tracker per rank counts a node N times -> only local rank 0 runs a tracker (`machine` mode
  measures the whole node);
- all GPUs of a node are counted when one is allocated -> `gpu_ids` = the allocated devices;
- a killed job loses its energy -> the tracker flushes every `flush_every_s` seconds, the first time
  after FIRST_FLUSH_S ("update" mode rewrites one cumulative row, so the file always holds the total
  up to the last flush);
- requeued attempts overwrite each other -> each attempt writes its own file
  `energy/node<NNN>-<attempt>.csv`; reports sum the files.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vltrain.rundir import ENERGY_FLUSH_S, JobEnv, RunDir

if TYPE_CHECKING:
    from vltrain.distenv import DistEnv


def attempt_tag(env: dict[str, str] | None = None) -> str:
    """A name unique to this attempt of the run: Slurm job id + restart count, or the local pid."""
    env = dict(os.environ if env is None else env)
    job = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or f"pid{os.getpid()}"
    restart = env.get("SLURM_RESTART_COUNT", "0")
    return f"job{job}-r{restart}-{int(time.time())}"


class NodeEnergy:
    """codecarbon's offline tracker for one node; a do-nothing sink on every other rank."""

    def __init__(
        self,
        run_dir: Path,
        *,
        local_rank: int,
        node_rank: int,
        country: str,
        pue: float = 1.0,
        gpu_ids: list[int] | None = None,
        flush_every_s: float = 60.0,
        measure_power_secs: float = 15.0,
        tag: str | None = None,
        rank: int = 0,
    ) -> None:
        self.enabled = local_rank == 0
        self.rank = rank  # the global rank that measures: written to each timeline line, so a test (or a
        # user) can see that one rank per node measured, not every rank
        self.path = RunDir(run_dir).energy_file(node_rank, tag or attempt_tag())
        self._flush_every_s = flush_every_s
        self._last_flush = 0.0
        self._tracker = None
        if not self.enabled:
            return
        os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")  # must precede the import to silence it
        from codecarbon import OfflineEmissionsTracker

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tracker = OfflineEmissionsTracker(
            country_iso_code=country,
            pue=pue,
            output_dir=str(self.path.parent),
            output_file=self.path.name,
            on_csv_write="update",
            measure_power_secs=measure_power_secs,
            log_level="error",
            project_name=Path(run_dir).name,
            gpu_ids=gpu_ids,
            tracking_mode="machine",
            allow_multiple_runs=True,
        )

    FIRST_FLUSH_S = 20.0  # the first total is written this soon (after codecarbon's first reading),
    # so `clusterctl watch` shows kWh within seconds of the start rather than after a whole interval

    def start(self) -> None:
        if self._tracker is not None:
            with cpu_brand_from_proc():
                self._tracker.start()
            self._last_flush = time.monotonic() - max(0.0, self._flush_every_s - self.FIRST_FLUSH_S)

    def maybe_flush(self, force: bool = False) -> None:
        """Persist the running total (cheap to call every step; writes at most every flush_every_s)."""
        if self._tracker is None:
            return
        now = time.monotonic()
        if force or now - self._last_flush >= self._flush_every_s:
            self._tracker.flush()
            self._last_flush = now
            self._append_timeline()

    def stop(self) -> None:
        if self._tracker is not None:
            self._tracker.stop()
            self._tracker = None
            self._append_timeline()

    @property
    def timeline_path(self) -> Path:
        return self.path.with_suffix(".timeline.jsonl")

    def _append_timeline(self) -> None:
        """One line per flush with the cumulative total, for the energy-over-time plots: codecarbon's
        'update' mode keeps only the latest row, so the history is recorded here."""
        try:
            rows = list(csv.DictReader(self.path.read_text().splitlines()))
            row = rows[-1]
            line = {
                "time": time.time(),
                "energy_kwh": float(row["energy_consumed"]),
                "co2_kg": float(row["emissions"]),
                "duration_s": float(row["duration"]),
                "rank": self.rank,
                "host": socket.gethostname(),
            }
        except (OSError, IndexError, KeyError, ValueError):
            return
        with self.timeline_path.open("a") as f:
            f.write(json.dumps(line) + "\n")


class StartingEnergy:
    """A NodeEnergy made and started on a thread, so that codecarbon's set-up overlaps the trainer's start
    instead of delaying its first step: importing it (pandas) and probing the hardware, mostly waiting
    for subprocesses (nvidia-smi, rocm-smi, lscpu; py-cpuinfo's probe is skipped: cpu_brand_from_proc):
    1.3-2.2 s measured on slurm-local's rank 0 before that skip. Flushes before it is ready are skipped; `stop`
    waits for it. An error in the set-up is raised where the tracker is next used, as before. A fork
    (the data loader's workers) waits for the set-up first: a child must not inherit an import
    half-done by this thread (its module lock would never be released there)."""

    def __init__(self, make: Callable[[], NodeEnergy]) -> None:
        self._energy: NodeEnergy | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, args=(make,), name="vltrain-energy-start", daemon=True)
        ref = weakref.ref(self)  # the handler stays registered for the process's life; this object need not
        os.register_at_fork(before=lambda: _join_before_fork(ref()))
        self._thread.start()

    def _start(self, make: Callable[[], NodeEnergy]) -> None:
        try:
            energy = make()
            energy.start()
            self._energy = energy
        except BaseException as e:  # raised in the training thread (`_ready`)
            self._error = e

    def _ready(self, wait: bool) -> NodeEnergy | None:
        if wait:
            self._thread.join()
        elif self._thread.is_alive():
            return None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._energy

    def maybe_flush(self, force: bool = False) -> None:
        energy = self._ready(wait=force)
        if energy is not None:
            energy.maybe_flush(force)

    def stop(self) -> None:
        energy, self._energy = self._ready(wait=True), None
        if energy is not None:
            energy.stop()


def _join_before_fork(energy: StartingEnergy | None) -> None:
    if energy is not None and threading.current_thread() is not energy._thread:
        energy._thread.join()


def proc_cpu_brand(cpuinfo_text: str) -> str | None:
    """The CPU's brand string as the kernel read it from CPUID (/proc/cpuinfo's "model name"); None where the
    file has none (ARM)."""
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return None


@contextlib.contextmanager
def cpu_brand_from_proc(path: Path = Path("/proc/cpuinfo")) -> Iterator[None]:
    """codecarbon asks py-cpuinfo for the CPU's brand (to look up its TDP), and py-cpuinfo finds it by
    probing the CPU in a child Python for ~1 s of a full core (CPUID, a clock measurement): on a node whose
    cores all train, that second is taken from the first steps (1.3 s of a 2-node slurm-local run's time
    to first step, issue 29). The brand is the string the kernel already shows in /proc/cpuinfo, so it is
    read there while the tracker starts; without one, py-cpuinfo asks as before. Written by hand because
    neither library lets the caller pass the CPU model."""
    try:
        brand = proc_cpu_brand(path.read_text())
    except OSError:
        brand = None
    try:
        import cpuinfo  # type: ignore[import-untyped]
    except ImportError:
        brand = None
    if brand is None:
        yield
        return
    probe = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = lambda: {"brand_raw": brand}
    try:
        yield
    finally:
        cpuinfo.get_cpu_info = probe


def start_node_energy(run_dir: Path, dist: DistEnv, job_env: JobEnv) -> StartingEnergy | None:
    """This rank's part of the node's tracker when clusterctl set the site's country (else None), set up
    on a thread (StartingEnergy); flushed every $VLTRAIN_ENERGY_FLUSH_S (60 s)."""
    if not job_env.country:
        return None
    country, pue, gpu_ids = job_env.country, job_env.pue, visible_gpu_ids()
    flush_s = float(os.environ.get(ENERGY_FLUSH_S, "60") or 60)
    return StartingEnergy(
        lambda: NodeEnergy(
            run_dir,
            local_rank=dist.local_rank,
            node_rank=dist.node_rank,
            country=country,
            pue=pue,
            gpu_ids=gpu_ids,
            rank=dist.rank,
            flush_every_s=flush_s,
        )
    )


def visible_gpu_ids() -> list[int] | None:
    """The GPUs this job was given (CUDA_VISIBLE_DEVICES), so codecarbon counts only those."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    try:
        return [int(x) for x in raw.split(",") if x.strip()] or None
    except ValueError:  # UUID-style device names: let codecarbon see all GPUs rather than guess
        return None
