"""Step time and peak resident memory per rank of a run on a calibrated CPU cluster (pure; issue 29).

A CPU profile (gpu.kind = "cpu") with a [calibration] table (clusterctl.planning.calibration, measured
by `clusterctl profiles calibrate`) gets a prediction built from its measured rates, each term named
so that `plan` shows the breakdown:

step time (one optimizer step of one rank: the ranks wait for each other at every reduction)
  matmul       the model's matmul FLOPs (vltrain.model_math, x3 for forward + backward) at the calibrated
               fp32 GFLOP/s of each part's GEMM size (cube root of m*k*n of its linear layers)
  dispatch     the ops the forward runs (counted per block type on the real model, OPS_*) times the
               calibrated per-op cost of a forward + backward dispatch, per micro step
  elementwise  activations written in forward and read in backward (model_math's fp32 working set)
               at the calibrated copy bandwidth, per micro step
  optimizer    AdamW, gradient clipping and the engine's copies over the rank's bytes, at the copy
               bandwidth, plus per-tensor dispatch where the optimizer loops over tensors (FSDP)
  communication  DeepSpeed ZeRO-2 on CPU fp32: the micro steps are coalesced, the gradients reduced
               once per step (reduce-scatter) and the updated partitions all-gathered; FSDP2 (zero_stage
               2): every block gathered once per micro step (kept from forward to backward), gradients
               reduce-scattered at the last; both at the calibrated gloo bus bandwidth + latency per call
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

from vltrain import model_math

if TYPE_CHECKING:
    from clusterctl.planning.calibration import Calibration
    from clusterctl.planning.profiles import ClusterProfile
    from vltrain.model_config import ModelConfig

MIB = 2**20
# Ops a forward dispatches (each with its backward), counted with a TorchDispatchMode on the tiny and the
# small presets and on tiny with one more layer of each kind (bench/bench_planner.py's notes): per
# self-attention block of the ViT, per unimodal text layer (it runs twice: clean and masked text), per
# cross-attention block (fusion, decoder), and the rest (embeddings, heads, the three losses).
OPS_VISION, OPS_TEXT, OPS_CROSS, OPS_REST = 39, 42, 70, 125
OPS_ADAMW_PER_TENSOR = 12  # torch AdamW's single-tensor loop on CPU (no foreach on CPU tensors)
ACTIVATION_PASSES = 2  # activation bytes written in forward, read in backward
ADAMW_BYTES = 7 * 4  # per parameter: read p, g, m, v; write p, m, v (fp32)
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
            "not_predicted": list(self.unpredicted),
        }


UNPREDICTED = (
    "data loading: decoded and augmented in the rank (no workers on CPU), its cost set by the images",
    "other load on the machine: the rates are those of the calibration's moment",
)


# ------------------------------------------------------------------ step time
def _gemm_parts(cfg: ModelConfig, micro: int) -> list[tuple[float, float]]:
    """(forward FLOPs of one micro batch, effective GEMM size) per part: the ViT, the text towers, the
    two vocabulary heads. The size is the cube root of m*k*n of the part's MLP input linear."""
    parts = model_math.forward_flops_breakdown(cfg)
    t, sv = cfg.max_text_len, cfg.num_patches + 1
    logits = 2 * t * cfg.text_width * cfg.vocab_size  # each head, model_math's count
    text = parts["itc"] + parts["mlm"] + parts["caption"] - 2 * logits
    hv, ht = model_math.mlp_hidden(cfg, cfg.vision_width), model_math.mlp_hidden(cfg, cfg.text_width)

    def size(m: int, k: int, n: int) -> float:
        return float(m * k * n) ** (1 / 3)

    return [
        (parts["vision"] * micro, size(micro * sv, cfg.vision_width, hv)),
        (text * micro, size(micro * t, cfg.text_width, ht)),
        (2 * logits * micro, size(micro * t, cfg.text_width, cfg.vocab_size)),
    ]


