"""The training engines, one per `parallel.strategy`, chosen by this table and imported on use (as
clusterctl/backends are): the loop, the checkpoint protocol and evaluation never ask which one runs.

Each entry says what the rest of the trainer and the planner may know of an engine without importing it
(torch-free: vltrain.parallel.layout and clusterctl's planner read it): the module that holds its
`ENGINE` (a vltrain.engines.api.TrainEngine subclass), the name of the checkpoint format it writes (the
subdirectory of a checkpoint and meta.json's "format"), and the layout traits the layout rules check.
Only modules in this package import deepspeed or torch.distributed.checkpoint (tests/test_architecture.py).

Where to add an engine: a module here with `ENGINE = MyEngine` (api.TrainEngine: build, train_step,
save, load, eval_model, describe), an entry below, and its name in vltrain.config.STRATEGIES.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vltrain.engines.api import TrainEngine


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What is known of an engine before it is imported."""

    module: str  # holds ENGINE
    checkpoint_format: str  # meta.json "format" and the checkpoint subdirectory it writes
    reshards: bool  # its checkpoints resume on another rank count
    model_parallel: bool  # runs tensor and pipeline parallel (parallel.tp, parallel.pp > 1)
    zero_stages: tuple[int, ...]  # the zero_stage values it can take
    zero_stage_rule: str = ""  # why the others are refused, and what is allowed ({stage}: the value given)
    zero_stages_not_run: tuple[int, ...] = ()  # planned, but not run by the trainer yet (vltrain.support)
    hybrid_sharding: bool = False  # runs parallel.sharding "hybrid" (shard within a node, replicate across)
    fp16_cpu_needs_isa: bool = False  # fp16 on a CPU only with AVX512-FP16/AMX-FP16 (DeepSpeed's CPU accelerator)


ENGINES: dict[str, EngineSpec] = {
    "deepspeed": EngineSpec(
        "vltrain.engines.deepspeed",
        "ds",
        reshards=False,
        model_parallel=False,
        zero_stages=(0, 1, 2, 3),
        zero_stages_not_run=(3,),  # ZeRO-3: rank-0 evaluation would deadlock its gathers (vltrain.support)
        fp16_cpu_needs_isa=True,  # check_deepspeed_fp16 refuses it at start otherwise
    ),
    "fsdp": EngineSpec(
        "vltrain.engines.fsdp",
        "dcp",
        reshards=True,
        model_parallel=True,
        zero_stages=(2, 3),
        hybrid_sharding=True,
        zero_stage_rule=(
            "zero_stage: {stage} is not an FSDP layout (FSDP always shards gradients and optimizer states); "
            "allowed: 2 (parameters kept gathered from forward to backward) or 3 (resharded after forward) under "
            'parallel.strategy "fsdp"'
        ),
    ),
}


def spec(strategy: str) -> EngineSpec:
    """The table's entry of a strategy (vltrain.config validates the name before any run gets here)."""
    return ENGINES[strategy]


def strategy_of_format(fmt: str) -> str:
    """The strategy whose engine writes checkpoints of format `fmt` (the format itself when none does)."""
    return next((name for name, s in ENGINES.items() if s.checkpoint_format == fmt), fmt)


def engine_class(strategy: str) -> type[TrainEngine]:
    """The engine class of a strategy, its module imported now (DeepSpeed's takes seconds: only on use)."""
    return importlib.import_module(spec(strategy).module).ENGINE


def engine_for_format(fmt: str) -> type[TrainEngine]:
    """The engine class that reads checkpoints of format `fmt` (meta.json's "format")."""
    return engine_class(strategy_of_format(fmt))


def import_libraries() -> None:
    """Load what a training rank has loaded before it builds a model: every engine's module and the
    library the DeepSpeed engine imports on use (vltrain.calibrate's base resident set is that rank's)."""
    importlib.import_module("deepspeed")
    for spec in ENGINES.values():
        importlib.import_module(spec.module)
