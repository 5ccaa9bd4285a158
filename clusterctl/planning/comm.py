"""Communication of one optimizer step under DeepSpeed ZeRO 0-3, and how much of it compute hides (pure).

Why: `Plan.step_time_s` counts compute only. At 64-256 GPUs the gradient and parameter traffic decides
whether ZeRO-2 with accumulation or ZeRO-3 without it is faster, and what the run's MFU can be. Three parts:

1. What DeepSpeed sends per optimizer step (which collective, how large, how often), read from DeepSpeed
   0.19's source (the version in constraints.txt); each case in `collectives` cites where.
2. How long it takes: NCCL's ring model (nccl-tests doc/PERFORMANCE.md, "bus bandwidth"): an all-reduce
   of S bytes over n ranks moves 2(n-1)/n x S through every rank's link, a reduce-scatter or all-gather
   (n-1)/n x S. The bus bandwidth is the slower of a GPU's intra-node link and, across nodes, the node's
   NICs together: NCCL runs one ring per NIC (channel), so each NIC carries 1/g of the data while the
   NVLink of a GPU carries all of it. NCCL reaches about NCCL_EFFICIENCY of the link rate on large
   messages. Latency is left out: DeepSpeed's buckets are 20M-500M elements (vltrain.dsconfig).
3. How much hides behind compute (OVERLAP_FRACTION, below). This module is DeepSpeed's data parallel;
   FSDP2's collectives and the tensor/pipeline-parallel traffic are clusterctl.planning.fsdp's.

Fabric defaults (per GPU generation, read from gpu.model; docs/planning.md has the table and sources)
apply when the profile gives no [interconnect] intra_node_gb_s / inter_node_gb_s.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from clusterctl.planning.profiles import ClusterProfile

GB = 1e9  # bandwidths are in GB/s (bytes, decimal), as NVIDIA and nccl-tests quote them

# Link rates per GPU generation, GB/s in one direction (half of NVIDIA's bidirectional NVLink figure).
# NVLink: V100 NVLink2 300 GB/s, A100 NVLink3 600 GB/s, H100/H200 NVLink4 900 GB/s, B200 NVLink5 1.8 TB/s
# (bidirectional, NVIDIA data sheets). PCIe x16 per direction: gen3 16, gen4 32, gen5 64 GB/s.
# Between nodes, per node, all NICs: DGX-2 8 x EDR 100 Gb/s, DGX A100 8 x HDR 200 Gb/s, DGX H100/B200
# 8 x NDR 400 Gb/s (NVIDIA DGX user guides); RoCE at the same NIC rates (RDMA over Ethernet);
# Ethernet without RDMA (NCCL's socket transport): one 100 GbE NIC.
NVLINK_GB_S = {"volta": 150.0, "ampere": 300.0, "hopper": 450.0, "blackwell": 900.0}
PCIE_GB_S = {"volta": 16.0, "ampere": 32.0, "hopper": 64.0, "blackwell": 64.0}
RDMA_NODE_GB_S = {"volta": 100.0, "ampere": 200.0, "hopper": 400.0, "blackwell": 400.0}
ETHERNET_NODE_GB_S = 12.5
_GENERATIONS = (
    ("blackwell", r"\bG?B[12]00\b"),
    ("hopper", r"\bG?H(100|200|800)\b"),
    ("ampere", r"\bA(100|800|40|30|10)\b"),
    ("volta", r"\bV100\b"),
)
DEFAULT_GENERATION = "ampere"  # an unrecognised GPU gets A100-era fabric figures (say yours in the profile)

# NCCL's large-message bus bandwidth as a share of the link rate. nccl-tests typically report 65-90%
# (a measured example: 195 GB/s of NVLink3's 300 GB/s per direction, github.com/li-plus/playground
# cuda/nccl.md); 75% is the middle, stated rather than measured for each fabric.
NCCL_EFFICIENCY = 0.75

# Overlap: communication that DeepSpeed issues on its own CUDA stream while compute runs (overlap_comm)
# hides behind at most this share of the compute it runs alongside. Not all of it: NCCL kernels take
# SMs and HBM bandwidth from the matmuls they overlap, and a reduction cannot start before its bucket
# of gradients exists. Assumption, not measurement.
OVERLAP_FRACTION = 0.8
# Share of a micro step's compute that is backward: 2 of 3 forward-equivalents (Narayanan et al. 2021),
# 3 of 4 with activation recomputation (the recomputed forward runs during backward).
BACKWARD_SHARE = 2 / 3
BACKWARD_SHARE_RECOMPUTE = 3 / 4


def generation(gpu_model: str) -> str:
    """'ampere' for 'A100-SXM4-80GB', 'hopper' for 'H100-SXM5-80GB'; DEFAULT_GENERATION when unknown."""
    for gen, rx in _GENERATIONS:
        if re.search(rx, gpu_model.upper().replace("-", " ")):
            return gen
    return DEFAULT_GENERATION


@dataclass(frozen=True)
class Fabric:
    """The profile's bandwidths (GB/s, link rates) and where each figure came from."""

    intra_node_gb_s: float  # per GPU, one direction
    inter_node_gb_s: float  # per node, one direction, all NICs together
    intra_source: str
    inter_source: str
    nodes: int
    gpus_per_node: int

    def bus_gb_s(self) -> float:
        """Bandwidth NCCL achieves for a ring over all the job's GPUs (see the module doc)."""
        link = self.intra_node_gb_s if self.nodes == 1 else min(self.intra_node_gb_s, self.inter_node_gb_s)
        if self.gpus_per_node == 1 and self.nodes > 1:
            link = self.inter_node_gb_s
        return NCCL_EFFICIENCY * link

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"bus_gb_s": round(self.bus_gb_s(), 3)}


