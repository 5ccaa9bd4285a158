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
SIZES_DOC = 'a table of 1-16 square matrix sizes ("64" .. "16384") to GFLOP/s > 0, e.g. {"256" = 20.1}'


def _sizes_problem(table: Mapping[str, float]) -> str | None:
    """The matmul table: 1-16 sizes, each a whole number 1..16384, each rate a finite number > 0."""
    if not 1 <= len(table) <= 16:
        return f"{len(table)} sizes"
    for key, rate in table.items():
        if not re.fullmatch(r"[1-9]\d{0,4}", key) or int(key) > 16384:
            return f"{key!r} is not a matrix size"
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

    def matmul_rate(self, n: float) -> float:
        """GFLOP/s at an effective size `n`: linear in log N between the measured sizes, the end value past them."""
        points = sorted((int(k), v) for k, v in self.matmul_gflops.items())
        if n <= points[0][0]:
            return points[0][1]
        for (n0, r0), (n1, r1) in zip(points, points[1:], strict=False):
            if n <= n1:
                w = math.log(n / n0) / math.log(n1 / n0)
                return r0 + w * (r1 - r0)
        return points[-1][1]
