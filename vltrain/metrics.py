"""What a run reports: metrics.jsonl (one line per logged step), events.jsonl (life cycle), stdout lines.

Both files are appended to by rank 0 only, one JSON object per line, flushed at once, so
`clusterctl status/watch/report` can read them while the run goes and after it was killed; other
ranks get do-nothing sinks, so the loop never branches on the rank (torchtitan's habit). A requeued
run appends to the same files; after a crash the steps between the last checkpoint and the crash
are logged twice, and readers keep the last line per step.

metrics.jsonl keys: step, loss, itc, mlm, caption, lr, grad_norm, samples_per_s, tokens_per_s (real
text tokens), step_time_s (mean over the logged interval, data loading included), data_wait_s (the
part of step_time_s spent blocked waiting for the loader's batches, same mean), mfu (model FLOPs
utilisation: the objectives with weight > 0, no recomputation; null without a known peak), hfu
(hardware FLOPs utilisation: all the forward runs, recomputation included), mem_gib (peak allocated),
mem_reserved_gib and mem_peak_reserved_gib (the caching allocator's, now and at most; null on CPU),
samples (seen so far, all ranks), time (unix seconds).
events.jsonl keys: event (start | resume | checkpoint | preempt | timeout | finish | error), step,
time, attempt, plus event-specific fields.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vltrain.rundir import JobEnv, RunDir

if TYPE_CHECKING:
    from vltrain.config import TrackingConfig

# Dense bf16 tensor-core peaks (TFLOP/s) by CUDA device name, from the vendors' data sheets (SXM
# parts where both exist). Override with VLTRAIN_PEAK_TFLOPS (clusterctl sets it from the profile).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "A6000": 155.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


class JsonlSink:
    """Appends one JSON object per line and flushes it; a no-op when disabled (non-zero ranks).

    A full disk (ENOSPC, EDQUOT) does not end the run here: only rank 0 writes these files, and a rank
    that failed alone would leave the others waiting in the next collective until the time-out (exit
    75, retried). The line stays buffered (written when there is room again), one warning goes to
    stderr, and the next checkpoint, which every rank writes, ends the run on all of them with the
    full disk's one line (vltrain.checkpoint.CheckpointWriteError)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = Path(path), enabled
        self._f = None
        self._warned = False
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            try:
                self._f.write(json.dumps(record, allow_nan=True) + "\n")
                self._f.flush()
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if not self._warned:
                    self._warned = True
                    print(
                        f"vltrain: warning: cannot append to {self.path} ({e.strerror}); its lines wait in memory "
                        f"until there is room, and the next checkpoint ends the run if there is none",
                        file=sys.stderr,
                        flush=True,
                    )

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):  # the lines still waiting for room on a full disk
                self._f.close()
            self._f = None


class MetricsLog(JsonlSink):
    """metrics.jsonl first (the source of truth), then the same record to the [tracking] sinks."""

    def __init__(self, run_dir: Path, enabled: bool, tracking: TrackingConfig) -> None:
        from vltrain.tracking import Trackers

        super().__init__(RunDir(run_dir).metrics, enabled)
        self.trackers = Trackers(run_dir, tracking if enabled else None)

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        self.trackers.write(record)

    def close(self) -> None:
        super().close()
        self.trackers.close()


class EventLog(JsonlSink):
    def __init__(self, run_dir: Path, enabled: bool, attempt: int) -> None:
        super().__init__(RunDir(run_dir).events, enabled)
        self.attempt = attempt

    def emit(self, event: str, step: int, **fields: Any) -> None:
        self.write({"event": event, "step": step, "time": time.time(), "attempt": self.attempt, **fields})


def attempt_number(run_dir: Path, env: dict[str, str] | None = None) -> int:
    """0 for the first attempt; SLURM_RESTART_COUNT on Slurm, else the attempts logged before this one."""
    env = dict(os.environ if env is None else env)
    if env.get("SLURM_RESTART_COUNT", "").isdigit():
        return int(env["SLURM_RESTART_COUNT"])
    path = RunDir(run_dir).events
    if not path.exists():
        return 0
    count = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            count += json.loads(line).get("event") in ("start", "resume")
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return count


def peak_tflops(device_name: str | None, env: dict[str, str] | None = None) -> float | None:
    """Peak TFLOP/s of one device: VLTRAIN_PEAK_TFLOPS, else the table above, else None (unknown, e.g. CPU)."""
    env = dict(os.environ if env is None else env)
    if env.get(JobEnv.PEAK_TFLOPS):  # set by clusterctl from the profile: it wins, even when unreadable
        return JobEnv.from_env(env).peak_tflops
    if device_name:
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in device_name:
                return value
    return None


def mfu(flops_per_step: float, step_time_s: float, world_size: int, peak: float | None) -> float | None:
    """FLOPs utilisation: achieved FLOP/s per device over the device peak.

    MFU (PaLM's) with model FLOPs, HFU with hardware FLOPs (vltrain.stepstats.flops_per_sample: model
    FLOPs count the objectives with weight > 0 and no recomputation, hardware FLOPs all that runs).
    """
    if not peak or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / world_size / (peak * 1e12)


def memory_stats(device) -> dict[str, float | None]:
    """mem_gib: peak memory allocated by tensors (CUDA), else this process's peak resident set (CPU);
    mem_reserved_gib, mem_peak_reserved_gib: what PyTorch's caching allocator holds now and at most
    (CUDA; None elsewhere). Reserved minus allocated is the allocator's cache and fragmentation: the
    out-of-memory error comes when reserved reaches the device's memory, not allocated."""
    import torch

    if device is not None and getattr(device, "type", "cpu") == "cuda":
        return {
            "mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
            "mem_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    import resource

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"mem_gib": peak_rss, "mem_reserved_gib": None, "mem_peak_reserved_gib": None}


def human_line(rec: dict[str, Any], total_steps: int) -> str:
    """The line rank 0 prints per logged step (what `clusterctl logs` shows)."""
    mfu_s = f" | mfu {rec['mfu'] * 100:.1f}%" if rec.get("mfu") is not None else ""
    hfu_s = f" hfu {rec['hfu'] * 100:.1f}%" if rec.get("hfu") is not None else ""
    reserved = rec.get("mem_reserved_gib")
    res_s = f" (reserved {reserved:.2f}, peak {rec['mem_peak_reserved_gib']:.2f})" if reserved is not None else ""
    wait = rec.get("data_wait_s")
    wait_s = f" (data wait {wait * 1000:.0f} ms)" if wait is not None else ""
    gn = rec.get("grad_norm")
    mim = f" mim {rec['mim']:.3f}" if rec.get("mim") else ""  # only when masked image modelling runs
    return (
        f"step {rec['step']}/{total_steps} | loss {rec['loss']:.4f} (itc {rec['itc']:.3f} mlm {rec['mlm']:.3f} "
        f"cap {rec['caption']:.3f}{mim}) | lr {rec['lr']:.2e} | gnorm {gn if gn is None else f'{gn:.2f}'} | "
        f"{rec['samples_per_s']:.0f} samples/s | {rec['step_time_s'] * 1000:.0f} ms/step{wait_s}{mfu_s}{hfu_s} | "
        f"{rec['mem_gib']:.2f} GiB{res_s}"
    )


def say(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
