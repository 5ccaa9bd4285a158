"""Per-GPU memory of a training step under ZeRO stages 0-3, bf16 mixed precision and AdamW, and host
memory per node (`host_memory`, at the end of this module) (pure).

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
  * allocator fragmentation: 10% of everything else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vltrain.dsconfig import bucket_elements  # reduce_bucket_size and allgather_bucket_size

GIB = 1024**3
CONTEXT_GIB = 1.5
FRAGMENTATION = 0.10
OPTIMIZER_BYTES_PER_PARAM = 12  # fp32 master + momentum + variance (AdamW)


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

    def to_dict(self) -> dict[str, float | bool]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


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
) -> MemoryBreakdown:
    """Memory of one GPU for `micro_batch` samples per micro step; `fits` compares with capacity."""
    st = model_state_bytes(params, zero_stage, data_parallel, tp, pp)
    act = activation_bytes_per_sample / tp
    acts = act * micro_batch
    buffers = fixed_overhead_bytes(zero_stage, params)
    frag = FRAGMENTATION * (st.total + acts)
    total = st.total + acts + buffers + frag
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
) -> int:
    """Largest micro batch whose breakdown fits (0 when not even the model states fit)."""
    st = model_state_bytes(params, zero_stage, data_parallel, tp, pp)
    states = st.total
    room = capacity_gib * GIB - fixed_overhead_bytes(zero_stage, params) - (1 + FRAGMENTATION) * states
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
        ).fits
    ):
        m -= 1
    return m


# --- host memory per node ----------------------------------------------------------------------------
# Why: each rank used to build the whole fp32 model on the CPU (8 x 4 bytes x 30.5B = 976 GB per node
# for seed 002, more than its 1000 GiB once DeepSpeed's buffers count). The trainer now builds the model
# on its device (vltrain.engines.common.build_model), so a node's host memory holds what DeepSpeed stages there,
# the checkpoint files a save or a resume puts there, and each rank's process and data-loader workers.
DS_BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' additional_buffer_factor (their default)
BUILDS_ON_DEVICE = True  # vltrain.engines.common.build_model: weights created on the GPU, never whole on the host
# Per GPU rank: the Python interpreter with torch, DeepSpeed and NCCL loaded, the host side of the CUDA
# context and the CUDA libraries' host allocations (cuBLAS, cuDNN), pinned staging for batches: a torch
# CUDA process sits at 3-5 GiB resident before it allocates anything of its own; 4 GiB is the middle.
PROCESS_HOST_GIB = 4.0
CPU_PROCESS_HOST_GIB = 1.0  # a rank training on the CPU loads no CUDA libraries; its model is counted apart
# Per data-loader worker: a forked Python process that touches torch's and PIL's pages (copy-on-write
# does not keep them shared once reference counts change), its shuffle buffer of encoded samples
# (1000 x ~100 kB) and prefetched decoded batches: about 1 GiB.
WORKER_HOST_GIB = 1.0
MAX_LOADER_WORKERS = 8  # vltrain.data.loader.loader_settings: at most 8 per rank, one CPU left for the rank


def loader_workers(configured: int, cuda: bool, cpus_per_node: int, gpus_per_node: int) -> int:
    """Data-loader workers per rank as the trainer sizes them (vltrain.data.loader.loader_settings, which the
    planner cannot import: it imports torch): the config's value when >= 0; on a GPU the Slurm task's
    CPUs (cpus_per_node / gpus_per_node, as the backend asks for them) less one, at most 8; none on CPU."""
    if configured >= 0:
        return configured
    if not cuda:
        return 0
    per_task = max(1, cpus_per_node // gpus_per_node)
    return min(MAX_LOADER_WORKERS, max(1, per_task - 1))


def deepspeed_host_bytes(params: float, largest_layer: float, gpus_per_node: int, on_device: bool = True) -> float:
    """Host memory per node for the model states as DeepSpeed's estimators count it with nothing offloaded
    (cpu_offload=False in stage_1_and_2.estimate_zero2_model_states_mem_needs and
    stage3.estimate_zero3_model_states_mem_needs): each rank stages fp32 weights (4 bytes) on the host,
    times additional_buffer_factor 1.5. Built whole on the CPU (ZeRO 0-2, or ZeRO-3 without zero.Init)
    that is every parameter; built in place (ZeRO-3's zero.Init, and so the trainer's on-device build at
    any stage, which never holds more than one module's weights at once) only the largest layer."""
    staged = largest_layer if on_device else params
    return staged * 4 * gpus_per_node * DS_BUFFER_FACTOR


def checkpoint_host_bytes(
    params: float, zero_stage: int, data_parallel: int, param_bytes: int = 2
) -> tuple[float, float]:
    """(the model-states file, this rank's optimizer shard): what a checkpoint puts in host memory.

    Resume: DeepSpeed loads checkpoints onto the CPU (state_dict_factory: map_location=lambda storage,
    loc: storage; engine._get_all_zero_checkpoint_state_dicts: map_location='cpu'). Under ZeRO 0-2
    every rank reads the model-states file (the 16-bit weights; under ZeRO-0 also the fp32 master and
    Adam states, which live in it); the trainer maps it (vltrain.engines.deepspeed.mmap_loads), so a node's
    ranks share one copy in the page cache, which a cgroup still charges to the job. Then each rank
    reads its own optimizer shard (fp32 master + Adam m, v: 12 bytes per parameter / data-parallel
    ranks). Save: torch.save copies one storage at a time to the host, the largest being rank 0's
    flat 16-bit weights, the same size as the model-states file: one copy per node again."""
    model_file = param_bytes * params + (OPTIMIZER_BYTES_PER_PARAM * params if zero_stage == 0 else 0)
    shard = OPTIMIZER_BYTES_PER_PARAM * params / data_parallel if zero_stage >= 1 else 0.0
    return (model_file if zero_stage < 3 else 0.0), shard


@dataclass(frozen=True)
class HostMemory:
    """Host memory of one node, the JSON shape `clusterctl plan --json` prints under "host_memory"."""

    per_node_gib: float
    capacity_gib: float
    fits: bool
    ranks_per_node: int
    per_rank_gib: float  # what each rank holds on its own
    shared_gib: float  # once per node: the model-states file, mapped by every rank on resume
    deepspeed_staged_gib: float  # per rank, DeepSpeed's estimate (building the model)
    resume_gib: float  # per rank, its optimizer shard loaded on resume
    model_on_host_gib: float  # per rank, CPU training only: the model states and activations themselves
    process_gib: float  # per rank
    loader_workers: int  # per rank
    workers_gib: float  # per rank
    built_on_device: bool

    def to_dict(self) -> dict[str, float | int | bool]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def host_memory(
    params: int,
    largest_layer: int,
    *,
    zero_stage: int,
    data_parallel: int,
    gpus_per_node: int,
    capacity_gib: float,
    workers: int,
    cuda: bool = True,
    model_on_host_bytes: float = 0.0,
    tp: int = 1,
    pp: int = 1,
    param_bytes: int = 2,
    on_device: bool = BUILDS_ON_DEVICE,
) -> HostMemory:
    """Per node: ranks x (process + workers + the larger of what DeepSpeed stages building the model and
    the rank's optimizer shard a resume loads; they come one after the other), plus the model-states
    file once (`checkpoint_host_bytes`; one per model-parallel rank on the node under tp x pp). On a
    CPU profile the model itself lives in host memory: `model_on_host_bytes` per rank (the GPU
    breakdown less its CUDA allowances)."""
    local, layer = params / (tp * pp), largest_layer / tp
    staged = deepspeed_host_bytes(local, layer, 1, on_device) if cuda else 0.0
    model_file, shard = checkpoint_host_bytes(local, zero_stage, data_parallel, param_bytes)
    shared = model_file * min(tp * pp, gpus_per_node)
    process = (PROCESS_HOST_GIB if cuda else CPU_PROCESS_HOST_GIB) * GIB
    workers_b = workers * WORKER_HOST_GIB * GIB
    per_rank = process + workers_b + model_on_host_bytes + max(staged, shard)
    per_node = per_rank * gpus_per_node + shared
    return HostMemory(
        per_node_gib=per_node / GIB,
        capacity_gib=float(capacity_gib),
        fits=per_node <= capacity_gib * GIB,
        ranks_per_node=gpus_per_node,
        per_rank_gib=per_rank / GIB,
        shared_gib=shared / GIB,
        deepspeed_staged_gib=staged / GIB,
        resume_gib=shard / GIB,
        model_on_host_gib=model_on_host_bytes / GIB,
        process_gib=process / GIB,
        loader_workers=workers,
        workers_gib=workers_b / GIB,
        built_on_device=on_device,
    )
