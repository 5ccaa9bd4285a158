"""What this trainer runs today, and what it does not yet: one list, read by the trainer (it refuses at
start) and by clusterctl's checks before sbatch (submit refuses, plan notes). A recipe may state more
than the trainer runs (seed 001's FSDP, seed 003's tensor/pipeline parallelism and fp16, seeds 001
and 004's masked image modelling); each refusal says what to use instead."""

from __future__ import annotations

from vltrain.config import TrainConfig


def not_run_yet(cfg: TrainConfig) -> list[str]:
    """One line per part of `cfg` the trainer does not run yet (pure); empty when it runs all of it."""
    out = []
    p = cfg.parallel
    if p.strategy == "fsdp":
        out.append(
            "parallel.strategy: 'fsdp' is not run by the trainer yet; allowed: deepspeed "
            "(--set parallel.strategy=deepspeed; ZeRO-2 is the nearest the trainer runs)"
        )
    if p.tp > 1 or p.pp > 1:
        out.append(
            f"parallel: tensor x pipeline parallel (tp {p.tp} x pp {p.pp}) is planned but not run by the "
            "trainer yet; allowed: --tp 1 --pp 1 (data parallel)"
        )
    if cfg.zero_stage == 3:
        out.append(
            "zero_stage: 3 is planned but not run by the trainer yet (rank-0 evaluation would deadlock "
            "stage 3's parameter gathers, and `vltrain eval` cannot read its sharded checkpoints); "
            "allowed: 0, 1, 2 (--zero-stage 2)"
        )
    if cfg.precision == "fp16":
        out.append("precision: fp16 is not run by the trainer yet; allowed: bf16 or fp32 (--set precision=bf16)")
    if cfg.loss.mim > 0:
        out.append("loss.mim: masked image modelling is not run by the trainer yet; allowed: 0 (--set loss.mim=0)")
    return out
