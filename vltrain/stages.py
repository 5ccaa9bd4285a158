"""Staged recipes (curricula): which [[stages]] entry, and so which loss weights, an optimizer step uses.

Pure and torch-free. The step alone decides the stage, so a run resumed from any checkpoint lands in
the stage it was in, and crossing a boundary needs no state of its own in the checkpoint. Steps are
counted from 1, as in metrics.jsonl: step s is the s-th optimizer step; a stage of `steps` n that
starts after step a covers steps a+1 .. a+n.
"""

from __future__ import annotations

from vltrain.config import LossConfig, TrainConfig, stage_loss


def stage_bounds(cfg: TrainConfig) -> list[tuple[int, int]]:
    """(first, last) step of each stage, inclusive; one stage over the whole run without [[stages]]."""
    if not cfg.stages:
        return [(1, cfg.steps)]
    out, start = [], 1
    for st in cfg.stages:
        end = start + st.steps - 1 if st.steps else cfg.steps  # the last stage may take the rest
        out.append((start, end))
        start = end + 1
    return out


def stage_at(cfg: TrainConfig, step: int) -> tuple[int, LossConfig]:
    """(index of the stage, its loss config) at optimizer step `step` (1-based; below 1 counts as 1,
    beyond the run's steps as the last stage's)."""
    if not cfg.stages:
        return 0, cfg.loss
    bounds = stage_bounds(cfg)
    index = next((i for i, (_, last) in enumerate(bounds) if step <= last), len(bounds) - 1)
    return index, stage_loss(cfg.loss, cfg.stages[index].loss, index)


def stage_name(cfg: TrainConfig, index: int) -> str:
    """The stage's name, or 'stage N' (1-based) when it has none."""
    name = cfg.stages[index].name if cfg.stages else ""
    return name or f"stage {index + 1}"
