"""Checks before sbatch: what would make the job fail on the cluster, found here in a second.

A run whose data is missing used to become a Slurm job that failed 7 s later, its reason inside a
traceback in `logs --stderr`. `check` finds that, and everything else the job cannot get past:
data shards and tokenizer readable (at the absolute paths the job will use), the tokenizer's
vocabulary equal to the model's, the plan fitting in GPU memory and in each node's host memory, the
checkpoint at the time limit fitting in Slurm's signal delay (a warning), and every part of the config the
trainer runs today (vltrain.support: ZeRO-3 under DeepSpeed is not), on the profile's device (fp16 under
DeepSpeed on a CPU without AVX512-FP16 is not), shard specs the trainer reads (local files: no URL or
`pipe:`, vltrain.data.shard_spec) and shards that start with a tar header. Layouts the model cannot take
(vltrain.parallel.layout) are refused earlier, by the plan itself. When a scheduler answers, it is asked
whether it takes the profile's request (for Slurm: slurm.partition exists and holds nodes.count nodes;
backends.api.Backend.check_profile); when none answers the check is skipped and said so. `submit` refuses
the first problem in one line, exit 2, before anything is written; `submit --dry-run` lists them all and
exits 2 as well when there is one (0 when submit would start the run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vltrain.common.errors import UserError
from vltrain.config import TrainConfig
from vltrain.data.shard_spec import empty_tar, tar_problem, url_problem
from vltrain.presets import resolve_model

if TYPE_CHECKING:
    from clusterctl.planning.profiles import ClusterProfile

MEMORY_WARNING = 0.90  # of a GPU's memory: above it a run is one allocator hiccup from an OOM
SIGNAL_DELAY_MAX = 3600  # slurm.signal_delay_s's upper bound (clusterctl.planning.profiles.Slurm)
FP16_CPU_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "asimdhp"})  # /proc/cpuinfo: what torch's oneDNN runs fp16 on
STATS_CHECKS = 10_000  # shards whose stats files are read at submit to count samples per rank
TAR_CHECKS = 8  # shards whose first header is read at submit: the first ones, one 512-byte read each


@dataclass
class Checks:
    problems: list[str] = field(default_factory=list)  # each one would stop the job: submit refuses
    warnings: list[str] = field(default_factory=list)  # worth a line, not a refusal
    skipped: list[str] = field(default_factory=list)  # checks that could not be made here, and why

    def to_dict(self) -> dict[str, Any]:
        return {"problems": self.problems, "warnings": self.warnings}


def trainer_support(cfg: TrainConfig) -> list[str]:
    """What the config asks for that the trainer does not run yet, each with what to use instead: the
    trainer's own list (vltrain.support), so that submit refuses exactly what the trainer would."""
    from vltrain.support import not_run_yet

    return not_run_yet(cfg)


def device(cfg: TrainConfig, profile: ClusterProfile) -> list[str]:
    """What the trainer refuses at start on the profile's device: a CUDA profile where torch sees no
    CUDA (vltrain.distenv.resolve_device; only a local profile runs here, where torch can be asked), and
    fp16 under an engine that runs it on a CPU only with AVX512-FP16 or AMX-FP16 (DeepSpeed's CPU
    accelerator: check_deepspeed_fp16 in vltrain.engines.deepspeed). A local profile runs here, so this
    CPU's flags decide; a Slurm profile's nodes are not known from here, so it is refused."""
    from vltrain.engines import spec

    if profile.gpu.kind == "cuda" and profile.executor == "local" and not cuda_here():
        return [
            f"gpu.kind: cuda, but profile {profile.name} runs on this machine (executor = 'local') and torch sees "
            "no CUDA here (the trainer would refuse it at start); allowed: a machine with GPUs and a CUDA build of "
            "torch, or a profile with gpu.kind = 'cpu' (--profile local)"
        ]
    if cfg.precision != "fp16" or profile.gpu.kind != "cpu" or not spec(cfg.parallel.strategy).fp16_cpu_needs_isa:
        return []
    local = profile.executor == "local"
    if local and cpu_flags() & FP16_CPU_FLAGS:
        return []
    why = "this machine's CPU has neither" if local else "the nodes' CPUs are not known from here"
    return [
        f"precision: fp16 under parallel.strategy {cfg.parallel.strategy!r} on the CPU profile {profile.name} needs "
        f"AVX512-FP16 or AMX-FP16, and {why} (the trainer would refuse it at start); allowed: --set precision=bf16 "
        "or fp32, or --set parallel.strategy=fsdp (torch's loss scaler runs fp16 on any CPU)"
    ]


def cuda_here() -> bool:
    """torch.cuda.is_available() on this machine (imports torch: asked only for a local CUDA profile)."""
    import torch

    return bool(torch.cuda.is_available())


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (x86 `flags`, Arm `Features`), empty where /proc/cpuinfo is not."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return set()
    return {w for line in text.splitlines() if line.startswith(("flags", "Features")) for w in line.split()[2:]}


