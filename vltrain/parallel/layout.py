"""Which tensor x pipeline x data-parallel layouts the model and the strategy can take (pure, torch-free).

One list of rules, read by the trainer at start and by clusterctl's `plan` and `submit` (which refuse
the first in one line, exit 2), so that nothing is planned that the trainer would refuse. Each message
names the config field (`parallel.tp`, `parallel.pp`, `zero_stage`, `accumulation`; a CLI that took the
value as a flag names the flag) and what is allowed.

The rules, and why:
  * tp divides the attention heads of both towers (vision_heads; text_heads, which the text encoder,
    the fusion blocks and the decoder share) and every MLP hidden size: column-parallel q, k, v and fc1
    give each rank whole heads and an equal slice of the hidden units (vltrain.parallel.tensor_parallel).
  * tp divides the GPUs of a node: tensor-parallel peers are adjacent ranks (the mesh's innermost dim)
    and all-reduce activations twice per block forward and twice backward, which only NVLink carries
    at speed; a group that straddles two nodes would run them over the network.
  * pp stages hold contiguous ranges of the pipeline blocks (vision, text, fusion, decoder blocks in
    that order, `PIPELINE_TOWERS`), balanced by cost (vltrain.parallel.stage_split: the split the
    trainer runs and the planner sizes); each stage needs at least one block, each virtual stage of the
    interleaved schedule too (2 per rank).
  * world = tp x pp x dp.
  * microbatches (the accumulation steps) as torch.distributed.pipelining's schedules require them:
    Schedule1F1B raises when n_microbatches < the number of stages (a stage without a microbatch of its
    own would idle through the steady state); ScheduleInterleaved1F1B needs n_microbatches to be a
    multiple of its rounds, max(1, n // pp); ScheduleGPipe takes any number.
  * tp or pp > 1 only under parallel.strategy "fsdp" (DeepSpeed here is ZeRO data parallel only);
    under "fsdp" zero_stage is 2 (parameters kept gathered from forward to backward) or 3 (resharded
    after forward): FSDP always shards gradients and optimizer states, so 0 and 1 do not exist there.
  * masked image modelling (loss.mim > 0, in any training stage) is not run with pp > 1: its encoder
    pass is the whole ViT, which a pipeline spreads over stages, and the pipeline stages do not carry
    its decoder. This rule is the only refusal: the trainer checks `layout_problems` before it builds a
    pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vltrain.engines import spec as engine_spec
from vltrain.model_math import mlp_hidden

if TYPE_CHECKING:
    from vltrain.config import TrainConfig
    from vltrain.model_config import ModelConfig

VIRTUAL_STAGES = {"1f1b": 1, "gpipe": 1, "interleaved1f1b": 2}  # model chunks per pipeline rank
# The towers whose blocks a pipeline splits, in the order the forward runs them: (tower, the ModelConfig
# field that counts its blocks). vltrain.parallel.pipeline maps each to the model's block container.
PIPELINE_TOWERS = (
    ("vision", "vision_layers"),
    ("text", "text_layers"),
    ("fusion", "fusion_layers"),
    ("decoder", "decoder_layers"),
)


def tower_blocks(model: ModelConfig) -> dict[str, int]:
    """Blocks per tower, in pipeline order."""
    return {tower: getattr(model, field) for tower, field in PIPELINE_TOWERS}


def pipeline_blocks(model: ModelConfig) -> int:
    """Transformer blocks a pipeline splits: vision + text + fusion + decoder."""
    return sum(tower_blocks(model).values())


def data_parallel(world: int, tp: int, pp: int) -> int:
    """Data-parallel replicas: what tp x pp leave of the world (`layout_problems` checks it divides)."""
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"world {world} is not a multiple of tp {tp} x pp {pp}")
    return world // (tp * pp)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_model_problem(model: ModelConfig, tp: int) -> str | None:
    """Why the model's blocks cannot be split over `tp` ranks, or None."""
    for field, value in (("model.vision_heads", model.vision_heads), ("model.text_heads", model.text_heads)):
        if value % tp:
            return f"{tp} does not divide {field} {value} (each tensor-parallel rank computes whole heads)"
    for tower, width in (("vision", model.vision_width), ("text", model.text_width)):
        hidden = mlp_hidden(model, width)
        if hidden % tp:
            return (
                f"{tp} does not divide the {tower} MLP hidden size {hidden} (model.mlp_ratio x model.{tower}_width; "
                "each rank takes an equal slice of it)"
            )
    return None


