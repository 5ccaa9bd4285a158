"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (pure, torch-free).

Written out (as nanoGPT's `get_lr`) rather than taken from DeepSpeed's WarmupCosineLR: ours takes the
warm-up as steps or as a fraction of the run (vltrain.dsconfig.warmup_steps) and decays to an
absolute `min_lr`, and the same function feeds torch's LambdaLR, the planner and the tests.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """LR of optimizer step `step` (0-based) in a run of `total` steps.

    Warm-up: step s < warmup uses peak * (s + 1) / warmup, so the first step already moves and step
    warmup - 1 reaches the peak. Then cosine from peak (at s = warmup) down to min_lr (at s = total - 1);
    steps past the end stay at min_lr.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = total - 1 - warmup
    if decay_steps <= 0:
        return peak
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_factor(step: int, *, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """lr_at / peak: the multiplier torch.optim.lr_scheduler.LambdaLR expects."""
    return lr_at(step, peak=peak, min_lr=min_lr, warmup=warmup, total=total) / peak
