"""Per-GPU memory of a training step under ZeRO stages 0-3, bf16 mixed precision and AdamW (pure).
Host memory per node is clusterctl.planning.host_memory's.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", section 3 and figure 1): with Psi parameters on Nd data-parallel
ranks, mixed-precision Adam keeps
    2*Psi  bf16 parameters      (sharded by stage 3)
    2*Psi  bf16 gradients       (sharded by stages 2 and 3)
    K*Psi  optimizer states, K = 12: fp32 master weights, momentum and variance (sharded by 1, 2, 3)
so stage 0: (2+2+12)Psi, stage 1: (2+2)Psi + 12Psi/Nd, stage 2: 2Psi + (2+12)Psi/Nd,
stage 3: (2+2+12)Psi/Nd. With tensor/pipeline parallelism each GPU holds Psi/(tp*pp) of the model
before ZeRO shards it over the data-parallel ranks.

Activations per micro batch come from `vltrain.model_math.activation_bytes_per_sample`
(Korthikanti et al. 2022, eq. 2, adapted to each block type), divided by tp (Megatron's sequence
parallelism splits them); pipeline parallelism with 1F1B keeps about pp micro batches of 1/pp of the
layers in flight on the first stage, i.e. about one micro batch of the whole model, so no pp factor.

The trainer accumulates gradients in fp32 (vltrain.dsconfig), so each GPU also holds an fp32
gradient buffer: 4*Psi/Nd at stages 2-3, 4*Psi at stage 1 (DeepSpeed keeps it per parameter there).
DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs) count the same fp32 partition;
at stage 2 our figure then equals theirs exactly, and at stage 3 theirs has the largest layer
gathered whole (4 bytes per parameter) and no bf16 gradient partition (tests/test_planning.py).

Allowance for what neither formula covers, stated here and shown in every breakdown:
  * CUDA context, cuBLAS workspace and NCCL buffers: 1.5 GiB per GPU (typical on A100/H100);
  * DeepSpeed's reduce and all-gather buckets for stages 1-2 (vltrain.dsconfig.bucket_elements: a
    quarter of the model, 2e7 to 5e8 elements each; bf16, 1.86 GiB for both at 5e8);
  * DeepSpeed's fp32 reduction buffers when gradients are communicated in fp32 (vltrain.dsconfig's
    communication_data_type under bf16/fp16, `comm_buffer_bytes`), read from deepspeed/runtime/zero/
    stage_1_and_2.py: at stage 2 the bucket being reduced is flattened (a 16-bit copy) and cast to fp32
    (allreduce_bucket: self.flatten(bucket), tensor.to(communication_data_type)): 2 + 4 bytes per bucket
    element (overlap_comm's second 16-bit bucket, setup_buckets' double buffer, is the allowance's
    all-gather bucket above); at stage 1 under bf16, BF16_Optimizer's all-reduce flattens the fp32
    gradients in buffers of up to 5e8 elements (engine.buffered_allreduce_fallback); under fp16 the
    buckets themselves are fp32 (use_grad_accum_attribute), twice with overlap_comm. Seed 002: 2.79 GiB;
  * allocator fragmentation: 10% of everything else.

Capacity is what PyTorch can allocate (profiles.Gpu.capacity_gib: 79.15 GiB of an A100-80GB), not the
board's nominal memory; `near_capacity` flags a plan at NEAR_CAPACITY of it or more.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vltrain.dsconfig import bucket_elements  # reduce_bucket_size and allgather_bucket_size

GIB = 1024**3
CONTEXT_GIB = 1.5
FRAGMENTATION = 0.10
OPTIMIZER_BYTES_PER_PARAM = 12  # fp32 master + momentum + variance (AdamW)
NEAR_CAPACITY = 0.95  # of the usable memory: above it one allocator hiccup is an out-of-memory error
FALLBACK_BUFFER_ELEMENTS = 5e8  # engine.buffered_allreduce_fallback's elements_per_buffer default


@dataclass(frozen=True)
class ModelStates:
    params: float  # bytes per GPU
    grads: float
    optimizer: float
    grad_accum: float = 0.0  # the fp32 gradient accumulation buffer (vltrain.dsconfig), beside the bf16 grads

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.grad_accum


def model_state_bytes(
    params: int, zero_stage: int, data_parallel: int, tp: int = 1, pp: int = 1, fp32_grad_accum: bool = True
) -> ModelStates:
    """Bytes of bf16 params, bf16 grads and fp32 AdamW states per GPU (ZeRO paper, see module doc),
    and the fp32 buffer the trainer's gradients accumulate in (vltrain.dsconfig: DeepSpeed's
    `grad_accum_dtype` fp32): the gradient partition at stages 2-3, a whole fp32 copy at stage 1
    (DeepSpeed keeps it per parameter there); stage 0 has none (DeepSpeed accumulates in bf16)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(zero_stage)
    local = params / (tp * pp)
    nd = data_parallel
    p = 2 * local / (nd if zero_stage >= 3 else 1)
    g = 2 * local / (nd if zero_stage >= 2 else 1)
    o = OPTIMIZER_BYTES_PER_PARAM * local / (nd if zero_stage >= 1 else 1)
    acc = 4 * local / (nd if zero_stage >= 2 else 1) if fp32_grad_accum and zero_stage >= 1 else 0.0
    return ModelStates(p, g, o, acc)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU memory in GiB, the JSON shape `clusterctl plan --json` prints under "memory"."""

    params_gib: float
    grads_gib: float
    grad_accum_gib: float
    optimizer_gib: float
    activations_gib: float
    activations_per_sample_gib: float
    buffers_gib: float
    fragmentation_gib: float
    total_gib: float
    capacity_gib: float
    fits: bool
    comm_buffers_gib: float = 0.0  # DeepSpeed's fp32 reduction buffers (included in total_gib)

    @property
    def share(self) -> float:
        """total / capacity."""
        return self.total_gib / self.capacity_gib if self.capacity_gib else float("inf")

    @property
    def near_capacity(self) -> bool:
        return self.share >= NEAR_CAPACITY

    def to_dict(self) -> dict[str, float | bool]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def comm_buffer_bytes(zero_stage: int, params_per_replica: float, ds) -> float:
    """DeepSpeed's fp32 reduction buffers per GPU beyond the 16-bit bucket `fixed_overhead_bytes` counts
    (module doc); `ds` is a comm.DeepSpeedComm. 0 when gradients travel in the weights' dtype."""
    bucket = ds.reduce_bucket_elements
    if ds.param_bytes >= ds.grad_bytes or zero_stage not in (1, 2):
        return 0.0
    if zero_stage == 2:
        return bucket * (ds.param_bytes + ds.grad_bytes)
    if ds.bf16_fp32_accumulation:  # BF16_Optimizer
        return min(FALLBACK_BUFFER_ELEMENTS, params_per_replica) * ds.grad_bytes
    return bucket * (ds.grad_bytes - ds.param_bytes) + (bucket * ds.grad_bytes if ds.overlap_comm else 0.0)