def fabric(profile: ClusterProfile) -> Fabric:
    """The profile's own figures where it gives them, else the defaults for its fabric kinds and GPU."""
    ic = profile.interconnect
    gen = generation(profile.gpu.model)
    if ic.intra_node_gb_s is not None:
        intra, intra_src = ic.intra_node_gb_s, "profile"
    elif ic.intra_node == "nvlink":
        intra, intra_src = NVLINK_GB_S[gen], f"default: NVLink ({gen})"
    else:  # pcie, or none: GPUs without a peer link talk through the host's PCIe
        intra, intra_src = PCIE_GB_S[gen], f"default: PCIe ({gen})"
    if ic.inter_node_gb_s is not None:
        inter, inter_src = ic.inter_node_gb_s, "profile"
    elif ic.inter_node in ("infiniband", "roce"):
        inter, inter_src = RDMA_NODE_GB_S[gen], f"default: {ic.inter_node} ({gen}, 8 NICs)"
    else:  # ethernet, or none (a single node never uses it)
        inter, inter_src = ETHERNET_NODE_GB_S, "default: one 100 GbE NIC"
    return Fabric(intra, inter, intra_src, inter_src, profile.nodes.count, profile.nodes.gpus_per_node)


def ring_factor(op: str, n: int) -> float:
    """Bytes through each rank's link per byte of the tensor (nccl-tests doc/PERFORMANCE.md)."""
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("reduce_scatter", "all_gather"):
        return (n - 1) / n
    raise ValueError(op)


@dataclass(frozen=True)
class DeepSpeedComm:
    """What of the trainer's DeepSpeed config decides the traffic (read by `from_deepspeed_config`)."""

    overlap_comm: bool = False
    grad_bytes: int = 2  # bytes per gradient element on the wire (communication_data_type)
    param_bytes: int = 2  # bytes per parameter element (bf16/fp16 weights; 4 in fp32)
    reduce_bucket_elements: float = 5e8
    bf16_fp32_accumulation: bool = False  # bf16 weights with fp32 gradient accumulation (data_types)


