"""What this trainer does not run: one list, read by the trainer (it refuses at start) and by clusterctl's
checks before sbatch (submit refuses, plan notes). Each refusal says what to use instead.

Two lists, split by what they need to know:
  * `not_run_yet(cfg)` (here): parts of the config the trainer has no code for, whatever the cluster:
    ZeRO-3 under parallel.strategy "deepspeed" (FSDP's zero_stage 3 is run); shard specs that are URLs
    or `pipe:` commands (it reads local files only, and webdataset would run a pipe's command:
    vltrain.data.shard_spec).
  * `vltrain.parallel.layout.layout_problems(cfg, world, gpus_per_node)`: layouts the model or the strategy
    cannot take (tp not dividing the heads, more stages than blocks, tp across nodes, tp/pp under DeepSpeed,
    ZeRO 0-1 under FSDP, MIM with a pipeline...). They need the world size, so the planner checks them
    where it has the profile (plan and submit refuse them, exit 2) and the trainer where it has the ranks.
FSDP, tensor and pipeline parallelism, fp16 (dynamic loss scaling) and masked image modelling are run.
"""

from __future__ import annotations

from vltrain.config import TrainConfig
from vltrain.data.shard_spec import url_problem
from vltrain.engines import spec


def not_run_yet(cfg: TrainConfig) -> list[str]:
    """One line per part of `cfg` the trainer does not run yet (pure); empty when it runs all of it."""
    out = []
    if cfg.zero_stage in spec(cfg.parallel.strategy).zero_stages_not_run:
        out.append(
            "zero_stage: 3 is planned but not run by the trainer yet under DeepSpeed (rank-0 evaluation would "
            "deadlock stage 3's parameter gathers, and `vltrain eval` cannot read its sharded checkpoints); "
            "allowed: 0, 1, 2 (--zero-stage 2), or --set parallel.strategy=fsdp (FSDP runs zero_stage 3)"
        )
    for key, shards in (("data.shards", cfg.data.shards), ("data.eval_shards", cfg.data.eval_shards)):
        if problem := url_problem(shards, key):
            out.append(problem)
    return out
