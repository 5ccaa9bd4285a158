"""Typed configuration of a training run: model, data, optimizer, schedule, loss, checkpoints.

One source of truth for the trainer (vltrain) and the planner (clusterctl plan/submit). Pure and
torch-free: clusterctl imports this module on its fast path. A train config is a TOML file whose
tables mirror these dataclasses; `load_train_config` validates it with one-line errors.

The model's architecture is `vltrain.model_config.ModelConfig`; named sizes of it live in
`vltrain.presets`, which also resolves a config's `model` (a preset name or a [model] table).
Imports run one way: config -> presets -> model_config.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vltrain.common.errors import UserError
from vltrain.common.schema import build, check_depth, depth_words, field, parse_toml
from vltrain.engines import ENGINES
from vltrain.model_config import ModelConfig
from vltrain.presets import PRESETS


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    shards: str = field("WebDataset shards: a directory or a brace pattern", default="")
    eval_shards: str = field("held-out shards for evaluation", default="")
    tokenizer: str = field("SentencePiece model file", default="")
    classes: str = field(
        "classes.json for zero-shot classification (empty: the one beside the held-out shards, else beside "
        "data.shards)",
        default="",
    )
    workers: int = field(
        "dataloader workers per rank (-1: from the CPUs per task on GPU runs, none on CPU runs)",
        default=-1,
        min=-1,
        max=64,
    )
    random_crop: bool = field("random resized crop", default=True)
    hflip: bool = field("random horizontal flip", default=True)
    randaugment: bool = field("RandAugment (seed 001)", default=False)
    shuffle_buffer: int = field("in-epoch shuffle buffer (samples)", default=1000, min=0, max=1_000_000)
    samples: int = field(
        "image-text pairs in the training shards, for planning the loader's index memory "
        "(0: steps x global batch, one pass)",
        default=0,
        min=0,
        max=10**12,
    )


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
    mim: float = field("masked image modelling weight (MAE-style; seeds 001, 004)", default=0.0, min=0.0, max=100.0)
    mask_prob: float = field("MLM masking probability", default=0.15, min=0.01, max=0.9)
    mim_mask_ratio: float = field(
        "fraction of image patches masked for MIM (MAE: 0.75)", default=0.75, min=0.05, max=0.95
    )
    init_temperature: float = field("initial contrastive temperature", default=0.07, min=0.001, max=1.0)


# [tracking] sink -> the package that must be importable for it (the `tracking` extra installs all three).
TRACKING_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Dashboards fed the records of metrics.jsonl on rank 0, one tracker run per clusterctl run (vltrain.tracking)."""

    tensorboard: bool = field("TensorBoard event files in the run directory's tb/", default=False)
    wandb: bool = field("Weights & Biases, run id = the clusterctl run id (resumed by every attempt)", default=False)
    wandb_project: str = field("W&B project ('' = vltrain)", default="")
    wandb_entity: str = field("W&B entity ('' = the account's default)", default="")
    wandb_mode: str = field(
        "W&B mode (offline: `wandb sync` uploads later)", default="offline", choices=("offline", "online")
    )
    mlflow: bool = field("MLflow, one run tagged with the clusterctl run id", default=False)
    mlflow_tracking_uri: str = field("MLflow tracking URI ('' = MLFLOW_TRACKING_URI, else ./mlruns)", default="")
    mlflow_experiment: str = field("MLflow experiment ('' = vltrain)", default="")

    def __post_init__(self) -> None:
        import importlib.util  # a look on disk, no import: clusterctl checks configs on its fast path

        for sink in self.sinks():
            if importlib.util.find_spec(TRACKING_PACKAGES[sink]) is None:
                raise UserError(
                    f"tracking.{sink}: true but the {TRACKING_PACKAGES[sink]} package is not installed; allowed: "
                    f"false, or install the extra (pip install -c constraints.txt -e '.[tracking]')"
                )

    def sinks(self) -> list[str]:
        """The sinks turned on, in the order they are fed."""
        return [s for s in TRACKING_PACKAGES if getattr(self, s)]


# What a stage may change: the loss weights and the MIM mask ratio. The rest of a run (optimizer, LR
# schedule, data) spans all its stages: one schedule from the first step to the last.
STAGE_LOSS_KEYS = ("itc", "mlm", "caption", "mim", "mim_mask_ratio")


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """One stage of a curriculum ([[stages]]): its length and the [loss] figures it changes."""

    name: str = field("label of the stage in the log and its `stage` event", default="")
    steps: int = field(
        "optimizer steps of the stage (the last stage may leave it out: the rest of the run)",
        default=0,
        min=0,
        max=10**10,
    )
    loss: dict[str, float] = field(
        f"overrides of [loss] during the stage ({', '.join(STAGE_LOSS_KEYS)})", default_factory=dict
    )


