"""How long a checkpoint takes to write, against the warning Slurm gives before the time limit (pure).

Why: the profile's slurm.signal_delay_s is how long before the time limit Slurm sends USR2; the trainer
acts on it at the next optimizer-step boundary and writes a checkpoint (vltrain.checkpoint). If that
does not finish before the limit, the job is killed mid-write, the partial `.tmp-` directory is
discarded, and the run resumes from the previous periodic checkpoint: up to `checkpoint_every` steps
of work lost at every time limit.

What a checkpoint is (DeepSpeed's save_checkpoint, with m = the model / (tp x pp), N data-parallel ranks):
  * ZeRO 0-2: data-parallel rank 0 writes the model-states file, the 16-bit weights (2 bytes per
    parameter); under ZeRO-0 it also holds the optimizer (fp32 master + Adam m, v: 12 bytes);
  * ZeRO 1-3: every rank writes its optimizer shard, 12 x m / N bytes (fp32 master + Adam m, v);
  * ZeRO-3: the model-states files hold no weights (they are in the shards); the trainer's own files
    (RNG states, loader position) are kilobytes.
Time: the busiest node's bytes at [storage] write_gb_s_per_node, or all bytes at write_gb_s_total,
whichever is slower. Node 0 is the busiest under ZeRO 0-2: rank 0 writes the weights besides its shard.
Needed delay: (write time + one optimizer step, since USR2 may arrive just after a step began)
x CHECKPOINT_MARGIN, rounded up to 10 s.

Overhead: the trainer writes synchronously (every rank waits for the save, vltrain.loop) every
`checkpoint_every` steps, so the share of the run's time spent writing is
write / (checkpoint_every x step + write); above OVERHEAD_WARNING the plan warns and names the
smallest cadence within it (`cadence_within`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from clusterctl.planning.memory import OPTIMIZER_BYTES_PER_PARAM
from clusterctl.planning.profiles import ClusterProfile

GB = 1e9
# Shared filesystems slow down when other jobs write, and a checkpoint also fsyncs and renames:
# 25% on top of the computed time.
CHECKPOINT_MARGIN = 1.25
OVERHEAD_WARNING = 0.05  # of the run's time spent writing checkpoints


@dataclass(frozen=True)
class CheckpointTime:
    """The JSON shape `clusterctl plan --json` prints under "checkpoint"."""

    bytes: float  # all files of one checkpoint
    busiest_node_bytes: float
    write_gb_s_per_node: float
    write_gb_s_total: float | None
    write_s: float
    step_s: float
    needed_signal_delay_s: int
    signal_delay_s: int | None  # None: no Slurm, no signal
    ok: bool | None
    checkpoint_every: int = 0  # steps between periodic checkpoints (0: only at the end)
    overhead: float = 0.0  # share of the run's time spent writing them

    @property
    def too_costly(self) -> bool:
        return self.overhead > OVERHEAD_WARNING

    def cadence_within(self, share: float = OVERHEAD_WARNING) -> int:
        """The fewest steps between checkpoints whose writing takes at most `share` of the time."""
        if self.step_s <= 0:
            return 1
        return max(1, math.ceil(self.write_s * (1 - share) / (share * self.step_s)))

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def checkpoint_bytes(
    params: float,
    zero_stage: int,
    data_parallel: int,
    gpus_per_node: int,
    model_parallel: int = 1,
    param_bytes: int = 2,
) -> tuple[float, float]:
    """(bytes of one checkpoint, bytes node 0 writes) for `params` parameters in all.

    Each of the `model_parallel` (tp x pp) groups writes its own m = params / model_parallel."""
    m = params / model_parallel
    weights = param_bytes * m if zero_stage < 3 else 0.0
    if zero_stage == 0:
        weights += OPTIMIZER_BYTES_PER_PARAM * m
    shard = OPTIMIZER_BYTES_PER_PARAM * m / data_parallel if zero_stage >= 1 else 0.0
    total = model_parallel * (weights + data_parallel * shard)
    # node 0 holds data-parallel rank 0 of as many model-parallel groups as it has GPUs for
    groups_on_node0 = max(1, min(model_parallel, gpus_per_node))
    node0 = groups_on_node0 * weights + gpus_per_node * shard
    return total, min(node0, total)


def overhead_share(write_s: float, step_s: float, every: int) -> float:
    """Share of the time spent writing a checkpoint every `every` steps of `step_s` (0: never)."""
    if every <= 0 or write_s <= 0:
        return 0.0
    return write_s / (every * step_s + write_s)


def checkpoint_time(
    profile: ClusterProfile,
    params: float,
    zero_stage: int,
    data_parallel: int,
    step_s: float,
    model_parallel: int = 1,
    param_bytes: int = 2,
    checkpoint_every: int = 0,
) -> CheckpointTime:
    """Time to write one checkpoint on `profile`, the signal delay that leaves room for it, and the share
    of the run spent writing one every `checkpoint_every` steps."""
    st = profile.storage
    total, node0 = checkpoint_bytes(
        params, zero_stage, data_parallel, profile.nodes.gpus_per_node, model_parallel, param_bytes
    )
    write = node0 / (st.write_gb_s_per_node * GB)
    if st.write_gb_s_total is not None:
        write = max(write, total / (st.write_gb_s_total * GB))
    needed = int(math.ceil((write + step_s) * CHECKPOINT_MARGIN / 10) * 10)
    delay = profile.slurm.signal_delay_s if profile.slurm is not None else None
    return CheckpointTime(
        bytes=total,
        busiest_node_bytes=node0,
        write_gb_s_per_node=st.write_gb_s_per_node,
        write_gb_s_total=st.write_gb_s_total,
        write_s=write,
        step_s=step_s,
        needed_signal_delay_s=needed,
        signal_delay_s=delay,
        ok=None if delay is None else delay >= needed,
        checkpoint_every=checkpoint_every,
        overhead=overhead_share(write, step_s, checkpoint_every),
    )
