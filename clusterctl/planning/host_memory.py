"""Host memory per node: what a node's ranks, their loader workers and the checkpoint files put in RAM (pure).

Split from clusterctl.planning.memory (the GPU side) so each side is one concept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from clusterctl.planning.memory import GIB, OPTIMIZER_BYTES_PER_PARAM

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