def memory(plan: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the plan's per-GPU memory (pure)."""
    m = plan["memory"]
    share = m["total_gib"] / m["capacity_gib"]
    if not m["fits"]:
        return [
            f"plan: {plan['model']} needs {m['total_gib']:.1f} GiB per GPU with micro batch {plan['micro_batch']} "
            f"on {plan['profile']} ({m['capacity_gib']:g} GiB); allowed: a higher --zero-stage, "
            "--activation-checkpointing, more GPUs or a smaller model"
        ], []
    if share > MEMORY_WARNING:
        return [], [
            f"plan: {m['total_gib']:.1f} of {m['capacity_gib']:g} GiB per GPU ({share:.0%}) is over "
            f"{MEMORY_WARNING:.0%}; a smaller --micro-batch leaves room for the allocator"
        ]
    return [], []


def host_memory(plan: dict[str, Any]) -> list[str]:
    """Problems of the plan's host memory per node (pure): a node that runs out of memory kills the job
    (the kernel's OOM killer, or Slurm's cgroup), at start-up while the engines are built, or later
    while it loads a checkpoint on resume. One line for each figure that does not fit."""
    h = plan.get("host_memory")
    if not h or h["fits"]:
        return []
    where = f"{plan['model']} needs {{:.0f}} GiB of host memory per node{{}} on {plan['profile']}"
    problems = []
    if h["per_node_gib"] > h["capacity_gib"]:
        shared = f" + {h['shared_gib']:.1f} GiB of checkpointed weights once" if h.get("shared_gib") else ""
        problems.append(
            f"nodes.memory_gib: {where.format(h['per_node_gib'], '')} ({h['ranks_per_node']} ranks x "
            f"{h['per_rank_gib']:.1f} GiB with {h['loader_workers']} data-loader workers each{shared}) but a "
            f"node has {h['capacity_gib']:g} GiB; allowed: fewer workers (--set data.workers=N), a higher "
            "--zero-stage (ZeRO-3 checkpoints hold no whole copy of the weights), or nodes with more memory"
        )
    if not h.get("startup_fits", True):
        once = f" + {h['startup_shared_gib']:.1f} GiB once: rank 0's fp32 model" if h.get("startup_shared_gib") else ""
        problems.append(
            f"nodes.memory_gib: {where.format(h['startup_per_node_gib'], ' at start-up')} ({h['ranks_per_node']} "
            f"ranks x {h['startup_per_rank_gib']:.1f} GiB: {h['deepspeed_staged_gib']:.1f} GiB of parameter groups "
            f"flattened on the host, {h['startup_model_gib']:.1f} GiB of model on the CPU{once}) but a node has "
            f"{h['capacity_gib']:g} GiB; allowed: less of the model per GPU (more GPUs, --tp or --pp) so that "
            "DeepSpeed flattens its parameter groups on the GPU, a smaller model, or nodes with more memory"
        )
    return problems


def checkpoint(plan: dict[str, Any]) -> list[str]:
    """Warnings about the checkpoint written when Slurm signals the time limit (pure).

    A warning, not a refusal: a checkpoint cut short at the time limit loses the work since the last
    periodic checkpoint (at most checkpoint_every steps), not the run (the partial one is discarded and
    the run resumes from the one before), and the write bandwidth behind the figure is the profile's
    default unless the site stated it."""
    k = plan.get("checkpoint")
    if not k or k["ok"] is not False:
        return []
    fix = (
        f"signal_delay_s = {k['needed_signal_delay_s']} in the profile's [slurm] table"
        if k["needed_signal_delay_s"] <= SIGNAL_DELAY_MAX
        else f"a faster checkpoint filesystem: signal_delay_s is at most {SIGNAL_DELAY_MAX}"
    )
    return [
        f"slurm.signal_delay_s: {k['signal_delay_s']} s may not leave time to checkpoint before the time limit: "
        f"the busiest node writes {k['busiest_node_bytes'] / 1e9:,.0f} of the checkpoint's {k['bytes'] / 1e9:,.0f} GB in about "
        f"{k['write_s']:.0f} s at {k['write_gb_s_per_node']:g} GB/s per node, "
        f"after up to one {k['step_s']:.0f} s step, {k['needed_signal_delay_s']} s with the margin; allowed: {fix}, "
        "or the filesystem's real bandwidth in [storage] write_gb_s_per_node"
    ]


def data(cfg: TrainConfig, dp: int = 1) -> list[str]:
    """Shards and tokenizer readable where the job will read them; vocabularies equal (edge: reads files).
    The held-out shards are those the trainer evaluates on: data.eval_shards, else <data.shards>/eval
    when it holds shards (vltrain.evaluate.default_eval_shards), read at the first evaluation."""
    from vltrain.data.shards import resolve_shards
    from vltrain.evaluate import default_eval_shards

    out = []
    d = cfg.data
    held_out = d.eval_shards or (default_eval_shards(cfg) if d.shards and not url_problem(d.shards, "") else "")
    for key, spec in (("data.shards", d.shards), ("data.eval_shards", held_out)):
        if not spec:
            if key == "data.shards":
                out.append(
                    "data.shards: not set; allowed: a directory of WebDataset shards (--set data.shards=DIR; "
                    "vltrain data synth --out DIR makes synthetic ones)"
                )
            continue
        if url_problem(spec, key):  # refused by trainer_support (vltrain.support), the trainer's own list
            continue
        try:
            shards = resolve_shards(spec, what=key)
        except UserError as e:
            out.append(str(e))
            continue
        unreadable = [str(p) for p in shards if not os.access(p, os.R_OK)]
        if unreadable:
            out.append(
                f"{key}: {unreadable[0]} is not readable ({len(unreadable)} of {len(shards)}); "
                "allowed: shards the job's user can read"
            )
        elif problem := next(filter(None, (tar_problem(p, key) for p in shards[:TAR_CHECKS])), None):
            out.append(problem)
        elif len(shards) <= TAR_CHECKS and all(empty_tar(p) for p in shards):
            out.append(f"{key}: {spec} holds no samples (every shard an empty tar); allowed: shards with samples")
        elif problem := per_rank(key, spec, shards, dp, train=key == "data.shards"):
            out.append(problem)
    if held_out and not url_problem(held_out, ""):  # a bad classes.json now, not after training (zero-shot)
        from vltrain.zero_shot import find_classes

        try:
            find_classes(cfg, held_out)
        except UserError as e:
            out.append(str(e))
    if d.tokenizer:
        out += tokenizer(d.tokenizer, resolve_model(cfg.model).vocab_size)
    return out


def per_rank(key: str, spec: str, shards: list[Path], dp: int, train: bool) -> str | None:
    """One line when a data-parallel rank would get no sample, which the trainer's loader refuses (at start,
    or at the first evaluation for held-out shards), counted as the loader counts: from img2dataset's
    `NNNNN_stats.json` beside each tar (vltrain.data.shards.stats_count; shards split over the ranks when
    there are at least as many as ranks). None when a shard has no stats file (its index is the trainer's
    to read) or there are more than STATS_CHECKS shards."""
    from vltrain.data.shards import stats_count

    counts = [stats_count(p) for p in shards] if len(shards) <= STATS_CHECKS else [None]
    known = [c for c in counts if c is not None]
    if len(known) < len(counts):
        return None
    total = sum(known)
    if train and len(shards) >= dp:
        least = min(sum(known[r::dp]) for r in range(dp))
    else:
        least = total // dp if train else len(range(dp - 1, total, dp))
    if least:
        return None
    return (
        f"{key}: {spec} holds {total:,} samples in {len(shards):,} shards (their stats files), and one of the "
        f"{dp} data-parallel ranks would get none; allowed: at least one sample for each rank (more data, or "
        "fewer GPUs)"
    )


def tokenizer(path: str, vocab_size: int) -> list[str]:
    from vltrain.tokenizer import Tokenizer

    if not Path(path).is_file():
        return [
            f"data.tokenizer: {path} does not exist; allowed: a model from `vltrain tokenizer train`, or "
            "empty to train one on data.shards into the run directory"
        ]
    try:
        tok = Tokenizer.load(path)
    except UserError as e:
        return [str(e)]
    if tok.vocab_size != vocab_size:
        return [
            f"data.tokenizer: {path} has {tok.vocab_size:,} pieces but model.vocab_size is {vocab_size:,}; "
            f"allowed: a tokenizer of {vocab_size:,} pieces, or --set model.vocab_size={tok.vocab_size}"
        ]
    return []


def tokenizer_needed(cfg: TrainConfig, world_size: int) -> list[str]:
    """A run of more than one rank needs data.tokenizer made beforehand (pure): without it rank 0 trains
    one on all the captions at start (vltrain.tokenizer.tokenizer_for_run) while every other rank waits
    in a collective under the start-up time-out, and a large corpus outlasts it (exit 75, retried)."""
    if cfg.data.tokenizer or world_size <= 1:
        return []
    vocab = resolve_model(cfg.model).vocab_size
    return [
        f"data.tokenizer: not set for a {world_size}-rank run; allowed: a tokenizer made beforehand with "
        f"`vltrain tokenizer train --shards {cfg.data.shards or 'DIR'} --vocab-size {vocab} --out FILE` "
        "and --set data.tokenizer=FILE (one rank alone would train it while the others wait under the time-out)"
    ]


def scheduler(profile: ClusterProfile) -> Checks:
    """What the profile's scheduler says about its request (edge: asks it; backends.api.check_profile)."""
    from clusterctl.backends import get_backend

    said = get_backend(profile.executor).check_profile(profile)
    return Checks(said.problems, said.warnings, [said.skipped] if said.skipped else [])


def check(cfg: TrainConfig, plan: dict[str, Any], profile: ClusterProfile | None = None) -> Checks:
    """Every check; the scheduler is asked only when `profile` is given (submit: not `plan`)."""
    problems, warnings = memory(plan)
    sched = scheduler(profile) if profile is not None else Checks()
    return Checks(
        problems=trainer_support(cfg)
        + problems
        + host_memory(plan)
        + data(cfg, plan.get("data_parallel", 1))
        + tokenizer_needed(cfg, plan["world_size"])
        + sched.problems,
        warnings=warnings + checkpoint(plan) + sched.warnings,
        skipped=sched.skipped,
    )
