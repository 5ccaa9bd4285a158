"""Step time and peak resident memory per rank of a run on a calibrated CPU cluster (pure; issue 29).

A CPU profile (gpu.kind = "cpu") with a [calibration] table (clusterctl.planning.calibration, measured
by `clusterctl profiles calibrate`) gets a prediction built from its measured rates, each term named
so that `plan` shows the breakdown:

step time (one optimizer step of one rank: the ranks wait for each other at every reduction)
  blocks       the transformer blocks' matmul FLOPs (vltrain.model_math, x3 for forward + backward) at the
               calibrated GFLOP/s of the trainer's own Block at the part's width over the micro batch's
               tokens (block_gflops: norms, SDPA, GELU and their dispatch included), per micro step
  heads        the two vocabulary heads: a GEMM at the calibrated matmul rate of its size, and the new
               memory of each micro step (logits, log-probabilities, their gradients, the embedding's
               dense gradients) at the calibrated fresh-memory rate (alloc_gb_s: page faults)
  dispatch     the other ops of a forward (embeddings, losses: OPS_REST) at the per-op dispatch cost
  accumulation every micro step after the first summing its gradients into the full-size param.grad
               (both engines: DeepSpeed's stage 1 and FSDP2 with sync off leave it to autograd) at the
               calibrated cost per parameter (grad_accumulate_ns; 0 in a table without it)
  optimizer    AdamW over the rank's parameters at its calibrated cost per parameter (adamw_ns: its
               temporaries included), gradient clipping and the engine's copies over the rank's bytes at
               the copy bandwidth, the gradients made anew after zero_grad at the fresh-memory rate, and
               FSDP's per-tensor clip + AdamW loop over DTensors (calibrated: fsdp_adamw_us)
  communication  DeepSpeed ZeRO-2 on CPU fp32 (run as stage 1 without hooks, dsconfig.hookless_zero): the
               micro steps summed in place, the gradients reduced once per step (reduce-scatter) and the
               updated partitions all-gathered; FSDP2 (zero_stage
               2): every block gathered once per micro step (kept from forward to backward), each unit's
               calibrated per-micro-step cost (fsdp_unit_us + bytes at fsdp_unit_gb_s: hooks, the
               gather, copies), gradients reduce-scattered at the last; bytes at the calibrated gloo bus
               bandwidth, + latency per call; both engines: the ITC loss's two gathers per micro step
               (gather_us: a wait for the other rank each)
peak resident set (what the trainer reports as mem_gib on CPU: ru_maxrss)
  base         the calibrated resident set of a rank before it builds a model
  weights, gradients, optimizer  fp32 model states as each engine holds them (below)
  activations  one micro batch's forward working set, fp32 (model_math)

What is not predicted on CPU, and why: the data loader's time (decoding and augmenting runs in the rank
on CPU, workers = 0; its cost depends on the images, not on the calibrated rates; ~5% of a tiny step),
and other processes on the machine: the calibration is taken once, a shared machine's load changes the
rates of every term (docs/planning.md, "Predicting a CPU cluster").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clusterctl.planning.comm import ring_factor
from vltrain import model_math

if TYPE_CHECKING:
    from clusterctl.planning.calibration import Calibration
    from clusterctl.planning.profiles import ClusterProfile
    from vltrain.model_config import ModelConfig

MIB = 2**20
# Ops a forward dispatches outside its transformer blocks (embeddings, heads, the three losses), each with
# its backward: counted once with a TorchDispatchMode (tiny: 385 ops, small: 1038; one more ViT, text or
# cross-attention layer adds 39, 42, 70: those are inside the calibrated block rates).
OPS_REST = 125
OPS_ADAMW_PER_TENSOR = 12  # torch AdamW's single-tensor loop on CPU (no foreach on CPU tensors)
LOGITS_ARRAYS = 3  # new fp32 arrays per vocabulary head and micro step: logits, log-probabilities, their gradient
EMBEDDING_GRADS = 2  # dense vocabulary x width gradients per micro step (the embedding's two look-ups)
ADAMW_BYTES = 7 * 4  # per parameter: read p, g, m, v; write p, m, v (fp32)
ITC_GATHERS = 2  # differentiable all-gathers per forward: the ITC loss's image and text features (losses.py)
CLIP_BYTES = 3 * 4  # the gradient's norm (read) and its scaling (read + write)


@dataclass(frozen=True)
class Run:
    """What shapes a step on one rank: the model, the batch split and the engine."""

    model: ModelConfig
    micro_batch: int
    accumulation: int
    ranks: int  # data-parallel ranks
    strategy: str  # "deepspeed" | "fsdp"
    params: int
    checkpointing: bool = False


@dataclass(frozen=True)
class CpuPrediction:
    step_terms: dict[str, float]  # seconds per optimizer step, by term
    memory_terms: dict[str, float]  # MiB per rank, by term
    unpredicted: tuple[str, ...]
    peak_phase: str = "backward"  # when the peak resident set is reached (memory_phases)

    @property
    def step_time_s(self) -> float:
        return sum(self.step_terms.values())

    @property
    def peak_rss_gib(self) -> float:
        return sum(self.memory_terms.values()) / 1024

    def to_dict(self) -> dict[str, Any]:
        """The JSON of `plan --json` "cpu_prediction" (extend, never rename)."""
        return {
            "step_time_s": round(self.step_time_s, 4),
            "peak_rss_gib": round(self.peak_rss_gib, 4),
            "step_terms_s": {k: round(v, 5) for k, v in self.step_terms.items()},
            "memory_terms_mib": {k: round(v, 1) for k, v in self.memory_terms.items()},
            "peak_phase": self.peak_phase,
            "not_predicted": list(self.unpredicted),
        }


UNPREDICTED = (
    "data loading: decoded and augmented in the rank (no workers on CPU), its cost set by the images",
    "other load on the machine: the rates are those of the calibration's moment",
)


# ------------------------------------------------------------------ step time
def _parts(cfg: ModelConfig, micro: int) -> list[tuple[float, int, int]]:
    """(forward matmul FLOPs of one micro batch, width, tokens) of the parts that run as transformer
    blocks: the ViT (its patch embedding with it) and the text towers (unimodal twice, fusion, decoder)."""
    parts = model_math.forward_flops_breakdown(cfg)
    text = parts["itc"] + parts["mlm"] + parts["caption"] - 2 * _logits_flops(cfg)
    return [
        (parts["vision"] * micro, cfg.vision_width, micro * (cfg.num_patches + 1)),
        (text * micro, cfg.text_width, micro * cfg.max_text_len),
    ]


def _logits_flops(cfg: ModelConfig) -> float:
    """One vocabulary head's forward FLOPs per sample (the MLM and the LM heads: two per forward)."""
    return 2.0 * cfg.max_text_len * cfg.text_width * cfg.vocab_size


