"""Per-GPU memory and step time under parallel.strategy "fsdp": FSDP2 over the data-parallel ranks,
composed with tensor and pipeline parallelism (pure).

What each GPU holds (its pipeline rank's share, one tp rank of it: clusterctl.planning.stages):
  * sharded over dp (FSDP2 `fully_shard`, MixedPrecisionPolicy(param_dtype=bf16|fp16, reduce_dtype=fp32)):
    the fp32 parameters, which are the master weights (4 bytes), AdamW's m and v (8), the fp32 gradients (4);
    under parallel.sharding "hybrid" (HSDP: shard within a node, replicate across nodes) over the
    dp ranks of one node only (`shard_group`: gpus_per_node / (tp x pp), at most dp);
  * gathered 16-bit parameters (2 bytes; 4 in fp32): zero_stage 2 (reshard_after_forward=False) keeps the
    whole share gathered from forward to backward; zero_stage 3 (True) only the unit being computed and
    the one prefetched, two of the largest; with pp > 1 the whole share, since torch's PipelineStage
    turns resharding after backward off until the last microbatch (stage.backward_maybe_with_nosync);
  * unsharded gradients before the reduce-scatter: the whole share in fp32 whenever gradient sync is
    off for some microbatches, since FSDP2 then
    accumulates the unsharded gradients in reduce_dtype (FSDPParam.to_accumulated_grad_if_needed): with
    pp > 1 (the same function turns sync off until the last microbatch), and under zero_stage 2 with
    accumulation > 1 (vltrain.engines.fsdp: set_requires_gradient_sync(False) before the last micro
    step); otherwise (zero_stage 3, which reduces every micro step, or one micro step) one unit's
    (16-bit, then fp32);
  * activations: the share's per sample x micro batch x microbatches in flight (stages.in_flight);
  * CUDA context and NCCL buffers (memory.CONTEXT_GIB); no DeepSpeed buckets; 10% fragmentation.
The most loaded pipeline rank is planned.

Objectives weighted 0 do not run (vltrain.model: no text pass for ITC or MLM when both are 0, no fusion
without MLM, no caption decoder without captioning), so without a pipeline their blocks are FSDP units
that are never gathered, get no gradient and are never reduced (FSDP2 runs a unit's hooks only when its
forward runs): the gathered weights, the unsharded and sharded gradients, the activations and the data-
parallel traffic count the units that run (`run_share`); the optimizer states count them all (a later
stage trains them). `ParallelLayout.stage_idle` lists the block kinds idle in each curriculum stage:
the memory is the worst stage's, the traffic the first stage's (as the plan's FLOPs). Pipeline stages
run every block (vltrain.parallel.pipeline), so with pp > 1 nothing is idle.

Step time, added to the compute at DEFAULT_MFU:
  * data parallel (FSDP2): without a pipeline each microbatch all-gathers the share (twice at zero_stage 3:
    forward and backward); the gradients' fp32 reduce-scatter runs every microbatch at zero_stage 3 and
    once, in the last microbatch's backward, at zero_stage 2; prefetched / overlapped with compute
    (comm.OVERLAP_FRACTION, the last unit's reduce-scatter exposed); with a pipeline one reduce-scatter
    after the last microbatch (exposed) and the gathers once per step (per microbatch at zero_stage 3).
    The dp ring runs over the NICs the node's other dp groups leave it: tp x pp groups share them.
    Hybrid sharding: gathers and reduce-scatters within the node's shard group (NVLink), then an
    all-reduce of each rank's fp32 gradient shard across the replicas (one ring per GPU, each over
    1/gpus_per_node of the node's NICs), at the reduce-scatter's times.
  * tensor parallel: DTensor all-reduces activations [micro, s, w] in 16 bits over NVLink: forward one
    per row-parallel Linear (out, fc2: 2 per block, 3 with cross-attention), backward one per
    column-parallel Linear (q, k, v, fc1 each convert their replicated input's gradient: 4, 7 with
    cross-attention), the forward ones again under activation recomputation; not overlapped.
  * pipeline: the bubble, (pp - 1) / (virtual stages x microbatches) of the most loaded stage's compute;
    what imbalance is left between the stages split by cost (the slowest sets the pace); point-to-point sends of
    activations forward and gradients back per microbatch per boundary (stages.boundary_elements), over
    one NIC per GPU when the stages sit on different nodes; not overlapped (an upper bound).
Not modelled: per-collective latency, the ITC all-gather, 1F1B's send/compute overlap, sequence parallel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from clusterctl.planning import comm
from clusterctl.planning.memory import CONTEXT_GIB, FRAGMENTATION, GIB, MemoryBreakdown
from clusterctl.planning.stages import RankShare, blocks, boundary_elements, in_flight, rank_shares
from vltrain.model_config import ModelConfig
from vltrain.parallel.layout import VIRTUAL_STAGES

MASTER_BYTES = 4 + 8  # fp32 sharded parameters (the master weights) + AdamW m, v
SHARDED_GRAD_BYTES = 4  # FSDP2's sharded gradients, in the fp32 parameters' dtype
REDUCE_BYTES = 4  # reduce_dtype fp32


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel layout a plan sizes."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    schedule: str = "1f1b"
    param_bytes: int = 2  # 16-bit compute weights (bf16/fp16); 4 in fp32
    checkpointing: bool = False
    sharding: str = "full"  # parallel.sharding: "hybrid" shards over one node's dp ranks only
    gpus_per_node: int = 8
    stage_idle: tuple[frozenset[str], ...] = (frozenset(),)  # block kinds that do not run, per curriculum stage

    @property
    def shard_group(self) -> int:
        """Ranks one FSDP shard spans: every dp rank, or (hybrid) those of one node, gpus_per_node / (tp x pp)."""
        if self.sharding != "hybrid":
            return self.dp
        return max(1, min(self.dp, self.gpus_per_node // (self.tp * self.pp)))

    @property
    def sync_every_micro(self) -> bool:
        """Whether every micro step reduces its gradients (vltrain.engines.fsdp: zero_stage 3 without a
        pipeline, or a single micro step); else the unsharded fp32 gradients are kept until the last."""
        return self.pp == 1 and self.zero_stage == 3


def idle_kinds(objectives: tuple[str, ...] | list[str]) -> frozenset[str]:
    """The block kinds a step with these objectives (weight > 0) does not run (module doc)."""
    o = set(objectives)
    idle = {"decoder"} if "caption" not in o else set()
    if "mlm" not in o:
        idle.add("fusion")
    if not o & {"itc", "mlm"}:
        idle.add("text")
    return frozenset(idle)


def run_share(model: ModelConfig, share: RankShare, lay: ParallelLayout, idle: frozenset[str]) -> tuple[float, float]:
    """(parameters, activation bytes per sample) of `share` that a step runs: less the idle blocks'
    (and the text encoder's second pass when only one of ITC and MLM runs); the whole share with pp > 1."""
    if lay.pp > 1 or not idle:
        return share.params, share.act_per_sample
    bl = blocks(model)
    own = [bl[i] for i in share.blocks]
    params = share.params - sum(b.params(lay.tp) for b in own if b.kind in idle)
    text_runs = 2 - len({"fusion", "text"} & idle)  # MLM's masked pass goes with the fusion blocks
    layers = [b for b in own if b.kind not in idle for _ in range(text_runs if b.kind == "text" else b.runs)]
    full = [b for b in own for _ in range(b.runs)]

    def act(ls: list) -> float:  # as stages.rank_shares counts them, at 2 bytes per element
        work = [b.act_replicated + b.act_sharded / lay.tp for b in ls]
        if lay.checkpointing:
            return sum(b.act_input for b in ls) * 2 + max(work, default=0.0)
        return sum(work)

    return params, share.act_per_sample - (act(full) - act(layers)) * lay.param_bytes / 2


def rank_memory(
    share: RankShare,
    lay: ParallelLayout,
    micro_batch: int,
    microbatches: int,
    capacity_gib: float,
    run: tuple[float, float] | None = None,
):
    """The memory breakdown of one GPU of pipeline rank `share.rank`; `run`: the (parameters, activation
    bytes per sample) that run (`run_share`), by default all of the share."""
    L, pb, unit, shards = share.params, lay.param_bytes, share.largest_unit, lay.shard_group
    R, act_per_sample = run or (L, share.act_per_sample)
    whole = lay.pp > 1 or lay.zero_stage == 2
    gathered = pb * (R if whole else min(R, 2 * unit))
    kept = not lay.sync_every_micro and microbatches > 1  # sync off before the last micro step
    unsharded_grads = REDUCE_BYTES * R if kept or lay.pp > 1 else (pb + REDUCE_BYTES) * min(R, unit)
    grads = SHARDED_GRAD_BYTES * R / shards
    optimizer = MASTER_BYTES * L / shards
    acts = act_per_sample * micro_batch * in_flight(share.rank, lay.pp, microbatches, lay.schedule)
    states = gathered + unsharded_grads + grads + optimizer
    buffers = CONTEXT_GIB * GIB
    frag = FRAGMENTATION * (states + acts)
    total = states + acts + buffers + frag
    return MemoryBreakdown(
        params_gib=gathered / GIB,
        grads_gib=grads / GIB,
        grad_accum_gib=unsharded_grads / GIB,
        optimizer_gib=optimizer / GIB,
        activations_gib=acts / GIB,
        activations_per_sample_gib=act_per_sample / GIB,
        buffers_gib=buffers / GIB,
        fragmentation_gib=frag / GIB,
        total_gib=total / GIB,
        capacity_gib=float(capacity_gib),
        fits=total <= capacity_gib * GIB,
    )


def memory(
    model: ModelConfig, lay: ParallelLayout, micro_batch: int, microbatches: int, capacity_gib: float
) -> tuple[MemoryBreakdown, int]:
    """(the breakdown of the most loaded GPU in the most demanding curriculum stage, its pipeline rank)."""
    shares = rank_shares(model, lay.tp, lay.pp, lay.schedule, lay.checkpointing)
    per = [
        (rank_memory(s, lay, micro_batch, microbatches, capacity_gib, run_share(model, s, lay, idle)), s.rank)
        for idle in lay.stage_idle
        for s in shares
    ]
    return max(per, key=lambda x: x[0].total_gib)


@dataclass(frozen=True)
class ParallelTime:
    """Seconds per optimizer step that tensor and pipeline parallelism add to compute."""

    tensor_parallel_s: float
    pipeline_send_s: float
    bubble_s: float
    imbalance_s: float
    bubble_fraction: float  # (pp - 1) / (virtual x microbatches + pp - 1): idle share of the pipeline
    stage_flops_share: tuple[float, ...]  # each pipeline rank's share of the forward FLOPs
    most_loaded_rank: int = 0  # in memory

    @property
    def total_s(self) -> float:
        return self.tensor_parallel_s + self.pipeline_send_s + self.bubble_s + self.imbalance_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self) | {"total_s": self.total_s}
        d["stage_flops_share"] = [round(x, 4) for x in self.stage_flops_share]
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def dp_bus_gb_s(fab: comm.Fabric, lay: ParallelLayout) -> float:
    """The bus bandwidth of one FSDP ring (every dp rank, or a hybrid shard group): within a node NVLink;
    across nodes the node's NICs shared by the tp x pp groups on it that run their own rings at the same time."""
    g = fab.gpus_per_node
    span = lay.shard_group * lay.tp  # consecutive ranks one FSDP group covers (tp innermost, pp outermost)
    if fab.nodes == 1 or span <= g:
        return comm.NCCL_EFFICIENCY * fab.intra_node_gb_s
    groups_per_node = min(g, lay.tp)  # dp groups side by side on a node: one per tp rank
    return comm.NCCL_EFFICIENCY * min(fab.intra_node_gb_s, fab.inter_node_gb_s / groups_per_node)


