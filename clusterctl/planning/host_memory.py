"""Host memory per node: what a node's ranks, their loader workers and the checkpoint files put in RAM (pure).

Split from clusterctl.planning.memory (the GPU side) so each side is one concept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from clusterctl.planning.memory import CONTEXT_GIB, GIB, OPTIMIZER_BYTES_PER_PARAM
from vltrain.data.index_math import index_host_bytes

# --- host memory per node ----------------------------------------------------------------------------
# Why: each rank used to build the whole fp32 model on the CPU (8 x 4 bytes x 30.5B = 976 GB per node
# for seed 002, more than its 1000 GiB once DeepSpeed's buffers count). The trainer builds the model on
# its device (vltrain.engines.common.build_model), and splits the optimizer's parameter groups so that
# DeepSpeed flattens them there (vltrain.engines.deepspeed.FLAT_GROUP_BYTES). Two figures per node:
# start-up (the engine's construction, before the loader starts and before a resume loads anything) and
# the steady state (training, the loader's workers and index, a checkpoint loaded on resume).
BUILDS_ON_DEVICE = True  # vltrain.engines.common.build_model: weights created on the GPU, never whole on the host
FLAT_GROUP_BYTES = 1 << 30  # vltrain.engines.deepspeed.FLAT_GROUP_BYTES (which imports torch; a test keeps them equal)
MASTER_BYTES_PER_PARAM = 4  # ZeRO's fp32 master weights
# Per GPU rank: the Python interpreter with torch, DeepSpeed and NCCL loaded, the host side of the CUDA
# context and the CUDA libraries' host allocations (cuBLAS, cuDNN), pinned staging for batches: a torch
# CUDA process sits at 3-5 GiB resident before it allocates anything of its own; 4 GiB is the middle.
PROCESS_HOST_GIB = 4.0
CPU_PROCESS_HOST_GIB = 1.0  # a rank training on the CPU loads no CUDA libraries; its model is counted apart
# Per data-loader worker: a forked Python process that touches torch's and PIL's pages (copy-on-write
# does not keep them shared once reference counts change), its shuffle buffer of encoded samples
# (1000 x ~100 kB) and prefetched decoded batches: about 1 GiB. The shard index is apart (index_host_bytes).
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


def zero_startup_host_bytes(params: float, param_bytes: int, device_room: float, zero_stage: int) -> float:
    """Host bytes a CUDA rank stages while DeepSpeed ZeRO 1-2 flattens its parameter groups, one group at
    a time (stage_1_and_2.DeepSpeedZeroOptimizer.__init__): none where the GPU's free memory
    (`device_room`) holds a group's flat copy; otherwise the group's weights copied to the CPU and the flat
    buffer built there, 2 x the group. Groups are at most FLAT_GROUP_BYTES (smaller models: one group of
    all). ZeRO-0 has no flattening optimizer; bf16 at stage 1 (DeepSpeed's BF16_Optimizer) always
    flattens on the GPU, counted here as stage 1's ZeRO path (an upper bound)."""
    if zero_stage not in (1, 2):
        return 0.0
    group = min(float(FLAT_GROUP_BYTES), params * param_bytes)
    return 0.0 if device_room >= group else 2 * group


def startup_device_room(params: float, param_bytes: int, data_parallel: int, zero_stage: int, gpu_gib: float) -> float:
    """A GPU's free bytes while DeepSpeed flattens (an upper bound on what is in use): what PyTorch can
    allocate less the CUDA context, the 16-bit weights and the fp32 master partitions (ZeRO >= 1)."""
    master = MASTER_BYTES_PER_PARAM * params / (data_parallel if zero_stage >= 1 else 1)
    return gpu_gib * GIB - CONTEXT_GIB * GIB - param_bytes * params - master


def cpu_startup_bytes(params: float, param_bytes: int, data_parallel: int, zero_stage: int) -> float:
    """Peak host bytes of a CPU rank's DeepSpeed start-up (the model lives on the host), the largest of
    three moments: the model built in fp32 (4 bytes a parameter), the flat copy beside the weights
    (2 x param_bytes), then the flat weights, their fp32 master partition and the fp32 gradient
    partition ZeRO fills with zeros once (initialize_optimizer_states). In 16 bits DeepSpeed casts the
    fp32 build, and the cast's tensors come from glibc's heap (freeing the fp32 ones raised its mmap
    threshold past them), which keeps their pages once the flattening frees them: param_bytes more.
    Checked against the peak RSS of a 177M-parameter start-up (tests/test_host_memory.py)."""
    master = MASTER_BYTES_PER_PARAM * params / (data_parallel if zero_stage >= 1 else 1)
    kept = param_bytes * params if param_bytes < 4 else 0.0
    return max(4.0 * params, 2.0 * param_bytes * params, param_bytes * params + kept + 2 * master)


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

    per_node_gib: float  # steady: training, the loader, a resume's checkpoint
    capacity_gib: float
    fits: bool  # both the steady figure and the start-up fit
    ranks_per_node: int
    per_rank_gib: float  # what each rank holds on its own (steady)
    shared_gib: float  # once per node: the model-states file, mapped by every rank on resume
    startup_per_node_gib: float  # the engines' construction, before the loader and any resume
    startup_per_rank_gib: float
    startup_shared_gib: float  # once (node 0): FSDP's rank 0 builds the whole model in fp32 on the CPU
    startup_fits: bool
    deepspeed_staged_gib: float  # per rank at start-up: parameter groups ZeRO flattens through the host
    flattens_on_device: bool  # the GPU holds a parameter group's flat copy at start-up (nothing staged)
    startup_model_gib: float  # per rank at start-up, CPU training only: the model's start-up peak
    resume_gib: float  # per rank, its optimizer shard loaded on resume
    model_on_host_gib: float  # per rank, CPU training only: the model states and activations themselves
    process_gib: float  # per rank
    loader_workers: int  # per rank
    workers_gib: float  # per rank
    loader_index_gib: float  # per rank: its shards' index, shared by its workers (counted once)
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
    gpu_gib: float = 0.0,
    dataset_samples: int = 0,
    deepspeed: bool = True,
    rank0_build_params: float = 0.0,
) -> HostMemory:
    """Per node, steady: ranks x (process + workers + the shard index + the rank's optimizer shard a
    resume loads), plus the model-states file once (`checkpoint_host_bytes`; one per model-parallel rank
    on the node under tp x pp). At start-up: ranks x (process + what building the engine puts on the
    host): under DeepSpeed on CUDA the parameter groups ZeRO flattens through the host when the GPU
    (`gpu_gib` per GPU) lacks room (`zero_startup_host_bytes`), on a CPU profile the model's start-up
    peak (`cpu_startup_bytes`; FSDP's: its steady model); plus, once on node 0, `rank0_build_params` in
    fp32 (FSDP's new run: rank 0 builds the whole seeded model on the CPU and broadcasts it,
    vltrain.engines.fsdp). On a CPU profile the model lives in host memory: `model_on_host_bytes` per
    rank (the GPU breakdown less its CUDA allowances).
    `largest_layer` is kept for the callers (the on-device build holds at most one layer twice)."""
    local = params / (tp * pp)
    room = startup_device_room(local, param_bytes, data_parallel, zero_stage, gpu_gib)
    staged = zero_startup_host_bytes(local, param_bytes, room, zero_stage) if cuda and deepspeed else 0.0
    startup_model = 0.0 if cuda else model_on_host_bytes  # FSDP on CPU: its steady model
    if not cuda and deepspeed:
        startup_model = cpu_startup_bytes(local, param_bytes, data_parallel, zero_stage)
    model_file, shard = checkpoint_host_bytes(local, zero_stage, data_parallel, param_bytes)
    shared = model_file * min(tp * pp, gpus_per_node)
    process = (PROCESS_HOST_GIB if cuda else CPU_PROCESS_HOST_GIB) * GIB
    workers_b = workers * WORKER_HOST_GIB * GIB
    index = index_host_bytes(dataset_samples, data_parallel)
    per_rank = process + workers_b + index + model_on_host_bytes + shard
    per_node = per_rank * gpus_per_node + shared
    startup_rank = process + staged + startup_model
    startup_shared = 4.0 * rank0_build_params
    startup_node = startup_rank * gpus_per_node + startup_shared
    cap = capacity_gib * GIB
    return HostMemory(
        per_node_gib=per_node / GIB,
        capacity_gib=float(capacity_gib),
        fits=per_node <= cap and startup_node <= cap,
        ranks_per_node=gpus_per_node,
        per_rank_gib=per_rank / GIB,
        shared_gib=shared / GIB,
        startup_per_node_gib=startup_node / GIB,
        startup_per_rank_gib=startup_rank / GIB,
        startup_shared_gib=startup_shared / GIB,
        startup_fits=startup_node <= cap,
        deepspeed_staged_gib=staged / GIB,
        flattens_on_device=cuda and staged == 0,
        startup_model_gib=startup_model / GIB,
        resume_gib=shard / GIB,
        model_on_host_gib=model_on_host_bytes / GIB,
        process_gib=process / GIB,
        loader_workers=workers,
        workers_gib=workers_b / GIB,
        loader_index_gib=index / GIB,
        built_on_device=on_device,
    )
