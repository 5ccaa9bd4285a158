"""DeepSpeed ZeRO 1-2's optimizer step with every parameter group's collectives in flight together.

At the accumulation boundary DeepSpeed's ZeRO 1-2 optimizer (stage_1_and_2.DeepSpeedZeroOptimizer.step)
blocks on two collectives per parameter group: an all-reduce of the group's squared gradient norm
(get_grad_norm_direct) and an all-gather of the group's updated weights (deepspeed.runtime.utils.
all_gather_into_tensor_dp_groups, one call per group). vltrain's AdamW has two groups (decay, no decay),
more where split_param_groups cuts a large model into 1 GiB groups: with the gradients' reduction, five
blocking collectives a step against a bare DDP loop's one. On CPU ranks that share cores each one waits
for every rank to be scheduled again: 4 ranks on 2 cores spent ~5 ms a step in the two 1-float norm
all-reduces and ~12 ms in the two all-gathers, 1.04-1.07x the DDP loop's step at accumulation 1
(bench/bench_step.py --ranks 4; docs/performance.md).

`pipelined_step(opt)`, for the duration of one step(), issues the same collectives on the same tensors
asynchronously, one per group, and waits for them together: one wait where there were two, bit-identical
(tests/test_zero_collectives.py), only where the waits happen moves. DeepSpeed has no hook for it and
builds the optimizer itself inside deepspeed.initialize (no subclass to hand it), so the step's two
callees are swapped for the step and put back after it. `applies(ds)` chooses it only where it was
measured (gloo) and where the copy of DeepSpeed's norm arithmetic below is the whole of DeepSpeed's: no
model or expert parallelism, no CPU offload, no pipeline-replicated parameters.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch


def applies(ds) -> bool:
    """Whether `ds`'s ZeRO optimizer steps through pipelined_step: DeepSpeed's stage 1-2 optimizer over
    several parameter groups and several gloo ranks, with none of the features whose norm terms
    group_norms_together leaves out."""
    import torch.distributed as tdist
    from deepspeed import comm as dist
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = getattr(ds, "optimizer", None)
    if not isinstance(opt, DeepSpeedZeroOptimizer) or len(opt.bit16_groups) < 2:
        return False  # one group: nothing to put together
    groups = [opt.dp_process_group, *opt.real_dp_process_group]
    return (
        all(dist.get_world_size(group=g) > 1 and tdist.get_backend(g) == "gloo" for g in groups)
        and dist.has_all_gather_into_tensor()
        and not opt.cpu_offload
        and not opt.has_moe_layers
        and opt.model_parallel_rank == 0
        and not pg_utils.is_parallel(opt.model_parallel_group)
        and not any(getattr(p, PIPE_REPLICATED, False) for g in opt.bit16_groups for p in g)
    )


@contextlib.contextmanager
def pipelined_step(opt) -> Iterator[None]:
    """For the duration (one opt.step()): the gradient norm's and the all-gather's per-group collectives
    issued together (group_norms_together, gather_together); DeepSpeed's own functions back after."""
    import deepspeed.runtime.zero.stage_1_and_2 as zero

    before = zero.all_gather_dp_groups
    zero.all_gather_dp_groups = gather_together
    opt.scaled_global_norm = functools.partial(group_norms_together, opt)
    try:
        yield
    finally:
        zero.all_gather_dp_groups = before
        del opt.scaled_global_norm  # the class's method again


def group_norms_together(opt, norm_type: float = 2) -> torch.Tensor:
    """DeepSpeedZeroOptimizer.scaled_global_norm with each group's all-reduce issued before the first
    is waited on; its arithmetic, step by step (get_grad_norm_direct's L2 branch, the Muon rescale,
    combine_grad_norm_groups), so that the norm and the clipping are DeepSpeed's to the bit."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import combine_grad_norm_groups, mask_nan_or_inf_with_val_inplace

    assert norm_type == 2, "only L2 norm supported"  # as DeepSpeed's
    sums = [squared_norm(opt.averaged_gradients[i], opt.params_in_partition[i]) for i in range(len(opt.bit16_groups))]
    works = [dist.all_reduce(s, op=dist.ReduceOp.SUM, group=opt.dp_process_group, async_op=True) for s in sums]
    norms = []
    for i, (work, total) in enumerate(zip(works, sums, strict=True)):
        work.wait()
        norm = total.pow(1.0 / float(norm_type))
        mask_nan_or_inf_with_val_inplace(norm, device=opt.device)
        if opt._muon_update_lacks_loss_scale(i):
            norm = torch.where(norm >= 0, norm * opt.loss_scale, norm)
        norms.append(norm)
    return combine_grad_norm_groups(norms, norm_type=norm_type)


def squared_norm(gradients, params) -> torch.Tensor:
    """This rank's share of a group's squared L2 gradient norm, as get_grad_norm_direct sums it (each
    gradient's norm in DeepSpeed's norm dtype, squared, summed in fp32; ZeRO's padding left out)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.utils import get_norm_dtype

    grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
    device = get_accelerator().current_device_name()
    norms = [
        torch.linalg.vector_norm(g.data.to(get_norm_dtype()).detach(), ord=2.0).to(device)
        for g, _ in zip(grads, params)
    ]
    if not norms:
        return torch.tensor(0.0, dtype=torch.float32).to(device)
    return torch.stack(norms).pow(2.0).sum().float()


def gather_together(
    groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor, allgather_bucket_size
):
    """deepspeed.runtime.utils.all_gather_dp_groups (its all_gather_into_tensor path, which applies()
    requires) with every group's all-gather issued before the first is waited on."""
    from deepspeed import comm as dist

    works = []
    for flat, partitions, group in zip(groups_flat, partitioned_param_groups, dp_process_group):
        if dist.get_world_size(group=group) == 1:
            continue
        works.append(dist.all_gather_into_tensor(flat, partitions[dist.get_rank(group=group)], group, async_op=True))
    for work in works:
        work.wait()
