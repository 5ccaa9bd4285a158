"""A CPU cluster's measured rates: the [calibration] table of a profile (pure; issue 29).

`clusterctl profiles calibrate NAME` writes it from a Slurm job laid out as a run of the profile
(every rank runs vltrain.calibrate.measure_rank at once; the medians over the ranks, the all-reduce
figures of rank 0). clusterctl.planning.cpu_predict turns it into a step time and a peak resident set.
Parsed by the profile's schema (vltrain.common.schema): an error names `<file>: calibration.<field>`
and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from vltrain.common.schema import field

ISO_UTC = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z"
ISO_UTC_DOC = "a UTC time in ISO 8601, e.g. 2026-12-07T09:12:00Z"
JOB_ID = r"local|\d{1,12}(_\d{1,9})?"
JOB_ID_DOC = "a Slurm job id (digits) or 'local'"
BLOCKS_DOC = 'a table of 1-64 "WIDTHxTOKENS" keys (each 1 .. 16384) to GFLOP/s > 0, e.g. {"256x512" = 19.3}'
SIZES_DOC = 'a table of 1-16 square matrix sizes ("64" .. "16384") to GFLOP/s > 0, e.g. {"256" = 20.1}'


def _sizes_problem(table: Mapping[str, float], pair: bool = False) -> str | None:
    """A table of rates: 1-16 (pair: 1-64) sizes, each a whole number 1..16384 (pair: two joined by 'x'),
    each rate a finite number > 0."""
    if not 1 <= len(table) <= (64 if pair else 16):
        return f"{len(table)} sizes"
    one = r"[1-9]\d{0,4}"
    for key, rate in table.items():
        if not re.fullmatch(f"{one}x{one}" if pair else one, key) or max(map(int, key.split("x"))) > 16384:
            return f"{key!r} is not a {'WIDTHxTOKENS pair' if pair else 'matrix size'}"
        if not (math.isfinite(rate) and rate > 0):
            return f"{key!r} = {rate} is not a rate"
    return None


@dataclass(frozen=True)
class Calibration:
    """What one rank of this cluster sustains, measured with all ranks of a run's layout at once."""

    measured_at: str = field("when it was measured", pattern=ISO_UTC, allowed=ISO_UTC_DOC)
    slurm_job: str = field("the job that measured", pattern=JOB_ID, allowed=JOB_ID_DOC)
    ranks: int = field("ranks that measured at once, laid out as a run's", min=1, max=100_000)
    threads_per_rank: int = field("torch threads in each rank", min=1, max=4096)
    matmul_gflops: dict[str, float] = field(
        "fp32 GFLOP/s per rank of a square N x N @ N x N product, by N", check=_sizes_problem, allowed=SIZES_DOC
    )
    op_overhead_us: float = field("one small op's forward + backward dispatch (us)", min=0.01, max=10_000)
    memory_gb_s: float = field("copy bandwidth per rank, bytes read + written (GB/s)", min=0.01, max=10_000)
    allreduce_gb_s: float = field("gloo all-reduce bus bandwidth, large messages (GB/s)", min=0.001, max=10_000)
    allreduce_latency_us: float = field("one 4-byte gloo all-reduce (us)", min=0.1, max=10_000_000)
    base_rss_mib: float = field("a rank's resident set before building a model (MiB)", min=1, max=10_000_000)
    block_gflops: dict[str, float] | None = field(
        "fp32 GFLOP/s of the trainer's transformer block, forward + backward, by WIDTHxTOKENS (None: not measured)",
        default=None,
        check=lambda t: _sizes_problem(t, pair=True),
        allowed=BLOCKS_DOC,
    )
    alloc_gb_s: float | None = field(
        "fresh zero-filled memory per second, page faults included (GB/s; None: not measured)",
        default=None,
        min=0.001,
        max=10_000,
    )
    adamw_ns: float | None = field(
        "torch AdamW per parameter of one fp32 tensor larger than the caches (ns; None: not measured)",
        default=None,
        min=0.001,
        max=1_000_000,
    )
    grad_accumulate_ns: float | None = field(
        "what summing a micro step's gradient into param.grad adds, per parameter (ns; None: not measured)",
        default=None,
        min=0,
        max=1_000_000,
    )
    fsdp_adamw_us: float | None = field(
        "FSDP's clip + AdamW + zero_grad per sharded parameter tensor (us; None: not measured)",
        default=None,
        min=0,
        max=10_000_000,
    )
    gather_us: float | None = field(
        "one differentiable all-gather between computing ranks, forward + backward (us; None: not measured)",
        default=None,
        min=0,
        max=10_000_000,
    )
    fsdp_unit_us: float | None = field(
        "what one FSDP2 unit adds to a micro step: hooks, all-gather copies and call (us; None: not measured)",
        default=None,
        min=0,
        max=10_000_000,
    )
    fsdp_unit_gb_s: float | None = field(
        "one FSDP2 unit's parameter bytes per second per micro step: gather, copies (GB/s; None: not measured)",
        default=None,
        min=0.001,
        max=10_000,
    )
    fsdp_imports_mib: float = field(
        "what FSDP2's imports (device mesh, DTensor) add to a rank's resident set (MiB; 0 if not measured)",
        default=0.0,
        min=0,
        max=100_000,
    )

    def matmul_rate(self, n: float) -> float:
        """GFLOP/s at an effective size `n`: linear in log N between the measured sizes, the end value past them."""
        return _interp(sorted((int(k), v) for k, v in self.matmul_gflops.items()), n)

    def block_rate(self, width: float, tokens: float) -> float | None:
        """Block GFLOP/s at `width` over `tokens`: linear in log width and log tokens between the measured
        points (the nearest measured tokens at each width, the end values past them); None if unmeasured."""
        if not self.block_gflops:
            return None
        grid: dict[int, dict[int, float]] = {}
        for key, rate in self.block_gflops.items():
            w, t = map(int, key.split("x"))
            grid.setdefault(w, {})[t] = rate
        by_width = {w: _interp(sorted(ts.items()), tokens) for w, ts in grid.items()}
        return _interp(sorted(by_width.items()), width)


def _interp(points: list[tuple[int, float]], x: float) -> float:
    """Linear in log x between sorted (x, y) points, the end values past them."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + math.log(x / x0) / math.log(x1 / x0) * (y1 - y0)
    return points[-1][1]