def _tp_allowed(model: ModelConfig, world: int, gpus_per_node: int | None) -> list[int]:
    return [
        t
        for t in _divisors(world)
        if _tp_model_problem(model, t) is None and (gpus_per_node is None or gpus_per_node % t == 0)
    ]


def _join(values: list[int]) -> str:
    return ", ".join(map(str, values)) if values else "none"


def tp_problems(model: ModelConfig, tp: int, world: int, gpus_per_node: int | None) -> list[str]:
    """The tensor-parallel degree against the model's heads and hidden sizes, the world and a node."""
    allowed = f"allowed: {_join(_tp_allowed(model, world, gpus_per_node))}"
    why = _tp_model_problem(model, tp)
    if why:
        return [f"parallel.tp: {why}; {allowed}"]
    if world % tp:
        return [f"parallel.tp: {tp} does not divide the world size {world}; {allowed}"]
    if gpus_per_node is not None and gpus_per_node % tp:
        return [
            f"parallel.tp: {tp} does not divide a node's {gpus_per_node} GPUs: a tensor-parallel group would span "
            f"nodes, and its per-block all-reduces need the node's NVLink; {allowed}"
        ]
    return []


def pp_problems(model: ModelConfig, pp: int, tp: int, world: int, schedule: str) -> list[str]:
    """The pipeline degree against the world left by tp and the model's blocks."""
    blocks, virtual = pipeline_blocks(model), VIRTUAL_STAGES[schedule]
    rest = world // tp if world % tp == 0 else world
    allowed = f"allowed: {_join([p for p in _divisors(rest) if p * virtual <= blocks])}"
    if pp * virtual > blocks:
        chunks = f" x {virtual} virtual stages per rank ({schedule})" if virtual > 1 else ""
        return [
            f"parallel.pp: {pp} stages{chunks} is more than the model's {blocks} pipeline blocks (model.vision_layers "
            f"+ text_layers + fusion_layers + decoder_layers); {allowed}"
        ]
    if rest % pp:
        return [
            f"parallel.pp: {pp} does not divide the {rest} ranks left by parallel.tp {tp} (world {world}); {allowed}"
        ]
    return []