def step_comm(
    share: RankShare,
    lay: ParallelLayout,
    accumulation: int,
    compute_s: float,
    fab: comm.Fabric,
    backward_share: float,
    run_params: float | None = None,
) -> comm.StepComm:
    """FSDP2's data-parallel collectives of one optimizer step for the GPU of `share` (module doc): of its
    `run_params` that run (`run_share`), by default all of it."""
    L, n = (share.params if run_params is None else run_params), lay.shard_group
    w, g = L * lay.param_bytes, L * REDUCE_BYTES
    if lay.pp == 1:
        gathers = [comm.Collective("FSDP all-gather of the weights in forward", "all_gather", w, True, 1.0)]
        if lay.zero_stage == 3:
            gathers.append(comm.Collective("FSDP all-gather of the weights in backward", "all_gather", w, True, 1.0))
        every = lay.sync_every_micro or accumulation == 1  # else once, in the last micro step's backward
        reduce = comm.Collective("FSDP gradient reduce-scatter (fp32)", "reduce_scatter", g, every, backward_share)
    else:
        per_micro = lay.zero_stage == 3
        gathers = [
            comm.Collective("FSDP all-gather of the weights", "all_gather", w, per_micro, 1.0 if per_micro else 0.0)
        ]
        if per_micro:
            gathers.append(comm.Collective("FSDP all-gather of the weights in backward", "all_gather", w, True, 1.0))
        reduce = comm.Collective(
            "FSDP gradient reduce-scatter after the last microbatch", "reduce_scatter", g, False, 0.0
        )
    bus = dp_bus_gb_s(fab, lay) * comm.GB
    planned = [(c, n, bus) for c in (*gathers, reduce)]
    if (replicas := lay.dp // n) > 1:  # hybrid: the shards' all-reduce across the nodes' replicas
        across = comm.NCCL_EFFICIENCY * min(fab.intra_node_gb_s, fab.inter_node_gb_s / fab.gpus_per_node) * comm.GB
        shard = comm.Collective(
            "HSDP all-reduce of the gradient shards across nodes (fp32)",
            "all_reduce",
            g / n,
            reduce.every_micro_step,
            reduce.window,
        )
        planned.append((shard, replicas, across))
    calls = [
        comm.Collective(
            c.what, c.op, c.tensor_bytes, c.every_micro_step, c.window, comm.ring_factor(c.op, k) * c.tensor_bytes / b
        )
        for c, k, b in planned
    ]
    times = {True: accumulation, False: 1}
    total = sum(c.seconds * times[c.every_micro_step] for c in calls)
    volume = sum(comm.ring_factor(c.op, k) * c.tensor_bytes * times[c.every_micro_step] for c, k, _ in planned)
    micro_s = compute_s / accumulation
    tail = share.largest_unit / L if L else 0.0  # the last unit's reduce-scatter runs after backward ends
    exposed = sum(c.seconds * times[c.every_micro_step] for c in calls if c.window == 0)
    for every in (True, False):  # each group shares one micro step's compute
        group = [c for c in calls if c.window > 0 and c.every_micro_step is every]
        if group:
            tail_s = sum(c.seconds * tail for c in group if c.op != "all_gather")
            window = max(c.window for c in group) * micro_s
            exposed += comm.exposed_seconds(group, window, tail_s) * times[every]
    return comm.StepComm(lay.dp, accumulation, bus / comm.GB, volume, total, exposed, True, tuple(calls))


def parallel_time(
    model: ModelConfig, lay: ParallelLayout, micro_batch: int, accumulation: int, compute_s: float, fab: comm.Fabric
) -> ParallelTime:
    """Tensor-parallel all-reduces, pipeline sends, bubble and stage imbalance of one step (module doc)."""

    shares = rank_shares(model, lay.tp, lay.pp, lay.schedule, lay.checkpointing)
    total_flops = sum(s.flops_per_sample for s in shares)
    flops_share = tuple(s.flops_per_sample / total_flops for s in shares)
    slowest = max(range(lay.pp), key=lambda r: flops_share[r])
    stage_s = compute_s * flops_share[slowest] * lay.pp  # the slowest stage's compute for the step
    imbalance = stage_s - compute_s
    virtual = VIRTUAL_STAGES[lay.schedule] if lay.pp > 1 else 1
    bubble = stage_s * (lay.pp - 1) / (virtual * accumulation)
    fraction = (lay.pp - 1) / (virtual * accumulation + lay.pp - 1)
    # tensor parallel: all-reduces of the slowest stage's blocks, per microbatch
    tp_s = 0.0
    if lay.tp > 1:
        bl = blocks(model)
        nvlink = comm.NCCL_EFFICIENCY * fab.intra_node_gb_s * comm.GB
        ring = comm.ring_factor("all_reduce", lay.tp)
        t, sv, wt, wv = model.max_text_len, model.num_patches + 1, model.text_width, model.vision_width
        elements = 0.0
        for i in shares[slowest].blocks:
            b = bl[i]
            s, w = (sv, wv) if b.kind == "vision" else (t, wt)
            fwd, bwd = (2, 4) if b.kind in ("vision", "text") else (3, 5)  # cross: + out; + q (k, v: below)
            per_run = (fwd * (2 if lay.checkpointing else 1) + bwd) * s * w
            if b.kind in ("fusion", "decoder"):
                per_run += 2 * sv * wv  # cross-attention k, v: the image features' gradients
            elements += per_run * b.runs
        tp_s = accumulation * micro_batch * elements * lay.param_bytes * ring / nvlink
    send_s = 0.0
    if lay.pp > 1:
        g = fab.gpus_per_node
        crosses_nodes = fab.nodes > 1 and lay.dp * lay.tp >= g
        link = (fab.inter_node_gb_s / g) if crosses_nodes else fab.intra_node_gb_s
        per = micro_batch * boundary_elements(model) * lay.param_bytes
        hops = (1 if shares[slowest].rank in (0, lay.pp - 1) else 2) * virtual  # receives and sends per direction
        send_s = 2 * accumulation * hops * per / (comm.NCCL_EFFICIENCY * link * comm.GB)
    return ParallelTime(tp_s, send_s, bubble, imbalance, fraction, flops_share)


def max_micro_batch(
    model: ModelConfig, lay: ParallelLayout, per_rank: int, capacity_gib: float, allowed=lambda accumulation: True
) -> int:
    """The largest micro batch dividing the rank's samples whose breakdown fits and whose accumulation
    `allowed` takes (the pipeline schedule's rule); 0 when none."""
    for m in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        if allowed(per_rank // m) and memory(model, lay, m, per_rank // m, capacity_gib)[0].fits:
            return m
    return 0
