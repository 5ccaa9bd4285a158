"""`submit --from RUN[@STEP] [--weights-only]`: a new run that starts from another run's checkpoint.

Full fork: the checkpoint is hard-linked (copied across filesystems) into the new run's checkpoints/
and its meta.json and COMPLETE re-stamped with the new config's hash, so the trainer resumes from it
as from its own: weights, optimizer state and step; the LR schedule continues at that step under the
new settings (--set optim.lr=... lowers it from there). The trainer's refusals of a checkpoint from
another engine or (DeepSpeed) another rank count are checked here first (vltrain.checkpoint.
check_compatible). --weights-only: the new run loads the weights through [init_from] at step 0 with a
fresh optimizer and schedule. Either way the lineage goes into the plan: plan["lineage"].
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vltrain.common.errors import UserError

if TYPE_CHECKING:
    from clusterctl.planning.profiles import ClusterProfile
    from clusterctl.runs.registry import Registry
    from clusterctl.specs import RunRecord
    from vltrain.config import TrainConfig

SAME_FOR_OPTIMIZER = ("zero_stage", "precision")  # what a full fork's optimizer state is laid out by


@dataclasses.dataclass(frozen=True)
class Source:
    run: RunRecord
    step: int
    path: Path  # the checkpoint directory
    weights_only: bool

    def lineage(self) -> dict[str, Any]:
        return {"from_run": self.run.run_id, "from_step": self.step, "weights_only": self.weights_only}

    def layers(self) -> list[tuple[str, dict[str, Any]]]:
        """--weights-only as a config layer: the whole model's weights from the checkpoint at step 0."""
        if not self.weights_only:
            return []
        return [("--weights-only", {"init_from.path": str(self.path), "init_from.part": "", "init_from.prefix": ""})]


def parse_from(value: str) -> tuple[str, int | None]:
    """'RUN' or 'RUN@STEP' -> (RUN, STEP or None); pure."""
    ref, at, step = value.partition("@")
    if not ref or (at and not step.isdigit()):
        raise UserError(f"--from: {value!r} is not RUN or RUN@STEP; allowed: a run id or name, @ and a step number")
    return ref, int(step) if at else None


def pick(run_dir: Path, step: int | None, what: str) -> tuple[int, Path]:
    """The newest complete checkpoint, or the newest at or under `step`."""
    from vltrain.checkpoint import complete_checkpoints

    done = [(s, p) for s, p in complete_checkpoints(run_dir) if step is None or s <= step]
    if not done:
        have = ", ".join(str(s) for s, _ in complete_checkpoints(run_dir)) or "none"
        at = f" at or under step {step}" if step is not None else ""
        raise UserError(f"--from {what}: no complete checkpoint{at}; allowed: a step with one (has: {have})")
    return done[-1]


def resolve(reg: Registry, value: str, weights_only: bool) -> Source:
    ref, step = parse_from(value)
    try:
        run = reg.get_run(ref)
    except UserError as e:  # it names RUN, the argument of the commands that take one
        raise UserError(f"--from: {str(e).removeprefix('RUN: ')}") from None
    s, path = pick(Path(run.run_dir), step, value)
    return Source(run, s, path, weights_only)


def check(src: Source, cfg: TrainConfig, profile: ClusterProfile) -> None:
    """One line when the new run cannot start from `src` (before anything is written): another model,
    a full fork across ZeRO stage or precision, another engine or rank count (the trainer's own rules),
    or no steps left to train."""
    from vltrain import checkpoint
    from vltrain.config import load_train_config
    from vltrain.engines import ENGINES
    from vltrain.presets import resolve_model
    from vltrain.rundir import RunDir

    old = load_train_config(RunDir(src.run.run_dir).config)
    if dataclasses.asdict(resolve_model(old.model)) != dataclasses.asdict(resolve_model(cfg.model)):
        raise UserError(
            f"--from: {src.run.run_id} trained another model; allowed: the same model (no --model/--set model.*)"
        )
    if src.weights_only:
        return
    for key in SAME_FOR_OPTIMIZER:
        if getattr(old, key) != getattr(cfg, key):
            raise UserError(
                f"--from: {key} {getattr(cfg, key)} differs from {src.run.run_id}'s {getattr(old, key)}; "
                f"allowed: the same {key}, or --weights-only (fresh optimizer)"
            )
    meta = checkpoint.read_meta(src.path)
    fmt = ENGINES[cfg.parallel.strategy].checkpoint_format
    checkpoint.check_compatible(src.path, meta.get("config_hash", ""), profile.world_size, fmt)
    if cfg.steps <= src.step:
        raise UserError(f"--steps: {cfg.steps} ends at or before step {src.step}; allowed: more than {src.step}")


def place(src: Source, run_dir: Path, config_hash: str) -> Path:
    """A full fork's checkpoint in the new run: every file hard-linked (copied when the filesystem
    refuses), meta.json and COMPLETE written anew with this run's config hash (and where it came from)."""
    from vltrain.checkpoint import MARKER, META, checkpoints_dir, read_meta

    dst = checkpoints_dir(run_dir) / src.path.name
    tmp = dst.with_name(".tmp-" + src.path.name)  # the trainer ignores .tmp- directories: no half copy counts
    for f in sorted(src.path.rglob("*")):
        rel = f.relative_to(src.path)
        if f.is_dir() or str(rel) in (META, MARKER):
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, tmp / rel)
        except OSError:  # another filesystem, or links refused
            shutil.copy2(f, tmp / rel)
    meta = read_meta(src.path) | {
        "config_hash": config_hash,
        "forked_from": {"run_dir": str(src.run.run_dir), "checkpoint": src.path.name},
    }
    raw = (json.dumps(meta, indent=2) + "\n").encode()
    (tmp / META).write_bytes(raw)
    (tmp / MARKER).write_bytes(
        f"{src.step}\n{META} {len(raw)} {zlib.crc32(raw):08x}\n".encode()
    )  # checkpoint.publish's
    os.replace(tmp, dst)
    return dst


def submit(
    reg: Registry, src: Source, p: Any, run_id: str, run_dir: Path, max_retries: int, hold: bool, after: Any
) -> str:
    """runs.submit.create with the fork's checkpoint placed before the first attempt (nothing left on failure)."""
    from clusterctl.runs import dependencies
    from clusterctl.runs.submit import create, submit_attempt

    if src.weights_only:
        return create(reg, p, run_id, run_dir, max_retries, hold=hold, after=after)
    create(reg, p, run_id, run_dir, max_retries, hold=hold, after=after, defer=True)
    try:
        place(src, run_dir, p.config.config_hash())
        dep = dependencies.dependency(after or [])
        return submit_attempt(reg, reg.get_run(run_id), p.profile, "submit", hold=hold, dependency=dep)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        reg.delete_run(run_id)
        raise
