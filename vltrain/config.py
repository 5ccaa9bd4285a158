"""Typed configuration of a training run: model, data, optimizer, schedule, loss, checkpoints.

One source of truth for the trainer (vltrain) and the planner (clusterctl plan/submit). Pure and
torch-free: clusterctl imports this module on its fast path. A train config is a TOML file whose
tables mirror these dataclasses; `load_train_config` validates it with one-line errors.

The model's architecture is `vltrain.model_config.ModelConfig`; named sizes of it live in
`vltrain.presets`, which also resolves a config's `model` (a preset name or a [model] table).
Imports run one way: config -> presets -> model_config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vltrain.common.errors import UserError
from vltrain.common.schema import build, field
from vltrain.model_config import ModelConfig
from vltrain.presets import PRESETS


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    shards: str = field("WebDataset shards: a directory or a brace pattern", default="")
    eval_shards: str = field("held-out shards for evaluation", default="")
    tokenizer: str = field("SentencePiece model file", default="")
    workers: int = field("dataloader workers per rank", default=0, min=0, max=64)
    random_crop: bool = field("random resized crop", default=True)
    hflip: bool = field("random horizontal flip", default=True)
    randaugment: bool = field("RandAugment (seed 001)", default=False)
    shuffle_buffer: int = field("in-epoch shuffle buffer (samples)", default=1000, min=0, max=1_000_000)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = field("peak learning rate", default=1e-4, min=1e-9, max=10.0)
    min_lr: float = field("cosine floor (0 = decay to zero)", default=0.0, min=0.0, max=10.0)
    betas: list[float] = field("AdamW betas", default_factory=lambda: [0.9, 0.95])
    weight_decay: float = field("AdamW decoupled weight decay", default=0.1, min=0.0, max=10.0)
    eps: float = field("AdamW epsilon", default=1e-8, min=0.0, max=1.0)
    grad_clip: float = field("gradient norm clipping (0 = off)", default=1.0, min=0.0, max=1e6)
    warmup_steps: int = field("linear warm-up steps (0 with warmup_fraction)", default=0, min=0, max=10**9)
    warmup_fraction: float = field("warm-up as a fraction of total steps", default=0.0, min=0.0, max=1.0)

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise UserError(f"optim.min_lr: {self.min_lr:g} exceeds optim.lr {self.lr:g}; allowed: 0 to lr")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"optim.betas: {self.betas} is not valid; allowed: two numbers in [0, 1)")
        if self.warmup_steps and self.warmup_fraction:
            raise UserError("optim.warmup_fraction: set together with warmup_steps; allowed: one of the two")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    itc: float = field("image-text contrastive weight", default=1.0, min=0.0, max=100.0)
    mlm: float = field("masked language modelling weight", default=1.0, min=0.0, max=100.0)
    caption: float = field("captioning weight", default=1.0, min=0.0, max=100.0)
    mask_prob: float = field("MLM masking probability", default=0.15, min=0.01, max=0.9)
    init_temperature: float = field("initial contrastive temperature", default=0.07, min=0.001, max=1.0)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A whole run. `global_batch` is split by the planner into micro batch x accumulation x DP."""

    model: str | ModelConfig = field("preset name or a [model] table", default="tiny")
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    global_batch: int = field("samples per optimizer step", default=32, min=1, max=10**7)
    micro_batch: int = field("samples per rank per micro step (0 = planner chooses)", default=0, min=0, max=10**6)
    accumulation: int = field("micro steps per optimizer step (0 = planner chooses)", default=0, min=0, max=10**6)
    steps: int = field("optimizer steps in the run", default=100, min=1, max=10**10)
    zero_stage: int = field("DeepSpeed ZeRO stage", default=2, min=0, max=3)
    precision: str = field("training precision", default="bf16", choices=("bf16", "fp32"))
    activation_checkpointing: bool = field("recompute activations in the backward pass", default=False)
    seed: int = field("seed for init, data order and masking", default=0, min=0, max=2**31 - 1)
    log_every: int = field("optimizer steps between metrics lines", default=1, min=1, max=10**6)
    checkpoint_every: int = field(
        "optimizer steps between checkpoints (0 = only at the end)", default=50, min=0, max=10**9
    )
    keep_checkpoints: int = field("complete checkpoints kept", default=3, min=1, max=1000)
    eval_every: int = field("optimizer steps between evaluations (0 = only at the end)", default=0, min=0, max=10**9)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of what must match for a checkpoint to resume this run (model, batch, optimizer, loss)."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("model", "optim", "loss", "global_batch", "zero_stage", "precision", "seed")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def parse_train_config(data: dict[str, Any], where: str) -> TrainConfig:
    """Validate a parsed TOML table as a train config (pure); preset names are checked here too."""
    try:
        cfg: TrainConfig = build(TrainConfig, data, where)
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    if isinstance(cfg.model, str) and cfg.model not in PRESETS:
        raise UserError(f"{where}: model: unknown preset {cfg.model!r}; allowed: {', '.join(PRESETS)}")
    return cfg


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML train config (or the defaults) and apply dotted overrides like {'optim.lr': 3e-4}."""
    data: dict[str, Any] = {}
    where = str(path) if path else "<defaults>"
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{where}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{where}: invalid TOML: {e}") from None
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {p} is not a table")
        node[leaf] = value
    return parse_train_config(data, where)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """--set key=value pairs; the value is a TOML literal (3e-4, true, "x", [0.9, 0.95]) or a bare string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set: {item!r} is not key=value; allowed: e.g. --set optim.lr=3e-4")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out
