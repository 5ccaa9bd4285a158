"""`[init_from]`: a fresh run's weights for one model part (or the whole model) from another run's
checkpoint or a safetensors file (a pre-trained image encoder, an exported part).

Applied where the model is built, before any engine wraps it (vltrain.engines.common.build_model):
DeepSpeed builds the model on every rank, so every rank loads the file (the same weights everywhere,
as the seeded init); FSDP builds the full model on rank 0 only, so rank 0 loads it and FSDP broadcasts
and shards it with the rest. Only when the run starts at step 0: a resume loads its own checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vltrain.common.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vltrain.config import InitFromConfig


def read_source(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, or the model weights of a vltrain checkpoint (a step
    directory, or a run directory: its newest complete checkpoint)."""
    from vltrain import checkpoint

    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(p)
    if p.is_dir() and not (p / checkpoint.MARKER).is_file():
        p = checkpoint.latest(p) or p
    if not (p / checkpoint.MARKER).is_file():
        raise UserError(
            f"init_from.path: {path} is not a .safetensors file nor a complete vltrain checkpoint; "
            "allowed: FILE.safetensors, RUN_DIR or RUN_DIR/checkpoints/step_N"
        )
    return checkpoint.module_state(p)


def part_module(model: nn.Module, part: str) -> nn.Module:
    """The named top-level part of the model ('' = the model), or a one-line error naming the parts."""
    if not part:
        return model
    names = [n for n, m in model.named_children() if m is not None]
    if part not in names:
        raise UserError(f"init_from.part: unknown part '{part}'; allowed: {', '.join(names)} or '' (whole model)")
    return model.get_submodule(part)


def part_state(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], part: str, prefix: str
) -> dict[str, torch.Tensor]:
    """The source tensors for `target`'s keys (pure): source key = prefix + target key, where the prefix
    defaults to 'PART.' when the source holds such keys (a whole checkpoint) and to none otherwise (an
    exported part). One-line error on a missing tensor or a shape mismatch, naming the tensor."""
    if not prefix and part and any(k.startswith(part + ".") for k in source):
        prefix = part + "."
    out = {}
    for key, want in target.items():
        got = source.get(prefix + key)
        if got is None:
            raise UserError(
                f"init_from: tensor {prefix + key} missing from the source ({len(source)} tensors); "
                "allowed: a source of this part, or init_from.prefix naming its key prefix"
            )
        if tuple(got.shape) != tuple(want.shape):
            raise UserError(
                f"init_from: tensor {prefix + key} has shape {list(got.shape)} in the source but "
                f"{list(want.shape)} in this model; allowed: a source of the same architecture"
            )
        out[key] = got
    return out


def apply(model: nn.Module, init: InitFromConfig) -> int:
    """Load `init` into `model` in place (cast to its dtype and device); returns the tensors loaded (0: none set)."""
    if not init.path:
        return 0
    module = part_module(model, init.part)
    target = module.state_dict()
    tensors = part_state(read_source(init.path), target, init.part, init.prefix)
    module.load_state_dict({k: v.to(target[k].dtype) for k, v in tensors.items()}, strict=True)
    return len(tensors)