def from_deepspeed_config(ds: dict[str, Any]) -> DeepSpeedComm:
    """The settings of a DeepSpeed config dict (vltrain.dsconfig.deepspeed_config) that the model uses.

    DeepSpeed's communication dtype defaults to the weights' (engine.communication_data_type: fp16,
    else bf16, else fp32) unless the config names one."""
    zero = ds.get("zero_optimization", {})
    half = ds.get("bf16", {}).get("enabled", False) or ds.get("fp16", {}).get("enabled", False)
    comm_dtype = ds.get("communication_data_type")
    by_dtype: dict[str | None, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
    grad_bytes = by_dtype.get(comm_dtype, 2 if half else 4)
    return DeepSpeedComm(
        overlap_comm=bool(zero.get("overlap_comm", False)),
        grad_bytes=grad_bytes,
        param_bytes=2 if half else 4,
        reduce_bucket_elements=float(zero.get("reduce_bucket_size", 5e8)),
        bf16_fp32_accumulation=bool(ds.get("bf16", {}).get("enabled", False))
        and ds.get("data_types", {}).get("grad_accum_dtype") == "fp32",
    )


def deepspeed_refuses(zero_stage: int, ds: DeepSpeedComm) -> str | None:
    """Why DeepSpeed would refuse this stage with these settings, or None.

    engine._do_optimizer_sanity_check: without ZeRO, bf16 weights with fp32 gradient accumulation are
    an "unsupported mix" (NotImplementedError); with ZeRO-1 they select BF16_Optimizer instead."""
    if zero_stage == 0 and ds.bf16_fp32_accumulation:
        return "DeepSpeed refuses bf16 with fp32 gradient accumulation without ZeRO"
    return None


@dataclass(frozen=True)
class Collective:
    """One kind of collective in an optimizer step."""

    what: str
    op: str  # all_reduce | reduce_scatter | all_gather
    tensor_bytes: float  # the whole tensor (all ranks' shares), per call
    every_micro_step: bool  # else once per optimizer step
    window: float  # share of one micro step's compute it can overlap (0: none)
    seconds: float = 0.0  # per call, filled in by `step_comm`

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def collectives(
    params: float, zero_stage: int, ds: DeepSpeedComm, backward_share: float = BACKWARD_SHARE
) -> list[Collective]:
    """The data-parallel collectives of one optimizer step for `params` parameters per model replica.

    Per stage, as DeepSpeed 0.19 runs it (deepspeed/runtime/...):
      ZeRO-0: engine.allreduce_gradients calls buffered_allreduce_fallback at the accumulation boundary,
        after backward: one all-reduce of the gradients per step, not overlapped.
      ZeRO-1: the gradients are reduced only at the boundary (stage_1_and_2.py
        reduce_ready_partitions_and_remove_grads: `partition_gradients or is_gradient_accumulation_boundary`),
        in the boundary micro step's backward when overlap_comm registers the hooks; with bf16 weights and
        fp32 accumulation DeepSpeed uses BF16_Optimizer instead, whose all-reduce runs after backward
        (buffered_allreduce_fallback). After the optimizer step, all_gather_dp_groups gathers the
        updated 16-bit weights (stage_1_and_2.step / bf16_optimizer.step).
      ZeRO-2: partition_gradients: every micro step's backward reduces its gradients (the hooks fire on
        every backward; engine.allreduce_gradients: "ZeRO stage >= 2 communicates during non gradient
        accumulation boundaries as well"), so accumulation multiplies the traffic. The reduction is a
        reduce-scatter in effect, but average_tensor runs it as an all-reduce of each bucket from which
        each rank keeps its slice (use_multi_rank_bucket_allreduce, default true: allreduce_and_scatter
        -> allreduce_bucket -> dist.all_reduce), i.e. all-reduce volume. Then the weights' all-gather.
      ZeRO-3: every micro step gathers each layer's weights in forward and again in backward
        (partitioned_param_coordinator, released after use; stage3_max_reuse_distance keeps only the last
        ~1e9 elements' worth, ignored here) and reduce-scatters the gradients (stage3.__avg_scatter_grads
        -> reduce_scatter_coalesced). No weight gather after the step: each rank updates its own shard.
        The gathers overlap compute only on a side stream (parameter_offload: allgather stream when
        overlap_comm, else the default stream).
    """
    g, w = params * ds.grad_bytes, params * ds.param_bytes
    ov_bwd = backward_share if ds.overlap_comm else 0.0
    gather = Collective("16-bit weights all-gather after the optimizer step", "all_gather", w, False, 0.0)
    if zero_stage == 0:
        return [Collective("gradient all-reduce after backward", "all_reduce", g, False, 0.0)]
    if zero_stage == 1:
        if ds.bf16_fp32_accumulation:
            reduce = Collective("gradient all-reduce after backward (BF16_Optimizer)", "all_reduce", g, False, 0.0)
        else:
            reduce = Collective("gradient all-reduce in the last micro step's backward", "all_reduce", g, False, ov_bwd)
        return [reduce, gather]
    if zero_stage == 2:
        return [
            Collective("gradient reduction every micro step (bucket all-reduce)", "all_reduce", g, True, ov_bwd),
            gather,
        ]
    if zero_stage == 3:
        ov = 1.0 if ds.overlap_comm else 0.0
        return [
            Collective("weights all-gather in forward", "all_gather", w, True, ov),
            Collective("weights all-gather in backward", "all_gather", w, True, ov),
            Collective("gradient reduce-scatter", "reduce_scatter", g, True, ov),
        ]
    raise ValueError(zero_stage)


@dataclass(frozen=True)
class StepComm:
    """Communication of one optimizer step: its time, and what compute does not hide of it."""

    data_parallel: int
    accumulation: int
    bus_gb_s: float
    bytes_per_gpu: float  # through each GPU's link per optimizer step (ring volumes)
    communication_s: float
    exposed_s: float
    overlap_comm: bool
    collectives: tuple[Collective, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_parallel": self.data_parallel,
            "accumulation": self.accumulation,
            "bus_gb_s": round(self.bus_gb_s, 3),
            "bytes_per_gpu": self.bytes_per_gpu,
            "communication_s": round(self.communication_s, 4),
            "exposed_s": round(self.exposed_s, 4),
            "overlap_comm": self.overlap_comm,
            "collectives": [c.to_dict() for c in self.collectives],
        }


def exposed_seconds(calls: list[Collective], window_s: float, tail_s: float) -> float:
    """Seconds of `calls` (sharing one compute window) that compute does not hide: all but what fits
    in OVERLAP_FRACTION of the window, and never the last bucket (reduced after the compute ends)."""
    total = sum(c.seconds for c in calls)
    hideable = max(0.0, total - tail_s)
    return total - min(hideable, OVERLAP_FRACTION * window_s)


def step_comm(
    params: float,
    zero_stage: int,
    data_parallel: int,
    accumulation: int,
    compute_s: float,
    fab: Fabric,
    ds: DeepSpeedComm,
    backward_share: float = BACKWARD_SHARE,
) -> StepComm:
    """Communication time of one optimizer step and the part of it that adds to `compute_s`.

    `params` is one model replica's share (the model / (tp x pp)); `compute_s` the step's compute
    time, split evenly over the `accumulation` micro steps."""
    bus = fab.bus_gb_s() * GB
    n = data_parallel
    calls = []
    for c in collectives(params, zero_stage, ds, backward_share):
        seconds = ring_factor(c.op, n) * c.tensor_bytes / bus if bus > 0 else 0.0
        calls.append(Collective(c.what, c.op, c.tensor_bytes, c.every_micro_step, c.window, seconds))
    per_step = {True: accumulation, False: 1}
    total = sum(c.seconds * per_step[c.every_micro_step] for c in calls)
    volume = sum(ring_factor(c.op, n) * c.tensor_bytes * per_step[c.every_micro_step] for c in calls)
    micro_s = compute_s / accumulation
    # the last reduce bucket is reduced after its micro step's compute has ended
    grads = params * ds.grad_bytes
    tail_share = min(1.0, ds.reduce_bucket_elements * ds.grad_bytes / grads) if grads else 0.0
    exposed = 0.0
    for every in (True, False):
        group = [c for c in calls if c.every_micro_step is every and c.window > 0]
        if group:
            tail = sum(c.seconds * tail_share for c in group if c.op != "all_gather")
            window = max(c.window for c in group) * micro_s
            exposed += exposed_seconds(group, window, tail) * per_step[every]
    exposed += sum(c.seconds * per_step[c.every_micro_step] for c in calls if c.window == 0)
    return StepComm(n, accumulation, bus / GB, volume, total, exposed, ds.overlap_comm, tuple(calls))