def _heads_s(cal: Calibration, cfg: ModelConfig, micro: int) -> float:
    """The two vocabulary heads: a plain GEMM (tokens x width @ width x vocab) at the calibrated matmul rate
    of its size (the cube root of m*k*n), and their cross-entropy's fp32 logits at the copy bandwidth."""
    m, k, n = micro * cfg.max_text_len, cfg.text_width, cfg.vocab_size
    gemm = 3 * 2 * _logits_flops(cfg) * micro / (cal.matmul_rate(float(m * k * n) ** (1 / 3)) * 1e9)
    fresh = LOGITS_ARRAYS * 2 * m * n * 4 + EMBEDDING_GRADS * n * k * 4  # new tensors of each micro step
    return gemm + fresh / (_alloc_rate(cal) * 1e9)


def _alloc_rate(cal: Calibration) -> float:
    """GB/s of fresh memory: the calibrated figure, else the copy bandwidth (a table without it)."""
    return cal.alloc_gb_s or cal.memory_gb_s


def _param_tensors(cfg: ModelConfig) -> int:
    """Parameter tensors (biased linears, norms with bias): what a per-tensor optimizer loop visits."""
    per_self, per_cross = 12, 20  # 2 norms + qkv + out + 2 MLP linears (weight + bias each); + norm, q, kv, out
    return (
        per_self * (cfg.vision_layers + cfg.text_layers)
        + per_cross * (cfg.fusion_layers + cfg.decoder_layers)
        + 20  # embeddings, positions, final norms, projections, temperature
    )


def _comm(cal: Calibration, run: Run) -> float:
    """Seconds of gloo collectives per step: bytes x (n-1)/n at the bus bandwidth (an all-reduce counts
    both halves) plus the calibrated latency per call."""
    n = run.ranks
    if n <= 1:
        return 0.0
    full = run.params * 4.0
    half = full * ring_factor("all_gather", n) / (cal.allreduce_gb_s * 1e9)  # one reduce-scatter or all-gather
    lat = cal.allreduce_latency_us * 1e-6
    small_calls = 3  # the gradient norm, the loss for the log, the step's found-inf check
    # the ITC loss's two differentiable gathers (image and text features) of every micro step: each a point
    # where the ranks wait for each other (calibrated gather_us), else the bare latency
    itc = run.accumulation * ITC_GATHERS * (lat if cal.gather_us is None else cal.gather_us * 1e-6)
    if run.strategy == "fsdp":
        units = run.model.vision_layers + run.model.text_layers + run.model.fusion_layers + run.model.decoder_layers + 1
        return itc + run.accumulation * _fsdp_micro(cal, run, units) + half + units * lat + small_calls * lat
    from vltrain.dsconfig import bucket_elements

    buckets = math.ceil(run.params / bucket_elements(run.params))
    return itc + 2 * half + (2 * buckets * n + small_calls) * lat