def stage_loss(base: LossConfig, overrides: dict[str, float], index: int) -> LossConfig:
    """The run's [loss] with a stage's overrides, validated like [loss] itself (pure)."""
    unknown = [k for k in overrides if k not in STAGE_LOSS_KEYS]
    if unknown:
        raise UserError(f"stages[{index}].loss.{unknown[0]}: unknown key; allowed: {', '.join(STAGE_LOSS_KEYS)}")
    try:
        return build(LossConfig, {**dataclasses.asdict(base), **overrides}, "stage", prefix=f"stages[{index}].loss.")
    except UserError as e:
        raise UserError(str(e).removeprefix("stage: ")) from None


def _check_stages(stages: list[StageConfig], base: LossConfig, steps: int) -> None:
    """Every stage's loss is valid and the stages' lengths add up to the run's `steps`."""
    for i, st in enumerate(stages):
        stage_loss(base, st.loss, i)
        if st.steps == 0 and i < len(stages) - 1:
            raise UserError(
                f"stages[{i}].steps: missing; allowed: an integer >= 1 (only the last stage may leave it out, "
                "taking the rest of the run)"
            )
    fixed = sum(st.steps for st in stages)
    if stages[-1].steps and fixed != steps:
        raise UserError(
            f"stages: their steps sum to {fixed:,} but the run has steps = {steps:,}; allowed: a sum equal to "
            "steps, or no steps on the last stage (it takes the rest of the run)"
        )
    if not stages[-1].steps and fixed >= steps:
        raise UserError(
            f"stages: the stages before the last take {fixed:,} of the run's {steps:,} steps; allowed: fewer "
            "than steps, leaving at least one for the last stage"
        )


STRATEGIES = tuple(ENGINES)  # "deepspeed", "fsdp": the engines vltrain.engines lists
# fp16's dynamic loss scaler (vltrain.dsconfig: initial_scale_power 16, DeepSpeed's hysteresis 2) skips
# the steps whose gradients overflow while it halves its scale: from 2^16 to its floor of 1 that is
# 1 + 16 = 17 overflows in a row; a settling scale skips fewer, and DeepSpeed stops at the 18th.
FP16_SKIP_TOLERANCE = 17


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the model is spread over the ranks; data parallel takes what tp x pp leave."""

    strategy: str = field(
        "deepspeed: ZeRO data parallel (zero_stage); fsdp: PyTorch FSDP", default="deepspeed", choices=STRATEGIES
    )
    tp: int = field("tensor-parallel degree", default=1, min=1, max=64)
    pp: int = field("pipeline-parallel degree (stages)", default=1, min=1, max=256)
    pp_schedule: str = field(
        "pipeline schedule (interleaved1f1b: 2 virtual stages per rank)",
        default="1f1b",
        choices=("1f1b", "interleaved1f1b", "gpipe"),
    )
    sharding: str = field(
        "FSDP sharding: full (over every data-parallel rank) or hybrid (shard within a node, replicate "
        "across nodes: HSDP)",
        default="full",
        choices=("full", "hybrid"),
    )


@dataclass(frozen=True, kw_only=True)
class InitFromConfig:
    """Weights a fresh run starts from (step 0 only; a resume loads its own checkpoint): vltrain.init_from."""

    path: str = field(
        "a vltrain checkpoint (step directory or run directory: its newest) or a .safetensors file ('' = none)",
        default="",
    )
    part: str = field("the model part to load (vision, text, embed, decoder, ...; '' = the whole model)", default="")
    prefix: str = field(
        "key prefix of the part's tensors in the source ('' = 'PART.' when the source has it, else none)", default=""
    )


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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    init_from: InitFromConfig = field(default_factory=InitFromConfig)
    precision: str = field(
        "training precision (fp16: dynamic loss scaling)", default="bf16", choices=("bf16", "fp16", "fp32")
    )
    activation_checkpointing: bool = field("recompute activations in the backward pass", default=False)
    seed: int = field("seed for init, data order and masking", default=0, min=0, max=2**31 - 1)
    log_every: int = field("optimizer steps between metrics lines", default=1, min=1, max=10**6)
    checkpoint_every: int = field(
        "optimizer steps between checkpoints (0 = only at the end)", default=50, min=0, max=10**9
    )
    keep_checkpoints: int = field("complete checkpoints kept", default=3, min=1, max=1000)
    stages: list[StageConfig] = field(
        "a curriculum: [[stages]] in order, each with its steps and [loss] overrides (none: one stage, [loss])",
        default_factory=list,
        max_items=64,  # a curriculum has a few; each costs a validation here and a branch in the trainer
    )
    eval_every: int = field("optimizer steps between evaluations (0 = only at the end)", default=0, min=0, max=10**9)
    eval_after: str = field(
        "where the final evaluation runs: 'train' in the training job's allocation, 'job' as its own small "
        "job queued after the training job (a Slurm profile; clusterctl.runs.evaljob)",
        default="train",
        choices=("train", "job"),
    )
    max_skipped_steps: int = field(
        "optimizer steps in a row the optimizer may skip (a gradient that is not finite) before the run fails "
        f"as diverged (-1: {FP16_SKIP_TOLERANCE} under fp16, whose loss scaler skips while it settles from "
        "2^16; 0 under bf16 and fp32, which skip nothing legitimately)",
        default=-1,
        min=-1,
        max=10**6,
    )

    def __post_init__(self) -> None:
        if self.stages:
            _check_stages(self.stages, self.loss, self.steps)

    def uses_mim(self) -> bool:
        """Whether masked image modelling runs in any stage: the model then has its MIM decoder from
        the start, so that a checkpoint resumes across a stage boundary that turns MIM on or off."""
        return self.loss.mim > 0 or any(stage_loss(self.loss, s.loss, i).mim > 0 for i, s in enumerate(self.stages))

    def final_eval_in_training(self) -> bool:
        """Does the training job evaluate at its end? Not when eval_after = 'job' queued that evaluation as
        its own job (periodic eval_every evaluations run in training either way)."""
        return self.eval_after == "train"

    def skip_tolerance(self) -> int:
        """Skipped optimizer steps in a row that are not divergence (max_skipped_steps, -1 resolved)."""
        if self.max_skipped_steps >= 0:
            return self.max_skipped_steps
        return FP16_SKIP_TOLERANCE if self.precision == "fp16" else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of what must match for a checkpoint to resume this run (model, batch, optimizer, loss)."""
        import hashlib  # on use: `clusterctl plan` loads configs but never hashes one (~4 ms with json)
        import json

        from vltrain.presets import resolve_model

        d = self.to_dict()
        keep = {k: d[k] for k in ("optim", "loss", "global_batch", "zero_stage", "precision", "seed")}
        keep["model"] = dataclasses.asdict(resolve_model(self.model))  # a preset and its table are one model
        if not self.uses_mim():  # no MIM decoder is built: its sizes do not matter (and older hashes hold)
            keep["model"] = {k: v for k, v in keep["model"].items() if not k.startswith("mim_decoder_")}
        if self.stages:  # the step decides the stage: a resume must see the same curriculum
            keep["stages"] = d["stages"]
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


