"""The numbers of one optimizer step that the ranks sum (one all_reduce per step), and their sums over a
logging interval. Named fields here; a float64 tensor only for the collective (`to_tensor` / `from_tensor`,
one field order), so that nothing outside this module addresses the numbers by offset."""

from __future__ import annotations

import dataclasses
from typing import Any

LOSSES = ("loss", "itc", "mlm", "caption", "mim")  # VLModel.forward's loss terms, in the order logged


@dataclasses.dataclass
class StepNumbers:
    """One rank's numbers of one optimizer step, or (from_tensor after the all_reduce) their sums over ranks.

    The stop flags are 1 when this rank received the signal; `skipped` 1 when its optimizer skipped the
    step (a gradient not finite). Losses (sums over the step's micro batches), micro steps, real text
    tokens, model FLOPs, seconds and data-wait seconds come from reporter ranks only (one per data-parallel
    replica: RankLayout.reporter) and are 0 elsewhere, so that their sums over ranks count each sample once.
    """

    preempt: float = 0.0  # submitit's preemption / time-out signal (vltrain.signals)
    terminate: float = 0.0  # SIGTERM
    losses: tuple[float, ...] = (0.0,) * len(LOSSES)
    micro: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    seconds: float = 0.0
    wait_s: float = 0.0  # of `seconds`, blocked in the loader's next()
    skipped: float = 0.0

    def to_tensor(self) -> Any:
        """float64 [2 + len(LOSSES) + 6]: the all_reduce's payload."""
        import torch

        values = [self.preempt, self.terminate, *self.losses]
        values += [self.micro, self.tokens, self.flops, self.seconds, self.wait_s, self.skipped]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: Any) -> StepNumbers:
        v = [float(x) for x in t.tolist()]
        n = len(LOSSES)
        micro, tokens, flops, seconds, wait_s, skipped = v[2 + n :]
        return cls(v[0], v[1], tuple(v[2 : 2 + n]), micro, tokens, flops, seconds, wait_s, skipped)

    def only_flags(self) -> StepNumbers:
        """What a rank that does not report contributes: its stop flags and whether it skipped."""
        return StepNumbers(preempt=self.preempt, terminate=self.terminate, skipped=self.skipped)

    @property
    def stop(self) -> bool:
        return self.preempt > 0 or self.terminate > 0

    def mean_losses(self) -> dict[str, float]:
        """Each loss term's mean over the micro steps (of every reporter rank)."""
        return {k: self.losses[i] / self.micro for i, k in enumerate(LOSSES)}


@dataclasses.dataclass
class Interval:
    """Sums over the optimizer steps since the last logged one, and the optimizer's skips among them."""

    losses: list[float] = dataclasses.field(default_factory=lambda: [0.0] * len(LOSSES))
    micro: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    seconds: float = 0.0
    wait_s: float = 0.0
    steps: int = 0
    skipped: int = 0  # steps the optimizer skipped in the interval
    in_a_row: int = 0  # skipped steps in a row up to now (not reset with the interval)

    def add(self, step: StepNumbers) -> None:
        """A step's sums over ranks."""
        for i, x in enumerate(step.losses):
            self.losses[i] += x
        self.micro += step.micro
        self.tokens += step.tokens
        self.flops += step.flops
        self.seconds += step.seconds
        self.wait_s += step.wait_s
        skipped = step.skipped > 0  # on any rank (DeepSpeed's overflow check agrees across ranks anyway)
        self.steps += 1
        self.skipped += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0

    def reset(self) -> None:
        """After a logged step: a new interval (the run of skipped steps goes on)."""
        vars(self).update(vars(Interval(in_a_row=self.in_a_row)))
