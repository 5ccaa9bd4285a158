"""The numbers of one optimizer step that the ranks sum (one all_reduce per step), and their sums over a
logging interval. Named fields here; a float64 tensor only for the collective (`to_tensor` / `from_tensor`,
one field order), so that nothing outside this module addresses the numbers by offset."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vltrain.config import LossConfig
    from vltrain.model_config import ModelConfig

LOSSES = ("loss", "itc", "mlm", "caption", "mim")  # VLModel.forward's loss terms, in the order logged


@dataclasses.dataclass
class StepNumbers:
    """One rank's numbers of one optimizer step, or (from_tensor after the all_reduce) their sums over ranks.

    The stop flags are 1 when this rank received the signal; `skipped` 1 when its optimizer skipped the
    step (a gradient not finite). Losses (sums over the step's micro batches), micro steps, real text
    tokens, model and hardware FLOPs (`flops_per_sample`), seconds and data-wait seconds come from
    reporter ranks only (one per data-parallel replica: RankLayout.reporter) and are 0 elsewhere, so
    that their sums over ranks count each sample once.
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
    hw_flops: float = 0.0  # with what the model runs but does not train, and the recomputation

    def to_tensor(self) -> Any:
        """float64 [2 + len(LOSSES) + 7]: the all_reduce's payload."""
        import torch

        values = [self.preempt, self.terminate, *self.losses]
        values += [self.micro, self.tokens, self.flops, self.seconds, self.wait_s, self.skipped, self.hw_flops]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: Any) -> StepNumbers:
        v = [float(x) for x in t.tolist()]
        n = len(LOSSES)
        micro, tokens, flops, seconds, wait_s, skipped, hw_flops = v[2 + n :]
        return cls(v[0], v[1], tuple(v[2 : 2 + n]), micro, tokens, flops, seconds, wait_s, skipped, hw_flops)

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
    hw_flops: float = 0.0
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
        self.hw_flops += step.hw_flops
        self.seconds += step.seconds
        self.wait_s += step.wait_s
        skipped = step.skipped > 0  # on any rank (DeepSpeed's overflow check agrees across ranks anyway)
        self.steps += 1
        self.skipped += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0

    def reset(self) -> None:
        """After a logged step: a new interval (the run of skipped steps goes on)."""
        vars(self).update(vars(Interval(in_a_row=self.in_a_row)))


def flops_per_sample(
    mcfg: ModelConfig, text_len: int, loss: LossConfig, checkpointing: bool, pipelined: bool = False
) -> tuple[float, float]:
    """(model, hardware) FLOPs of one sample's training step at this padded text length, for MFU and HFU.

    Model FLOPs (PaLM's MFU): forward + backward (3 x the forward) of the objectives that train, those
    with weight > 0 in the stage's `loss`, and no recomputation. Hardware FLOPs: the forward that runs
    x 3, x 4 with activation checkpointing (the blocks' forward runs again in backward). The whole
    model runs only the objectives weighted > 0 (VLModel._run_model); pipeline stages (`pipelined`)
    run ITC, MLM and captioning whatever their weights, and MIM when its weight is > 0."""
    from vltrain.model_math import active_objectives, forward_flops_per_sample

    ratio = loss.mim_mask_ratio if loss.mim > 0 else 0.0
    active = active_objectives(loss)
    model = 3 * forward_flops_per_sample(mcfg, text_len, ratio, objectives=active)
    runs = None if pipelined else active
    hardware = (4 if checkpointing else 3) * forward_flops_per_sample(mcfg, text_len, ratio, objectives=runs)
    return model, hardware
