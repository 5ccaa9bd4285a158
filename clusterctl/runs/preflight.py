"""Checks before sbatch: what would make the job fail on the cluster, found here in a second.

A run whose data is missing used to become a Slurm job that failed 7 s later, its reason inside a
traceback in `logs --stderr`. `check` finds that, and everything else the job cannot get past:
data shards and tokenizer readable (at the absolute paths the job will use), the tokenizer's
vocabulary equal to the model's, the plan fitting in GPU memory, and every part of the config the
trainer runs today (a recipe may state more: FSDP, tensor/pipeline parallelism, fp16, masked image
modelling). `submit` refuses the first problem in one line, exit 2, before anything is written;
`submit --dry-run` lists them all and exits 0, since it submits nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vltrain.common.errors import UserError
from vltrain.config import TrainConfig
from vltrain.presets import resolve_model

MEMORY_WARNING = 0.90  # of a GPU's memory: above it a run is one allocator hiccup from an OOM
REMOTE = ("s3:", "gs:", "http:", "https:", "pipe:")  # streamed: nothing to check from here


@dataclass
class Checks:
    problems: list[str] = field(default_factory=list)  # each one would stop the job: submit refuses
    warnings: list[str] = field(default_factory=list)  # worth a line, not a refusal

    def to_dict(self) -> dict[str, Any]:
        return {"problems": self.problems, "warnings": self.warnings}


def trainer_support(cfg: TrainConfig) -> list[str]:
    """What the config asks for that the trainer does not run yet, each with what to use instead (pure)."""
    out = []
    p = cfg.parallel
    if p.strategy == "fsdp":
        out.append(
            "parallel.strategy: 'fsdp' is not run by the trainer yet; allowed: deepspeed "
            "(--set parallel.strategy=deepspeed with --zero-stage 3 shards like FSDP)"
        )
    if p.tp > 1 or p.pp > 1:
        out.append(
            f"parallel: tensor x pipeline parallel (tp {p.tp} x pp {p.pp}) is planned but not run by the "
            "trainer yet; allowed: --tp 1 --pp 1 (data parallel)"
        )
    if cfg.precision == "fp16":
        out.append("precision: fp16 is not run by the trainer yet; allowed: bf16 or fp32 (--set precision=bf16)")
    if cfg.loss.mim > 0:
        out.append("loss.mim: masked image modelling is not run by the trainer yet; allowed: 0 (--set loss.mim=0)")
    return out


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


def data(cfg: TrainConfig) -> list[str]:
    """Shards and tokenizer readable where the job will read them; vocabularies equal (edge: reads files)."""
    from vltrain.data.shards import resolve_shards

    out = []
    d = cfg.data
    for key, spec in (("data.shards", d.shards), ("data.eval_shards", d.eval_shards)):
        if not spec:
            if key == "data.shards":
                out.append(
                    "data.shards: not set; allowed: a directory of WebDataset shards (--set data.shards=DIR; "
                    "vltrain data synth --out DIR makes synthetic ones)"
                )
            continue
        if spec.startswith(REMOTE):
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
    if d.tokenizer:
        out += tokenizer(d.tokenizer, resolve_model(cfg.model).vocab_size)
    return out


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


def check(cfg: TrainConfig, plan: dict[str, Any]) -> Checks:
    problems, warnings = memory(plan)
    return Checks(problems=trainer_support(cfg) + problems + data(cfg), warnings=warnings)