def _fsdp_micro(cal: Calibration, run: Run, units: int) -> float:
    """Seconds FSDP2 adds to each micro step (every block gathered in forward, resharded after backward):
    each unit's calibrated fixed cost and the model's fp32 bytes at the calibrated per-byte rate
    (fsdp_unit_us, fsdp_unit_gb_s: hooks, the gather's call and bytes, copy-in and copy-out, measured on
    the trainer's Blocks wrapped as the engine wraps them); without them, the gather's bytes at the bus
    bandwidth and the all-reduce latency per unit."""
    n = run.ranks
    gather = run.params * 4.0 * ring_factor("all_gather", n) / (cal.allreduce_gb_s * 1e9)
    if cal.fsdp_unit_us is None or cal.fsdp_unit_gb_s is None:
        return gather + units * cal.allreduce_latency_us * 1e-6
    return units * cal.fsdp_unit_us * 1e-6 + run.params * 4.0 / (cal.fsdp_unit_gb_s * 1e9)


def step_terms(cal: Calibration, run: Run) -> dict[str, float]:
    cfg, micro, acc = run.model, run.micro_batch, run.accumulation
    recompute = 4 / 3 if run.checkpointing else 1.0
    blocks = 0.0
    for flops, width, tokens in _parts(cfg, micro):
        rate = cal.block_rate(width, tokens) or cal.matmul_rate(float(tokens * width * 4 * width) ** (1 / 3))
        blocks += 3 * flops / (rate * 1e9)
    shard = run.params / run.ranks
    opt_bytes = CLIP_BYTES * shard
    opt_ops = 4 * run.params / (_alloc_rate(cal) * 1e9)  # the gradients, new after every zero_grad
    if cal.adamw_ns is None:  # a table from before the figure: AdamW's reads and writes at the copy bandwidth
        opt_bytes += ADAMW_BYTES * shard
    else:
        opt_ops += shard * cal.adamw_ns * 1e-9
    if run.strategy == "deepspeed":
        opt_bytes += 3 * 4 * run.params  # gradients into the flat bucket; partitions back into the weights
    else:
        # DTensors: every op dispatches through DTensor (calibrated per tensor: fsdp_adamw_us), else plain ops
        per_tensor = OPS_ADAMW_PER_TENSOR * cal.op_overhead_us if cal.fsdp_adamw_us is None else cal.fsdp_adamw_us
        opt_ops += _param_tensors(cfg) * per_tensor * 1e-6
    return {
        "blocks": acc * blocks * recompute,
        "heads": acc * _heads_s(cal, cfg, micro),
        "dispatch": acc * OPS_REST * cal.op_overhead_us * 1e-6,
        "accumulation": (acc - 1) * run.params * (cal.grad_accumulate_ns or 0.0) * 1e-9,
        "optimizer": opt_bytes / (cal.memory_gb_s * 1e9) + opt_ops,
        "communication": _comm(cal, run),
    }


# ------------------------------------------------------------------ memory
def activation_bytes(cfg: ModelConfig, checkpointing: bool) -> float:
    """fp32 bytes one sample's forward keeps for backward on CPU: model_math's working set (Korthikanti et
    al.'s counts at 4 bytes) less what this model does not keep there: dropout masks (it has no dropout),
    the s x s attention scores (SDPA's fused CPU kernel keeps none) and one of the two fp32 copies it counts
    per logit (the cross-entropy keeps one). Traced on slurm-local (docs/planning.md)."""
    t, sv = cfg.max_text_len, cfg.num_patches + 1
    wv, wt = cfg.vision_width, cfg.text_width
    hv, ht = cfg.vision_heads, cfg.text_heads
    unkept = (  # elements, in the paper's 2-byte units: x 2 at fp32
        cfg.vision_layers * (2 * sv * wv + 5 * hv * sv * sv)
        + 2 * cfg.text_layers * (2 * t * wt + 5 * ht * t * t)
        + (cfg.fusion_layers + cfg.decoder_layers) * (3 * t * wt + 5 * ht * t * t + 5 * ht * t * sv)
    )
    if checkpointing:  # only the recomputed block's working set was counted: leave the kept inputs
        unkept = 0
    logits_copy = 2 * t * cfg.vocab_size * 4
    return model_math.activation_bytes_per_sample(cfg, checkpointing, 4) - 2 * unkept - logits_copy


