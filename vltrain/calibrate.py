"""What one rank of a CPU cluster measures for the planner's [calibration] table (issue 29).

`clusterctl profiles calibrate NAME` runs a Slurm job laid out as a run of the profile; every rank calls
`measure_rank` at once (so the rates are those of ranks sharing the machine, as in training) and the job
keeps the median of each figure over the ranks, the all-reduce figures of rank 0.
clusterctl.planning.cpu_predict turns the figures into a step time and a peak resident set.

Each figure is timed for a fixed budget of wall time (not a fixed count) so ranks of unequal speed stay
in step, between barriers; the whole call takes ~10 s on 2 cores.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

MATMUL_SIZES = (64, 128, 256, 512, 1024)
_BUDGET_S = 0.6  # per timed figure


def rss_mib() -> float:
    """This process's resident set now (MiB), from /proc (Linux), else the peak resident set."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn: Callable[[], Any], budget_s: float = _BUDGET_S, min_runs: int = 3) -> float:
    """Mean seconds of one call of `fn` over as many calls as fit in `budget_s` (one warm-up first).

    The mean of the whole window, not the median of the calls: a call shorter than the scheduler's time
    slice is rarely preempted, so on a shared machine the median tells the speed of a core held alone while
    a training step, seconds long, gets the core's share; the mean over the window gets the share too."""
    fn()
    runs = 0
    start = time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < budget_s:
        fn()
        runs += 1
    return (time.perf_counter() - start) / runs


