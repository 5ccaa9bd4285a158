"""`vltrain export RUN_DIR`: a checkpoint's model weights (all, or one part) as a safetensors file,
the format other tools and `[init_from]` read (no pickle, so loading one runs no code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vltrain.common.errors import UserError

DTYPES = ("fp32", "bf16")


def pick_checkpoint(run_dir: Path, step: int | None) -> tuple[int, Path]:
    """(step, path) of the newest complete checkpoint, or of the one at `step`; one-line errors."""
    from vltrain import checkpoint

    done = checkpoint.complete_checkpoints(run_dir)
    if not done:
        raise UserError(f"{run_dir}: no complete checkpoint; allowed: a run directory that saved one")
    if step is None:
        return done[-1]
    for s, p in done:
        if s == step:
            return s, p
    raise UserError(
        f"--step {step}: no complete checkpoint at that step; allowed: {', '.join(str(s) for s, _ in done)}"
    )


def select_part(state: dict[str, Any], part: str) -> dict[str, Any]:
    """The tensors under 'PART.' with that prefix removed (pure; '' = all, unchanged)."""
    if not part:
        return dict(state)
    out = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
    if not out:
        parts = sorted({k.split(".", 1)[0] for k in state})
        raise UserError(f"--part {part}: no such part in the checkpoint; allowed: {', '.join(parts)}")
    return out


def export(
    run_dir: Path, out: Path | None, part: str = "", step: int | None = None, dtype: str = "fp32"
) -> dict[str, Any]:
    """Write the safetensors file (atomically: a temporary name, then a rename) and return a summary."""
    import torch
    from safetensors.torch import save_file

    from vltrain import checkpoint

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: allowed: {', '.join(DTYPES)}")
    s, path = pick_checkpoint(run_dir, step)
    tensors = select_part(checkpoint.module_state(path), part)
    cast = torch.float32 if dtype == "fp32" else torch.bfloat16
    # contiguous copies: safetensors refuses tensors that share storage or are views (mmap'd loads)
    tensors = {
        k: v.detach().to(cast if v.is_floating_point() else v.dtype).contiguous().clone() for k, v in tensors.items()
    }
    out = out or run_dir / f"export_step{s}{'_' + part if part else ''}.safetensors"
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no directory {out.parent}; allowed: a file in an existing directory")
    tmp = out.with_name(f".{out.name}.tmp")
    meta = {"step": str(s), "part": part, "dtype": dtype, "checkpoint": path.name}
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)
    return meta | {"out": str(out), "tensors": len(tensors), "params": sum(v.numel() for v in tensors.values())}