def microbatch_problem(accumulation: int, pp: int, schedule: str) -> str | None:
    """Whether torch.distributed.pipelining's schedule takes `accumulation` microbatches over `pp` ranks
    (the rule of its own constructor, see the module doc); None when it does, or when pp is 1."""
    n = accumulation
    if pp == 1 or n <= 0:
        return None
    if schedule == "1f1b" and n < pp:
        return (
            f"accumulation: {n} microbatch{'es are' if n > 1 else ' is'} fewer than the parallel.pp {pp} pipeline stages (torch's "
            f"Schedule1F1B needs one per stage, or stages idle); allowed: at least {pp}"
        )
    if schedule == "interleaved1f1b" and n % max(1, n // pp):
        return (
            f"accumulation: {n} microbatches do not split into torch's Interleaved1F1B rounds of parallel.pp {pp} "
            f"({n} is not a multiple of {n} // {pp} = {n // pp}); allowed: fewer than {2 * pp} or a multiple of {pp}"
        )
    return None


def strategy_problems(cfg: TrainConfig) -> list[str]:
    """What the chosen strategy does not take: model parallelism under DeepSpeed, ZeRO 0-1 under FSDP,
    masked image modelling with a pipeline."""
    p, out = cfg.parallel, []
    engine = engine_spec(p.strategy)  # its traits (vltrain.engines.ENGINES), without importing it
    if not engine.model_parallel:
        for name, value in (("tp", p.tp), ("pp", p.pp)):
            if value > 1:
                out.append(
                    f'parallel.{name}: {value} needs parallel.strategy = "fsdp" (DeepSpeed runs ZeRO data parallel '
                    f"only here); allowed: 1, or --set parallel.strategy=fsdp"
                )
    elif cfg.zero_stage not in engine.zero_stages:
        out.append(engine.zero_stage_rule.format(stage=cfg.zero_stage))
    if cfg.uses_mim() and p.pp > 1:
        where = "loss.mim" if cfg.loss.mim > 0 else "stages[].loss.mim"
        out.append(
            f"{where}: masked image modelling is not supported with pipeline parallel (parallel.pp {p.pp}); "
            f"allowed: {where} = 0, or parallel.pp 1"
        )
    return out


def hybrid_shard(ranks_per_node: int, tp: int, pp: int, dp: int) -> int:
    """Data-parallel ranks one hybrid-sharding shard group spans (parallel.sharding "hybrid"): a node's
    ranks over tp x pp, at most dp (the planner's clusterctl.planning.fsdp.ParallelLayout.shard_group)."""
    return max(1, min(dp, ranks_per_node // (tp * pp)))


def sharding_problem(cfg: TrainConfig, world: int, ranks_per_node: int | None) -> str | None:
    """parallel.sharding "hybrid" (shard within a node, replicate across nodes) needs an engine that runs
    it and, where the ranks per node are known, a dp that the node's shard group divides; None if fine."""
    p = cfg.parallel
    if p.sharding != "hybrid":
        return None
    if not engine_spec(p.strategy).hybrid_sharding:
        return (
            f'parallel.sharding: "hybrid" under parallel.strategy "{p.strategy}" (it shards over every data-parallel '
            'rank); allowed: "full", or --set parallel.strategy=fsdp'
        )
    if ranks_per_node is None or world % (p.tp * p.pp):
        return None
    dp = data_parallel(world, p.tp, p.pp)
    shard = hybrid_shard(ranks_per_node, p.tp, p.pp, dp)
    if dp % shard:
        return (
            f'parallel.sharding: "hybrid" shards over {shard} data-parallel ranks per node ({ranks_per_node} ranks '
            f'per node / (tp {p.tp} x pp {p.pp})), which does not divide dp {dp}; allowed: "full", or a world whose '
            f"dp is a multiple of {shard}"
        )
    return None


def mim_tp_problem(model: ModelConfig, tp: int) -> str | None:
    """The MIM decoder's Blocks are tensor-parallel too: tp must divide its heads and MLP hidden size."""
    width, heads, _ = model.mim_decoder_shape()
    hidden = mlp_hidden(model, width)
    for what, value in (("heads", heads), ("MLP hidden size", hidden)):
        if tp > 1 and value % tp:
            return (
                f"parallel.tp: {tp} does not divide the MIM decoder's {what} {value} (model.mim_decoder_width "
                f"{width}, model.mim_decoder_heads); allowed: a tp that divides it, or other mim_decoder_* sizes"
            )
    return None


def layout_problems(cfg: TrainConfig, world: int, gpus_per_node: int | None = None) -> list[str]:
    """Every rule of the module doc that `cfg` breaks on `world` ranks (`gpus_per_node`: None when not
    known, e.g. in the trainer, which then skips the node rule); empty when the layout is valid.
    `cfg.accumulation` 0 (the planner chooses) skips the microbatch rule."""
    from vltrain.presets import resolve_model

    model, p = resolve_model(cfg.model), cfg.parallel
    out = strategy_problems(cfg)
    out += tp_problems(model, p.tp, world, gpus_per_node)
    if cfg.uses_mim() and (why := mim_tp_problem(model, p.tp)):
        out.append(why)
    out += pp_problems(model, p.pp, p.tp, world, p.pp_schedule)
    mb = microbatch_problem(cfg.accumulation, p.pp, p.pp_schedule)
    sharding = sharding_problem(cfg, world, gpus_per_node)
    return out + ([mb] if mb else []) + ([sharding] if sharding else [])