def fixed_overhead_bytes(zero_stage: int, params: int | None = None) -> float:
    """CUDA context and NCCL buffers, and DeepSpeed's reduce and all-gather buckets (bf16, the size
    vltrain.dsconfig gives them for this model) at stages 1-2."""
    buckets = 2 * bucket_elements(params) * 2 if zero_stage in (1, 2) else 0.0
    return CONTEXT_GIB * GIB + buckets


def breakdown(
    params: int,
    activation_bytes_per_sample: float,
    micro_batch: int,
    *,
    zero_stage: int,
    data_parallel: int,
    capacity_gib: float,
    tp: int = 1,
    pp: int = 1,
    comm_buffers: float = 0.0,
) -> MemoryBreakdown:
    """Memory of one GPU for `micro_batch` samples per micro step; `fits` compares with capacity.
    `comm_buffers`: bytes of fp32 reduction buffers (`comm_buffer_bytes`)."""
    st = model_state_bytes(params, zero_stage, data_parallel, tp, pp)
    act = activation_bytes_per_sample / tp
    acts = act * micro_batch
    buffers = fixed_overhead_bytes(zero_stage, params)
    frag = FRAGMENTATION * (st.total + acts)
    total = st.total + acts + buffers + comm_buffers + frag
    return MemoryBreakdown(
        params_gib=st.params / GIB,
        grads_gib=st.grads / GIB,
        grad_accum_gib=st.grad_accum / GIB,
        optimizer_gib=st.optimizer / GIB,
        activations_gib=acts / GIB,
        activations_per_sample_gib=act / GIB,
        buffers_gib=buffers / GIB,
        fragmentation_gib=frag / GIB,
        total_gib=total / GIB,
        capacity_gib=float(capacity_gib),
        fits=total <= capacity_gib * GIB,
        comm_buffers_gib=comm_buffers / GIB,
    )


def max_micro_batch(
    params: int,
    activation_bytes_per_sample: float,
    *,
    zero_stage: int,
    data_parallel: int,
    capacity_gib: float,
    tp: int = 1,
    pp: int = 1,
    comm_buffers: float = 0.0,
) -> int:
    """Largest micro batch whose breakdown fits (0 when not even the model states fit)."""
    st = model_state_bytes(params, zero_stage, data_parallel, tp, pp)
    states = st.total
    room = capacity_gib * GIB - fixed_overhead_bytes(zero_stage, params) - comm_buffers - (1 + FRAGMENTATION) * states
    per = (1 + FRAGMENTATION) * activation_bytes_per_sample / tp
    if room <= 0:
        return 0
    m = math.floor(room / per) if per > 0 else 10**9
    # guard against floating-point edge: step down until the breakdown agrees
    while (
        m > 0
        and not breakdown(
            params,
            activation_bytes_per_sample,
            m,
            zero_stage=zero_stage,
            data_parallel=data_parallel,
            capacity_gib=capacity_gib,
            tp=tp,
            pp=pp,
            comm_buffers=comm_buffers,
        ).fits
    ):
        m -= 1
    return m