# A recipe's [paper] table: what its paper states that is no setting (duration, what is not reproduced).
# Read by clusterctl.planning.recipes; a file's is dropped before validation, `--set paper.*` stays unknown.
PAPER_TABLE = "paper"
MAX_BASE_CHAIN = 16  # configs in one `base` chain: a recipe's twin is 2


def read_config_data(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's tables, on top of its `base` file (a path relative to it) when it names one:
    a recipe's reduced twin is its recipe plus the few figures it changes. A chain is at most
    MAX_BASE_CHAIN files, without loops, and each file nests at most MAX_DEPTH deep."""
    path = Path(path)
    where = str(path)
    data = parse_toml(read_text_file(path, "a TOML train config file (e.g. configs/tiny.toml)"), where)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise UserError(
            f"{where}: base: {base!r} is not valid; allowed: the path of another config, relative to this one"
        )
    here, base_path = _resolve(path, where, base), _resolve(path.parent / base, where, base)
    if base_path in _seen or base_path == here:
        raise UserError(f"{where}: base: {base!r} includes itself; allowed: a chain of configs without a loop")
    if len(_seen) + 1 >= MAX_BASE_CHAIN:
        raise UserError(
            f"{_seen[0] if _seen else where}: base: the chain of configs is longer than {MAX_BASE_CHAIN} "
            f"(at {where}); allowed: at most {MAX_BASE_CHAIN} configs, each naming the next in `base`"
        )
    return merge(read_config_data(base_path, (*_seen, here)), data)


def _resolve(path: Path, where: str, base: str) -> Path:
    """path.resolve(), with a symbolic-link loop as one line (Python 3.11 raises RuntimeError)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:
        raise UserError(
            f"{where}: base: {base!r} cannot be resolved ({getattr(e, 'strerror', None) or e}); "
            "allowed: the path of another config, without a symbolic-link loop"
        ) from None


MAX_CONFIG_BYTES = 1 << 20  # a train config is a few kB; more is not one (and /dev/zero never ends)


def read_text_file(path: Path, allowed: str) -> str:
    """The text of a small UTF-8 file, or a one-line UserError naming `path` and what is `allowed`:
    a directory, a device or FIFO, a binary file, an unreadable one and a huge one are refused."""
    where = str(path)
    try:
        if path.is_dir():
            raise UserError(f"{where}: is a directory; allowed: {allowed}")
        if path.exists() and not path.is_file():
            raise UserError(f"{where}: is not a regular file (a device, FIFO or socket); allowed: {allowed}")
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{where}: no such file; allowed: {allowed}") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror or e}); allowed: {allowed}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"{where}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a config; allowed: {allowed}")
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{where}: is a binary file, not text (byte {e.start}: {e.reason}); allowed: {allowed} in UTF-8"
        ) from None


def merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `under`, table by table; a partial [model] table on a preset name changes
    that preset's figures (the preset is expanded first)."""
    out = dict(under)
    for key, value in over.items():
        if key == "model" and isinstance(value, dict) and isinstance(out.get("model"), str):
            out["model"] = expand_preset(out["model"], "model")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def expand_preset(name: str, where: str) -> dict[str, Any]:
    """A preset as a [model] table, so that single figures of it can be overridden."""
    from vltrain.presets import get_preset

    return dataclasses.asdict(get_preset(name, where))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Dotted overrides ({'optim.lr': 3e-4}) set into a copy of `data`. `model.X` on a preset name
    expands the preset first: the override applies (and the parameter count follows), never dropped."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        model = data.get("model", TrainConfig.__dataclass_fields__["model"].default)  # no file: the default preset
        if parents and parents[0] == "model" and isinstance(model, str):
            data["model"] = expand_preset(model, f"{where} {key}")
        node = data
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(
                    f"{where} {key}: {'.'.join(parents[: i + 1])} is not a table; allowed: a key of a table"
                )
        node[leaf] = value
    return data


def load_train_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None, *layers: tuple[str, dict[str, Any]]
) -> TrainConfig:
    """Read a TOML train config (or the defaults) and apply overrides: `overrides` are --set pairs,
    `layers` are (flag, {key: value}) applied after them. Each layer is validated on its own, so an
    error names where the bad value came from: the file, `--set KEY` or the flag."""
    data: dict[str, Any] = read_config_data(path) if path else {}
    data.pop(PAPER_TABLE, None)  # the recipe's [paper] facts are the planner's (clusterctl.planning.recipes)
    where = str(path) if path else "<defaults>"
    cfg = parse_train_config(data, where)
    for source, values in (("--set", overrides or {}), *layers):
        if not values:
            continue
        data = apply_overrides(data, values, source)
        try:
            cfg = parse_train_config(data, source)
        except UserError as e:
            raise UserError(_name_source(str(e), source, values)) from None
    return cfg


def _name_source(msg: str, source: str, values: dict[str, Any]) -> str:
    """'--set: optim.lr: -1 is out of range' -> '--set optim.lr: -1 is out of range'; a flag that
    sets one field names only itself ('--global-batch: 0 is out of range')."""
    head = f"{source}: "
    if not msg.startswith(head):
        return msg
    rest = msg[len(head) :]
    if source == "--set":
        return f"--set {rest}"
    if len(values) == 1:
        (key,) = values
        return head + rest.removeprefix(f"{key}: ")
    return msg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """--set key=value pairs; the value is a TOML literal (3e-4, true, "x", [0.9, 0.95]) or a bare string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set: {item!r} is not key=value; allowed: e.g. --set optim.lr=3e-4")
        if any(c in item for c in "\n\r\0"):  # TOML would read the first line and drop the rest unseen
            raise UserError(
                f"--set {key.strip()}: {raw!r} spans lines or holds a NUL; allowed: one key=value on one line "
                f"per --set (repeat --set for more keys)"
            )
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        except RecursionError:  # the parser recurses once per bracket
            raise UserError(
                f"--set {key.strip()}: nesting: too deep for the TOML parser; allowed: {depth_words()}"
            ) from None
        check_depth(value, f"--set {key.strip()}")
        out[key.strip()] = value
    return out


def write_resolved_config(path: Path, cfg: TrainConfig) -> None:
    """A run's config.toml: the resolved config an attempt trains with (what `vltrain eval` reads), written
    atomically; left alone when it already says the same (clusterctl writes it before submitting)."""
    import tomli_w

    from vltrain.common.atomic import atomic_write

    try:
        if tomllib.loads(path.read_text(encoding="utf-8")) == cfg.to_dict():
            return
    except (OSError, tomllib.TOMLDecodeError):
        pass
    atomic_write(path, tomli_w.dumps(cfg.to_dict()), mode=None)
