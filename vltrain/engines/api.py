"""The one interface of a training engine (torchx's Scheduler, torchtitan's Stateful components): what
the loop, the checkpoint protocol and evaluation use, so that none of them asks which engine runs.

An engine owns a rank's process-group start, model, optimizer, LR schedule and loss scaler, runs one
optimizer step over the accumulation's micro batches, writes and reads its own files inside a checkpoint
directory (the protocol around them, vltrain.checkpoint, is the same for every engine), gives the model
that evaluation runs, and describes itself for the start event. One module per engine in this package,
chosen by vltrain.engines.ENGINES.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vltrain.engines.common import RankLayout

if TYPE_CHECKING:
    from vltrain.config import LossConfig, TrainConfig
    from vltrain.distenv import DistEnv
    from vltrain.evaluate import EvalShare


class TrainEngine(abc.ABC):
    """One rank's engine. `train_step` runs one optimizer step over the accumulation micro batches (the
    loss of each scaled by 1 / accumulation, as DeepSpeed does) and returns each micro batch's loss terms
    (detached, [micro, len(keys)]; zeros on ranks that compute no loss: pipeline stages before the last)
    and the LR that step used. `skipped_steps` counts optimizer steps skipped for a non-finite gradient
    (fp16's loss scaler settling, or divergence), as DeepSpeed's attribute does."""

    strategy: ClassVar[str]  # its key in vltrain.engines.ENGINES
    checkpoint_format: ClassVar[str]  # the checkpoint subdirectory it writes (ENGINES' checkpoint_format)

    layout: RankLayout
    device: torch.device
    dtype: torch.dtype

    # ------------------------------------------------------------------ build
    @classmethod
    def init_process_group(cls, dist: DistEnv, device: str) -> torch.device:
        """The default process group of the detected layout; returns the rank's device."""
        from vltrain.engines.process_group import init_torch_process_group

        return init_torch_process_group(dist, device)

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        micro_batch: int,
        accumulation: int,
        layout: RankLayout,
        device: torch.device,
        *,
        initialise: bool = True,
    ) -> TrainEngine:
        """The engine of an initialised process group (its constructor, by default). initialise=False: a
        checkpoint will be loaded (an engine may then skip building the seeded weights)."""
        return cls(cfg, micro_batch, accumulation, layout, device, initialise=initialise)  # type: ignore[call-arg]  # the subclass's constructor takes these

    # ------------------------------------------------------------------ train
    @abc.abstractmethod
    def train_step(self, batches: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[torch.Tensor, float]:
        """One optimizer step over `batches` -> (loss terms [micro, keys] on the CPU, the LR it used)."""

    @property
    @abc.abstractmethod
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far (a gradient not finite)."""

    @abc.abstractmethod
    def get_global_grad_norm(self) -> float | None:
        """The last step's gradient norm over every rank (before clipping); None before any step."""

    @abc.abstractmethod
    def num_params(self) -> int:
        """The whole model's parameter count."""

    @abc.abstractmethod
    def set_loss_config(self, loss: LossConfig) -> None:
        """A curriculum stage's loss weights for the next steps (the forward reads them at each call)."""

    # ------------------------------------------------------------------ checkpoints
    @abc.abstractmethod
    def save(self, directory: Path, errors: list[BaseException]) -> dict[str, Any]:
        """Collective: write this engine's files into the checkpoint directory `directory`. A failed write
        (vltrain.diskspace.is_write_error) goes to `errors` rather than raised, so that no rank leaves the
        engine's collectives early. Returns what this rank keeps in its trainer state file."""

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Collective: restore model, optimizer and schedule from the checkpoint directory `directory`."""

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """What `save` returned (from the trainer state file of this rank, or of rank r mod the old count)."""
        return None  # nothing beyond the engine's own files by default

    @abc.abstractmethod
    def checkpoint_bytes(self) -> int:
        """What a checkpoint of this engine takes on disk over all ranks (an estimate; 0 when unknown)."""

    @classmethod
    @abc.abstractmethod
    def read_module_state(cls, directory: Path) -> dict[str, torch.Tensor]:
        """The model weights of a checkpoint directory of this format, on one process, without a process group."""

    @classmethod
    @abc.abstractmethod
    def is_module_file(cls, relative: str) -> bool:
        """Whether a checkpoint file (its path inside the checkpoint) holds model weights: the files evaluation verifies."""

    # ------------------------------------------------------------------ evaluate, describe, close
    @property
    def eval_reads_checkpoint(self) -> bool:
        """Whether evaluation's model is read from this step's checkpoint (the loop writes it first)."""
        return False

    @abc.abstractmethod
    def eval_model(self, checkpoint: Path | None) -> tuple[nn.Module, EvalShare]:
        """This rank's model for evaluation (the engine's own, sharded as it trains; or, where
        eval_reads_checkpoint, one built from `checkpoint`) and the rank's share of the held-out pairs:
        every rank evaluates its slice (vltrain.evaluate)."""

    def eval_finished(self) -> None:
        """Undo what eval_model set for evaluation (e.g. FSDP's resharding after each forward)."""
        return None  # nothing by default

    def describe(self) -> dict[str, Any]:
        """Fields of the start and resume events that only this engine knows."""
        return {}

    def banner(self) -> str:
        """What the start line adds about the layout (' | fsdp tp 2 x pp 2 x dp 4'); empty by default."""
        return ""

    def close(self) -> None:
        """Release what the engine set up beyond its objects (process-group handles kept elsewhere)."""
        return None  # nothing by default
