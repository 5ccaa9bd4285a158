"""Split a global batch into micro batch x accumulation x data-parallel ranks, exactly.

Pure arithmetic shared by the planner (clusterctl plan/submit) and the trainer, so the batch a run
trains with is the batch it was planned with. Errors name the config fields (global_batch,
micro_batch, accumulation); a CLI that took them as flags renames them (FieldError.as_flags). The seeds fix the global batch (2048 or 8192) and the
cluster fixes the data-parallel degree; what is left to choose is how many samples each rank pushes
through the model at once (micro batch) and how many micro steps it accumulates before an optimizer
step. Fewer accumulation steps means fewer, larger kernels, so without a fixed value we take the
largest micro batch that fits in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from vltrain.common.errors import FieldError, UserError

FIELDS = ("global_batch", "micro_batch", "accumulation")  # the config fields these errors name


@dataclass(frozen=True)
class BatchSplit:
    micro_batch: int
    accumulation: int
    data_parallel: int
    global_batch: int

    @property
    def per_rank(self) -> int:
        """Samples each data-parallel rank contributes to one optimizer step."""
        return self.micro_batch * self.accumulation


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def nearest_multiples(n: int, unit: int, count: int = 2) -> list[int]:
    """Valid global batches (multiples of `unit`) nearest to n, below then above."""
    below = (n // unit) * unit
    out = [below - unit * i for i in range(count - 1, -1, -1) if below - unit * i > 0]
    out = [b for b in out if b != n]
    above = [below + unit * i for i in range(1, count + 1)]
    return out + [b for b in above if b != n][:count]


def split_batch(
    global_batch: int,
    data_parallel: int,
    micro_batch: int | None = None,
    accumulation: int | None = None,
    max_micro_batch: int | None = None,
) -> BatchSplit:
    """micro x accumulation x data_parallel == global_batch, or a one-line UserError saying what would work.

    `max_micro_batch` is the memory limit (largest micro batch that fits); with neither micro batch
    nor accumulation fixed the largest valid micro batch under it is chosen.
    """
    per_rank = samples_per_rank(global_batch, data_parallel)
    choices = divisors(per_rank)
    of = f"the {per_rank} samples per rank (global batch {global_batch} / {data_parallel} ranks)"
    if micro_batch is not None and accumulation is not None:
        if micro_batch * accumulation != per_rank:
            raise FieldError(
                f"micro_batch {micro_batch} x accumulation {accumulation} x {data_parallel} ranks = "
                f"{micro_batch * accumulation * data_parallel}, not the global batch {global_batch}; "
                f"allowed: micro x accum = {per_rank} per rank",
                FIELDS,
            )
    elif micro_batch is not None:
        accumulation = _other_factor("micro_batch", micro_batch, per_rank, choices, of)
    elif accumulation is not None:
        micro_batch = _other_factor("accumulation", accumulation, per_rank, choices, of)
    else:
        micro_batch = largest_fitting_micro_batch(choices, max_micro_batch)
        accumulation = per_rank // micro_batch
    _check_fits(micro_batch, max_micro_batch, choices)
    return BatchSplit(micro_batch, accumulation, data_parallel, global_batch)


def samples_per_rank(global_batch: int, data_parallel: int) -> int:
    """global_batch / data_parallel, or a FieldError naming the nearest global batches the ranks can share."""
    if global_batch < 1:
        raise FieldError(f"global_batch: {global_batch} is not valid; allowed: a positive integer", FIELDS)
    if data_parallel < 1:
        raise UserError(f"data-parallel degree: {data_parallel} is not valid; allowed: a positive integer")
    if global_batch % data_parallel:
        near = nearest_multiples(global_batch, data_parallel)
        best = min(near, key=lambda b: (abs(b - global_batch), -b))
        micro = ", ".join(map(str, divisors(best // data_parallel)))
        raise FieldError(
            f"global_batch: {global_batch} is not divisible by the {data_parallel} data-parallel ranks; "
            f"allowed: a multiple of {data_parallel}, e.g. {', '.join(map(str, near))} "
            f"(with {best}: micro batch {micro} per GPU)",
            FIELDS,
        )
    return global_batch // data_parallel


def _other_factor(field: str, value: int, per_rank: int, choices: list[int], of: str) -> int:
    """per_rank / value for a fixed micro_batch or accumulation (`field`), refused when it does not divide."""
    if value < 1 or per_rank % value:
        shown = ", ".join(map(str, choices[:12])) + (", ..." if len(choices) > 12 else "")
        raise FieldError(f"{field}: {value} does not divide {of}; allowed: {shown}", FIELDS)
    return per_rank // value


def largest_fitting_micro_batch(choices: list[int], max_micro_batch: int | None) -> int:
    """The largest divisor of the per-rank samples (`choices`, ascending) within the memory limit (None: any)."""
    fitting = choices if max_micro_batch is None else [d for d in choices if d <= max_micro_batch]
    if not fitting:
        raise FieldError(
            f"global_batch: not even a micro batch of 1 fits in GPU memory (limit {max_micro_batch}); "
            f"allowed: more GPUs, a higher ZeRO stage, activation checkpointing, or a smaller model",
            FIELDS,
        )
    return fitting[-1]


def _check_fits(micro_batch: int, max_micro_batch: int | None, choices: list[int]) -> None:
    """Refuse a micro batch above the memory limit, listing the ones that fit."""
    if max_micro_batch is not None and micro_batch > max_micro_batch:
        fit = [d for d in choices if d <= max_micro_batch]
        raise FieldError(
            f"micro_batch: {micro_batch} does not fit in GPU memory (at most {max_micro_batch} per GPU); "
            f"allowed: {', '.join(map(str, fit)) or 'none - more GPUs or a higher ZeRO stage'}",
            FIELDS,
        )