# What a training rank holds besides its model, engine and activations that the calibration's base does not:
# the data loader and tokenizer, the first batches, the loss and logging buffers, the engine's set-up
# leftovers in the heap. Not measured by `calibrate` (it needs the run's data): read off slurm-local runs'
# resident set just before the engine is built (tiny and small, DeepSpeed and FSDP: 55-87 MiB).
RUNTIME_MIB = 70.0


def memory_phases(cal: Calibration, run: Run) -> dict[str, dict[str, float]]:
    """MiB per rank, by term, at the two moments that can hold the peak: the end of a forward (backward
    starts: activations kept, the optimizer's states alive from the first step) and the optimizer step.

    DeepSpeed ZeRO-2 (fp32): the module's weights and DeepSpeed's flat copy of them (the module's own
    tensors, freed, stay in the heap: +1 copy measured at deepspeed.initialize), the full gradients
    (autograd sums the coalesced micro steps in them) and a reduce bucket (below), the rank's
    fp32 partition, its gradient and AdamW's two moments, and at the step AdamW's temporary (its
    denominator, a partition's size). FSDP2 (zero_stage 2): the rank's shards, every block gathered from
    forward to backward (a full copy), the unsharded fp32 gradients of the accumulation, the sharded
    gradients and AdamW's moments of the shard, and its temporaries (a shard's size); with accumulation, the
    unsharded sum kept between micro steps and the micro step's own gradient before it is added (+2 copies,
    measured: small at accumulation 8 peaks 2.4 copies above accumulation 1 at one eighth the micro batch).
    DeepSpeed's bucket term is the config's reduce_bucket_size (bucket_elements, 20M elements at least) in
    fp32 whatever the model's size: on CPU ranks DeepSpeed now runs stage 1 without hooks (vltrain.dsconfig.
    hookless_zero), which flattens the gradients bucket by bucket, only 3 MB on tiny; the term stands for
    what DeepSpeed ranks were measured to hold above FSDP ranks at equal activations (70-110 MiB on tiny,
    with and without the hooks), whose source the traces did not single out."""
    from vltrain.dsconfig import bucket_elements

    p, n = float(run.params), run.ranks
    act = activation_bytes(run.model, run.checkpointing) * run.micro_batch
    if run.strategy == "deepspeed":
        imports, weights, grads = 0.0, 2 * 4 * p, 4 * p + 4 * float(bucket_elements(run.params))
        states, step_grads = (4 + 8) * p / n, 4 * p / n
    else:
        accumulating = 2 * 4 * p if run.accumulation > 1 else 0.0  # the sum so far + this micro step's
        imports, weights, grads = cal.fsdp_imports_mib, 4 * p / n + 4 * p, 4 * p + 4 * p / n + accumulating
        states, step_grads = 8 * p / n, 0.0
    fixed = {"base": cal.base_rss_mib, "imports": imports, "runtime": RUNTIME_MIB, "weights": weights / MIB}
    return {
        "backward": fixed | {"gradients": grads / MIB, "optimizer": states / MIB, "activations": act / MIB},
        "optimizer step": fixed
        | {"gradients": (grads + step_grads) / MIB, "optimizer": (states + 4 * p / n) / MIB, "activations": 0.0},
    }


def memory_terms(cal: Calibration, run: Run) -> tuple[str, dict[str, float]]:
    """The phase that holds the peak and its terms (MiB per rank)."""
    phases = memory_phases(cal, run)
    peak = max(phases, key=lambda k: sum(phases[k].values()))
    return peak, phases[peak]


def predict(cal: Calibration, run: Run) -> CpuPrediction:
    phase, memory = memory_terms(cal, run)
    return CpuPrediction(step_terms(cal, run), memory, UNPREDICTED, phase)


# ------------------------------------------------------------------ plan
def plan_entry(profile: ClusterProfile, model: ModelConfig | str, plan: dict[str, Any]) -> dict[str, Any]:
    """What `plan` adds for a CPU profile: {"cpu_prediction": ...} with a calibration, {"cpu_prediction":
    None} without one (the text says to calibrate), nothing for a GPU profile. `model`: the resolved
    config's (a preset name is resolved here)."""
    from vltrain.presets import resolve_model

    if profile.gpu.kind != "cpu":
        return {}
    model = resolve_model(model)
    if profile.calibration is None or plan.get("pipeline_parallel", 1) > 1 or plan.get("tensor_parallel", 1) > 1:
        return {"cpu_prediction": None}
    run = Run(
        model=model,
        micro_batch=plan["micro_batch"],
        accumulation=plan["accumulation"],
        ranks=plan["data_parallel"],
        strategy=plan["strategy"],
        params=plan["params"],
        checkpointing=plan["activation_checkpointing"],
    )
    return {"cpu_prediction": predict(profile.calibration, run).to_dict()}