def matmul_gflops(sizes: Sequence[int] = MATMUL_SIZES) -> dict[str, float]:
    """fp32 GFLOP/s of a square N x N @ N x N product (2 N^3 FLOPs) for each N."""
    import torch

    out: dict[str, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        t = _timed(functools.partial(torch.mm, a, b, out=c), budget_s=_BUDGET_S / 2)
        out[str(n)] = 2 * n**3 / t / 1e9
    return out


BLOCK_WIDTHS = (64, 128, 256, 512)
# tokens per micro batch (micro batch x sequence): one short sequence (a ViT's 17 tokens at micro batch 1,
# where dispatch outweighs the matmuls: 1.7-2.9x slower than at 64 tokens, measured), one, eight sequences
BLOCK_TOKENS = (16, 64, 512)
BLOCK_SEQ = 64  # tokens per sequence (attention's length), fewer if the micro batch has fewer


def block_flops(width: int, tokens: int, seq: int = BLOCK_SEQ) -> float:
    """Matmul FLOPs of one self-attention Block's forward (vltrain.model_math's count: qkv, scores,
    output projection, an MLP of ratio 4) over `tokens` tokens in sequences of `seq`."""
    return (
        2 * tokens * width * 3 * width + 4 * tokens * seq * width + 2 * tokens * width * width + 16 * tokens * width**2
    )


def block_gflops(widths: Sequence[int] = BLOCK_WIDTHS, tokens: Sequence[int] = BLOCK_TOKENS) -> dict[str, float]:
    """{"WIDTHxTOKENS": GFLOP/s}: the trainer's own pre-norm Block (vltrain.model.layers: LayerNorm, SDPA,
    GELU MLP), forward + backward in fp32, its matmul FLOPs (x3) per second. What a model part of that
    width sustains with its norms, softmax, GELU and dispatch, which a bare matmul leaves out."""
    import torch

    from vltrain.model.layers import Block

    out: dict[str, float] = {}
    torch.manual_seed(0)
    for w in widths:
        block = Block(w, max(1, w // 64), 4 * w, "layernorm")
        for t in tokens:
            seq = min(t, BLOCK_SEQ)
            x = torch.randn(t // seq, seq, w, requires_grad=True)

            def run(block: Any = block, x: Any = x) -> None:
                block(x).sum().backward()

            secs = _timed(run, budget_s=_BUDGET_S / 2, min_runs=2)
            out[f"{w}x{t}"] = 3 * block_flops(w, t, seq) / secs / 1e9
    return out


def op_overhead_us(chain: int = 200) -> float:
    """Dispatch cost of one small op, forward and its backward (autograd), per op (microseconds): a
    chain of `chain` element-wise ops on an 8-element tensor, where the arithmetic itself is nothing."""
    import torch

    x = torch.ones(8, requires_grad=True)

    def run() -> None:
        y = x
        for _ in range(chain):
            y = y * 1.0001
        y.sum().backward()

    return _timed(run) / chain * 1e6


def memory_gb_s(mib: int = 64) -> float:
    """Copy bandwidth (GB/s): bytes read plus bytes written by `dst.copy_(src)` of `mib` MiB, larger than
    the caches, per second."""
    import torch

    src = torch.ones(mib * 2**18)  # fp32: 4 bytes each
    dst = torch.empty_like(src)
    t = _timed(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / t / 1e9


def alloc_gb_s(mib: int = 64) -> float:
    """Fresh-memory bandwidth (GB/s): bytes of a new zero-filled `mib` MiB tensor per second. Large
    tensors come from the kernel (mmap) and go back when freed, so each first touch faults a page in: on
    a shared VM ~10x slower than copying between buffers that exist. A step's large new tensors (the
    embedding's dense gradient, the vocabulary logits, gradients after zero_grad) pay this rate."""
    import torch

    n = mib * 2**18
    return n * 4 / _timed(lambda: torch.zeros(n)) / 1e9


def allreduce(world: int, mib: int = 16) -> tuple[float, float]:
    """(bus GB/s of a `mib` MiB fp32 all-reduce, microseconds of a 4-byte one) over the default group.

    Bus bandwidth is NCCL-tests' figure, bytes x 2 (n - 1) / n per second, what a ring moves per rank and
    the planner's comm model divides by; with one rank (nothing crosses) it is bytes per second."""
    import torch
    import torch.distributed as dist

    big, small = torch.ones(mib * 2**18), torch.ones(1)
    dist.barrier()
    # a fixed count, not a time budget: every rank must make as many calls (with a budget of its own,
    # one rank could wait for ever in a call the others never made: a Slurm job hung so)
    t_big = _timed(lambda: dist.all_reduce(big), budget_s=0.0, min_runs=8)
    dist.barrier()
    t_small = _timed(lambda: dist.all_reduce(small), budget_s=0.0, min_runs=50)
    factor = 2 * (world - 1) / world if world > 1 else 1.0
    return big.numel() * 4 * factor / t_big / 1e9, t_small * 1e6


def gather_us(width: int = 128, tokens: int = 64) -> float:
    """What one differentiable all-gather between computing ranks costs (microseconds): the trainer's Block
    (forward + backward at `width` over `tokens`) with vltrain.collectives.all_gather_rows of its first
    token's rows inside (the ITC loss's gather: forward, and its reduce in backward), less the Block alone.
    Each is a point where a rank waits for the other (their compute drifts apart between such points): on 2
    ranks of this machine 3-4 ms, ~15x a back-to-back all-reduce's latency. Collective (a fixed count)."""
    import torch

    from vltrain.collectives import all_gather_rows
    from vltrain.model.layers import Block

    torch.manual_seed(0)
    block = Block(width, max(1, width // 64), 4 * width, "layernorm")
    x = torch.randn(tokens // BLOCK_SEQ, BLOCK_SEQ, width)

    def plain() -> None:
        block(x).sum().backward()

    def gathered() -> None:
        y = block(x)
        (y.sum() + all_gather_rows(y[:, 0]).sum()).backward()

    t_plain = _timed(plain, budget_s=0.0, min_runs=30)
    t_gathered = _timed(gathered, budget_s=0.0, min_runs=30)
    t_plain = min(t_plain, _timed(plain, budget_s=0.0, min_runs=30))  # both sides of the load
    return max(0.0, t_gathered - t_plain) * 1e6


FSDP_UNITS = ((64, 4), (256, 2))  # (width, Blocks): a unit whose bytes add little, and one whose bytes show
FSDP_TOKENS = 64


def _fsdp_unit_s(world: int, width: int, units: int) -> float:
    """Seconds one fully_shard-ed Block adds to a micro step at `width`: `units` of the trainer's Blocks,
    each wrapped as vltrain.parallel.fsdp does (zero_stage 2: kept gathered from forward to backward,
    resharded after it; gradient sync off, as between accumulation micro steps), forward + backward, less
    the same Blocks unwrapped, per Block. Collective: every rank calls it (a fixed count, as allreduce)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from vltrain.model.layers import Block

    torch.manual_seed(0)

    def stack() -> Any:
        return torch.nn.Sequential(*[Block(width, max(1, width // 64), 4 * width, "layernorm") for _ in range(units)])

    x = torch.randn(FSDP_TOKENS // BLOCK_SEQ, BLOCK_SEQ, width)
    bare, sharded = stack(), stack()
    mesh = init_device_mesh("cpu", (world,))
    for block in sharded:
        fully_shard(block, mesh=mesh, reshard_after_forward=False)
    fully_shard(sharded, mesh=mesh, reshard_after_forward=False)
    sharded.set_requires_gradient_sync(False)  # type: ignore[operator]

    def run(model: Any) -> Callable[[], None]:
        return lambda: model(x).sum().backward()

    t_bare = _timed(run(bare), budget_s=0.0, min_runs=15)
    t_sharded = _timed(run(sharded), budget_s=0.0, min_runs=15)  # a fixed count: it holds collectives
    t_bare = min(t_bare, _timed(run(bare), budget_s=0.0, min_runs=15))  # both sides of the load
    return max(0.0, (t_sharded - t_bare) / units)


def fsdp_unit(world: int) -> tuple[float, float]:
    """(microseconds, GB/s): what one FSDP2 unit adds to each micro step, as a fixed cost plus its fp32
    parameters' bytes at a rate, from two widths (FSDP_UNITS). It holds FSDP2's pre/post forward and
    backward hooks, the all-gather's copy-in and copy-out, the gloo all-gather (bytes and call) and the
    gathered tensors' memory; on 2 ranks of this machine 2-4 ms per unit at width 64-96 whatever the tokens
    (64-1024), 12 ms at width 384 (7 MB): ~10x an all-reduce's latency, and ~0.8 GB/s."""
    from vltrain.model.layers import Block

    (w0, n0), (w1, n1) = FSDP_UNITS
    t0, t1 = _fsdp_unit_s(world, w0, n0), _fsdp_unit_s(world, w1, n1)

    def nbytes(w: int) -> int:
        return 4 * sum(p.numel() for p in Block(w, max(1, w // 64), 4 * w, "layernorm").parameters())

    per_byte = max(1e-12, (t1 - t0) / (nbytes(w1) - nbytes(w0)))
    return max(0.0, t0 - per_byte * nbytes(w0)) * 1e6, 1 / per_byte / 1e9


def adamw_ns(numel: int = 8 * 2**20) -> float:
    """Nanoseconds per parameter of torch's AdamW as the trainer builds it on CPU (weight decay, no fused or
    foreach kernel: the single-tensor loop) over one fp32 tensor larger than the caches: DeepSpeed's
    flat partition. Its element-wise ops and the temporaries they allocate (the denominator) cost ~150
    bytes of copy bandwidth a parameter here, not the 28 its reads and writes of p, g, m and v add up to."""
    import torch

    param = torch.nn.Parameter(torch.randn(numel))
    param.grad = torch.randn(numel)
    optimizer = torch.optim.AdamW([param], lr=1e-4, weight_decay=0.01)
    return _timed(optimizer.step) / numel * 1e9


def grad_accumulate_ns(numel: int = 8 * 2**20) -> float:
    """Nanoseconds per parameter that a micro step after the first adds to backward: autograd sums its
    gradient into the existing param.grad (read both, write one, free the new one) where the first
    micro step after zero_grad keeps the new tensor as it is. Timed as the difference of the same
    backward into an existing gradient and into none, over one fp32 tensor larger than the caches:
    0.3-0.6 ns a parameter here. A lower bound: in the small preset's model a later micro step costs
    1.07 ns a parameter more than the first (54 ms at 50M parameters; docs/planning.md)."""
    import torch

    param, x = torch.nn.Parameter(torch.randn(numel)), torch.randn(numel)

    def first() -> None:
        param.grad = None
        (param * x).sum().backward()

    def again() -> None:
        (param * x).sum().backward()

    t_first = _timed(first)
    t_again = _timed(again)
    t_first = min(t_first, _timed(first))  # both sides of the load
    return max(0.0, t_again - t_first) / numel * 1e9


def fsdp_adamw_us(world: int, tensors: int = 32, numel: int = 256) -> float:
    """What FSDP's optimizer step costs per sharded parameter tensor (microseconds): vltrain's
    clip_grad_norm_ and torch AdamW (the trainer's: single-tensor on CPU) and zero_grad over `tensors`
    small DTensors sharded on the group, whose every op dispatches through DTensor (57 us an element-wise op
    on 2 ranks here against 4.5 us for a plain tensor). Collective (the norm's reduction: a fixed count)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from vltrain.parallel.mesh import clip_grad_norm_

    mesh = init_device_mesh("cpu", (world,))
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(numel), mesh, [Shard(0)])) for _ in range(tensors)]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    def step() -> None:
        for p in params:
            p.grad = torch.distributed.tensor.ones(numel, device_mesh=mesh, placements=[Shard(0)])
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, budget_s=0.0, min_runs=10) / tensors * 1e6


def _import_trainer() -> None:
    """Import what a training rank imports before it builds a model, so base_rss_mib is that rank's."""
    import torch  # noqa: F401

    import vltrain.loop  # noqa: F401
    from vltrain.engines import import_libraries

    import_libraries()  # DeepSpeed and the engines: only vltrain.engines imports engine libraries


def _own_group() -> Callable[[], None]:
    """A one-rank gloo group when none is initialised (world size 1); returns how to end it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return lambda: None
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.destroy_process_group


def measure_rank(sizes: Sequence[int] = MATMUL_SIZES) -> dict[str, Any]:
    """Measure this rank: call it in every rank at once, after torch.distributed was initialised with
    gloo over all of them (with none initialised it makes a one-rank group, ended before returning).

    Returns the [calibration] keys one rank measures (the caller adds measured_at, slurm_job, ranks):
      threads_per_rank      torch.get_num_threads()
      matmul_gflops         {"N": fp32 GFLOP/s of an N x N @ N x N product} for N in `sizes`
      block_gflops          (added) {"WIDTHxTOKENS": GFLOP/s} of the trainer's transformer Block, forward
                            + backward, at widths BLOCK_WIDTHS over BLOCK_TOKENS tokens (block_gflops)
      op_overhead_us        one small op's forward + backward dispatch, per op
      memory_gb_s           copy bandwidth (read + write bytes per second)
      alloc_gb_s            (added) fresh zero-filled memory per second (alloc_gb_s: page faults)
      adamw_ns              (added) torch AdamW per parameter of one large tensor (adamw_ns)
      grad_accumulate_ns    (added) a micro step's gradient summed into param.grad, per parameter
      allreduce_gb_s        gloo all-reduce bus bandwidth, 16 MiB messages
      allreduce_latency_us  one 4-byte gloo all-reduce
      base_rss_mib          resident set after importing torch, deepspeed and the trainer and joining
                            the group, before any tensor of the measurement was made
      fsdp_adamw_us         (added) FSDP's clip + AdamW + zero_grad per sharded tensor (fsdp_adamw_us)
      gather_us             (added) one differentiable all-gather between computing ranks (gather_us)
      fsdp_unit_us          (added) what one FSDP2 unit adds to a micro step, fixed (hooks, calls)
      fsdp_unit_gb_s        (added) ... and per byte of its fp32 parameters (gather, copies) (fsdp_unit)
      fsdp_imports_mib      (added to the contract) what importing FSDP2's stack (device mesh, DTensor,
                            fully_shard) adds to it: an FSDP rank has it, a DeepSpeed rank has not
    """
    import torch

    _import_trainer()
    end = _own_group()
    try:
        import torch.distributed as dist

        dist.barrier()
        base = rss_mib()
        out: dict[str, Any] = {"threads_per_rank": torch.get_num_threads(), "base_rss_mib": base}
        import vltrain.parallel.fsdp
        import vltrain.parallel.mesh  # noqa: F401  (DeviceMesh, DTensor, fully_shard: what an FSDP rank adds)

        out["fsdp_imports_mib"] = max(0.0, rss_mib() - base)
        dist.barrier()
        out["matmul_gflops"] = matmul_gflops(sizes)
        dist.barrier()
        out["block_gflops"] = block_gflops()
        dist.barrier()
        out["op_overhead_us"] = op_overhead_us()
        dist.barrier()
        out["memory_gb_s"] = memory_gb_s()
        out["alloc_gb_s"] = alloc_gb_s()
        out["adamw_ns"] = adamw_ns()
        out["grad_accumulate_ns"] = grad_accumulate_ns()
        out["allreduce_gb_s"], out["allreduce_latency_us"] = allreduce(dist.get_world_size())
        dist.barrier()
        out["fsdp_unit_us"], out["fsdp_unit_gb_s"] = fsdp_unit(dist.get_world_size())
        out["gather_us"] = gather_us()
        out["fsdp_adamw_us"] = fsdp_adamw_us(dist.get_world_size())
        dist.barrier()
        return out
    finally:
        end()


if __name__ == "__main__":  # a quick look on this machine: python -m vltrain.calibrate
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(measure_rank())
