"""Divergence. After the per-step all_reduce every rank knows the step's losses and whether any rank's
optimizer skipped it (DeepSpeed skips a step whose gradient is not finite). A loss that is NaN or
infinite, or a logging interval whose every step was skipped once more than `max_skipped_steps` steps in
a row were (fp16's loss scaler skips a few while it settles; bf16 and fp32 skip none), ends the run on
every rank at the same step with `TrainingDiverged`: one line, recorded as the run's failure reason,
exit 2 (not 75: a retry from the last checkpoint diverges again), and no checkpoint of the diverged state.
"""

from __future__ import annotations

from vltrain.common.errors import UserError
from vltrain.config import TrainConfig


class TrainingDiverged(UserError):
    """The loss is not finite, or the optimizer skipped every step of a logging interval (beyond
    TrainConfig.max_skipped_steps in a row): the run stopped learning. Every rank raises it at the
    same step; the run ends FAILED and is not retried."""

    kind = "diverged"


def _num(x: float) -> str:
    return f"{x:.4g}"


def remedies(cfg: TrainConfig) -> str:
    from vltrain.dsconfig import warmup_steps

    o = cfg.optim
    parts = [f"a lower optim.lr (now {o.lr:g})", f"a longer warm-up (optim.warmup_steps, now {warmup_steps(cfg)})"]
    if o.grad_clip == 0:
        parts.append("gradient clipping (optim.grad_clip 1.0)")
    if cfg.precision == "fp16":
        parts.append("precision bf16, or a larger max_skipped_steps if the loss scale is still settling")
    return "allowed: " + ", ".join(parts) + ", in a new run directory (a checkpoint resumes only its own settings)"


def non_finite_loss(step: int, losses: dict[str, float], cfg: TrainConfig) -> str | None:
    """The divergence line when a loss of this step (mean over micro steps and ranks) is NaN or infinite."""
    import math

    if all(math.isfinite(v) for v in losses.values()):
        return None
    parts = ", ".join(f"{k} {_num(v)}" for k, v in losses.items() if k != "loss")
    return f"training diverged: loss is {_num(losses['loss'])} at step {step} ({parts}); {remedies(cfg)}"


def skipped_interval(
    step: int, interval_steps: int, interval_skipped: int, in_a_row: int, grad_norm, loss: float, cfg: TrainConfig
) -> str | None:
    """The divergence line when the optimizer skipped every step of the logging interval that ends
    at `step` and more than the tolerated steps in a row (cfg.skip_tolerance(): fp16's settling loss
    scale; none under bf16 and fp32)."""
    tolerance = cfg.skip_tolerance()
    if interval_steps <= 0 or interval_skipped < interval_steps or in_a_row <= tolerance:
        return None
    gn = "unknown" if grad_norm is None else _num(float(grad_norm))
    steps = f"step {step}" if in_a_row == 1 else f"the last {in_a_row} steps (to step {step})"
    return (
        f"training diverged: the optimizer skipped {steps} (gradient norm {gn}, loss {_num(loss)}; "
        f"{cfg.precision} tolerates {tolerance} skipped in a row, max_skipped_steps); {remedies(cfg)}"
    )