def forward_ops(cfg: ModelConfig) -> int:
    """Ops one forward dispatches (see OPS_*)."""
    return (
        OPS_REST
        + OPS_VISION * cfg.vision_layers
        + OPS_TEXT * cfg.text_layers
        + OPS_CROSS * (cfg.fusion_layers + cfg.decoder_layers)
    )


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
    half = full * (n - 1) / n / (cal.allreduce_gb_s * 1e9)  # one reduce-scatter or all-gather of the model
    lat = cal.allreduce_latency_us * 1e-6
    small_calls = 3  # the gradient norm, the loss for the log, the step's found-inf check
    if run.strategy == "fsdp":
        units = run.model.vision_layers + run.model.text_layers + run.model.fusion_layers + run.model.decoder_layers + 1
        return run.accumulation * (half + units * lat) + half + units * lat + small_calls * lat
    from vltrain.dsconfig import bucket_elements

    buckets = math.ceil(run.params / bucket_elements(run.params))
    return 2 * half + (2 * buckets * n + small_calls) * lat


def step_terms(cal: Calibration, run: Run) -> dict[str, float]:
    cfg, micro, acc = run.model, run.micro_batch, run.accumulation
    recompute = 4 / 3 if run.checkpointing else 1.0
    matmul = sum(3 * f / (cal.matmul_rate(n) * 1e9) for f, n in _gemm_parts(cfg, micro)) * recompute
    act = model_math.activation_bytes_per_sample(cfg, run.checkpointing, 4) * micro
    shard = run.params / run.ranks
    opt_bytes = (ADAMW_BYTES + CLIP_BYTES) * shard
    opt_ops = 0.0
    if run.strategy == "deepspeed":
        opt_bytes += 3 * 4 * run.params  # gradients into the flat bucket; partitions back into the weights
    else:
        opt_ops = _param_tensors(cfg) * OPS_ADAMW_PER_TENSOR * cal.op_overhead_us * 1e-6
    return {
        "matmul": acc * matmul,
        "dispatch": acc * forward_ops(cfg) * recompute * cal.op_overhead_us * 1e-6,
        "elementwise": acc * ACTIVATION_PASSES * act / (cal.memory_gb_s * 1e9),
        "optimizer": opt_bytes / (cal.memory_gb_s * 1e9) + opt_ops,
        "communication": _comm(cal, run),
    }


# ------------------------------------------------------------------ memory
def memory_terms(cal: Calibration, run: Run) -> dict[str, float]:
    """MiB per rank at the peak (the end of a micro step's backward, the optimizer's states alive).

    DeepSpeed ZeRO-2 (fp32): the module's full weights, its full gradients (autograd sums the coalesced
    micro steps in them), the reduce bucket, the rank's fp32 partition (a copy), its gradient and AdamW's
    two moments. FSDP2 (zero_stage 2): the rank's shards of weights and gradients, every block gathered
    from forward to backward (the full weights), the unsharded fp32 gradients of the accumulation, and
    AdamW's moments of the shard."""
    from vltrain.dsconfig import bucket_elements

    p, n = float(run.params), run.ranks
    if run.strategy == "deepspeed":
        weights = 4 * p
        grads = 4 * p + 4 * min(bucket_elements(run.params), p) + 4 * p / n
        optim = 4 * p / n + 8 * p / n
    else:
        weights = 4 * p / n + 4 * p
        grads = 4 * p + 4 * p / n
        optim = 8 * p / n
    act = model_math.activation_bytes_per_sample(run.model, run.checkpointing, 4) * run.micro_batch
    return {
        "base": cal.base_rss_mib,
        "weights": weights / MIB,
        "gradients": grads / MIB,
        "optimizer": optim / MIB,
        "activations": act / MIB,
    }


def predict(cal: Calibration, run: Run) -> CpuPrediction:
    return CpuPrediction(step_terms(cal, run), memory_terms(cal, run), UNPREDICTED)


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
