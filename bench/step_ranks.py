"""bench/bench_step.py --ranks N: vltrain's trainer step on N gloo ranks of this machine beside the loop a
user would write instead, side by side.

Each rank (a spawned process, its rendezvous in MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK as
vltrain.distenv reads a torchrun job) builds, per accumulation, the trainer's own session (make_session:
the config path of `vltrain train`; DeepSpeed ZeRO-2 under parallel.strategy "deepspeed", FSDP2 under
"fsdp") and beside it the same model (build_model: same seed, same init) in bench_step.bare_step_fn:
DistributedDataParallel with no_sync() for DeepSpeed recipes, FSDP2 fully_shard with gradient sync off
for FSDP ones; same AdamW groups, schedule, clip 1.0, loss / accumulation, and the same cached batches
(the rank's share of the global batch from the session's loader). The two take one step each in turn,
every rank in lockstep (a barrier, untimed, before each step); rank 0's times are the row's.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ACCUMULATIONS = (1, 8, 16)  # issue 29's rows
WRAP = {"deepspeed": "ddp", "fsdp": "fsdp"}  # the bare loop that stands beside each strategy
MICRO_STEPS_A_ROUND = 40  # timed micro steps a round at least, in at most 10 steps: see steps_for


def steps_for(steps: int, accumulation: int) -> int:
    """Timed steps a round for one row: `steps`, and more where a step is short, up to
    MICRO_STEPS_A_ROUND micro steps in at most 10 steps (accumulation 1: 10, 8: 5, 16: 3). 4 ranks
    sharing 2 cores move single steps by +-10%: 3 steps a round (run_all's) left a row's median
    1.02-1.06x between idle runs of the same code at accumulation 1, 1.00-1.05x at 8."""
    return max(steps, min(10, -(-MICRO_STEPS_A_ROUND // accumulation)))


def rank_config(cfg, world: int, accumulation: int):
    """cfg with the global batch split over `world` ranks and `accumulation` micro steps."""
    micro = cfg.global_batch // (world * accumulation)
    if micro < 1 or micro * world * accumulation != cfg.global_batch:
        raise SystemExit(
            f"--set accumulation={accumulation}: global_batch {cfg.global_batch} is not split into {world} ranks "
            f"x {accumulation} micro steps; allowed: a divisor of {cfg.global_batch // world}"
        )
    return dataclasses.replace(cfg, micro_batch=micro, accumulation=accumulation)


def join(rank: int, world: int, port: int, threads: int) -> None:
    """This process as rank `rank` of a torchrun-style job on this machine (vltrain.distenv.detect)."""
    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)


def engine_words(engine) -> str:
    """How vltrain's side reduces gradients, in words for the rows."""
    if engine.strategy == "fsdp":
        return f"FSDP2 zero_stage {engine.cfg.zero_stage}, gradient sync on the last micro step"
    if engine.stage == 1 and engine.cfg.zero_stage == 2:
        return "ZeRO-2 as stage 1, no gradient hooks, one reduction per step"
    return f"ZeRO-{engine.stage}, {engine.reduction.replace('_', ' ')} reduction"


def pair(cfg, tmp: Path, name: str, compare: tuple[str, ...] = ()):
    """-> (vltrain's session, its StopRequests, {"bare": step, "vltrain": step, ...}) on this rank's cached
    batches; `compare`: VLTRAIN_GRAD_REDUCTION values whose sessions (ZeRO-2 with its gradient hooks,
    the trainer's choice before vltrain.dsconfig.hookless_zero) are timed beside them, as "ZeRO-2 <value>"."""
    from bench_step import bare_step_fn, make_session

    session, stops = make_session(cfg, tmp, name)
    cached = list(itertools.islice(iter(session.loader), 4 * session.split.accumulation))
    mine = itertools.cycle(cached)
    bare = bare_step_fn(cfg, itertools.cycle(cached), WRAP[cfg.parallel.strategy])
    sides = {"bare": bare, "vltrain": lambda: session.train_step(mine)}
    for reduction in compare:
        other, other_stops = make_session(cfg, tmp, f"{name}-{reduction}", reduction)
        other_stops.restore()
        sides[f"ZeRO-2 {reduction}"] = functools.partial(other.train_step, itertools.cycle(cached))
    return session, stops, sides


def side_by_side(sides: dict[str, Any], rounds: int, steps: int) -> dict[str, list[list[float]]]:
    """Seconds per step of each side, per round; one step each in turn, a barrier (untimed) before each;
    and "cpu <side>": this rank's CPU seconds per step, all rounds as one."""
    import time

    import torch.distributed as dist

    cpu: dict[str, list[float]] = {k: [] for k in sides}

    def one(k: str, fn) -> float:
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu[k].append(time.process_time() - c0)  # this rank's CPU seconds: less moved by others' load
        return time.perf_counter() - t0

    for k, fn in sides.items():  # warm-up: allocator, first-call paths, DeepSpeed's first step
        for _ in range(2):
            one(k, fn)
    out: dict[str, list[list[float]]] = {k: [] for k in sides}
    for v in cpu.values():
        v.clear()
    for _ in range(rounds):
        this: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(steps):
            for k, fn in sides.items():
                this[k].append(one(k, fn))
        for k, t in this.items():
            out[k].append(t)
    return out | {f"cpu {k}": [v] for k, v in cpu.items()}


def worker(rank: int, world: int, threads: int, port: int, cfg, tmp: Path, plan: dict[str, Any], result: Path) -> None:
    """One rank of the bench (torch.multiprocessing's fn(rank, *args)): every accumulation of `plan`
    timed side by side; rank 0 writes the rows' raw times to `result`."""
    join(rank, world, port, threads)
    rows = []
    for a in plan["accumulations"]:
        compare = tuple(plan.get("compare", ())) if cfg.parallel.strategy == "deepspeed" else ()
        session, stops, sides = pair(rank_config(cfg, world, a), tmp, f"ranks{world}-a{a}", compare)
        times = side_by_side(sides, plan["rounds"], steps_for(plan["steps"], a))
        rows.append({"accumulation": a, "times": times, "words": engine_words(session.engine)})
        if plan.get("profile") and a == plan["accumulations"][-1]:
            profile_ranks(session, rank, plan["steps"])
        stops.restore()
    if rank == 0:
        result.write_text(json.dumps(rows))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def profile_ranks(session, rank: int, steps: int) -> None:
    """bench_step.profile on rank 0; the other ranks take the same steps unprofiled (lockstep)."""
    from bench_step import profile, timed

    if rank == 0:
        profile(session, steps)
        return
    batches = itertools.cycle(list(itertools.islice(iter(session.loader), 4 * session.split.accumulation)))
    timed(lambda: session.train_step(batches), steps)


def run(
    world: int, cfg, tmp: Path, accumulations, rounds: int, steps: int, profile: bool = False, compare=()
) -> list[dict]:
    """The bench on `world` spawned ranks (threads per rank: this machine's cores // world, at least 1);
    -> one row per accumulation: medians (ms) of each side, the ratio and spread of vltrain's (and of
    each `compare` session: "ratios"), words."""
    import torch.multiprocessing as mp

    from vltrain.distenv import free_port

    threads = threads_per_rank(world)
    result = tmp / f"ranks{world}-{cfg.parallel.strategy}.json"
    plan = {"accumulations": list(accumulations), "rounds": rounds, "steps": steps, "profile": profile}
    plan["compare"] = list(compare)
    args = (world, threads, free_port(), cfg, tmp, plan, result)
    mp.start_processes(worker, args=args, nprocs=world, join=True, start_method="spawn")
    out = []
    for row in json.loads(result.read_text()):
        t = row["times"]
        ms = {k: statistics.median(x for r in v for x in r) * 1000 for k, v in t.items()}
        ratios = {}
        for k in [k for k in t if not k.startswith("cpu ")]:
            per_round = [statistics.median(v) / statistics.median(b) for v, b in zip(t[k], t["bare"], strict=True)]
            ratios[k] = (ms[k] / ms["bare"], min(per_round), max(per_round))
        cpu = {k.removeprefix("cpu "): ms[k] / ms["cpu bare"] for k in ms if k.startswith("cpu ")}
        vl = ratios["vltrain"]
        out.append(row | {"ms": ms, "ratio": vl[0], "spread": vl[1:], "ratios": ratios, "cpu": cpu})
    return out


def threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def trajectory_worker(rank: int, world: int, cfg, tmp: str, steps: int) -> dict[str, list[float]]:
    """Both sides' mean losses over `steps` steps from the same weights and batches, one side after the
    other (for tests/test_multirank_step.py): the same numbers up to fp32 rounding if they compute the
    same thing. The env of a torchrun job is set by the caller."""
    session, stops, sides = pair(cfg, Path(tmp), f"trajectory-{cfg.parallel.strategy}")
    try:
        bare = [sides["bare"]() for _ in range(steps)]
        acc = session.split.accumulation
        vl = [sides["vltrain"]()[0].losses[0] / acc for _ in range(steps)]
    finally:
        stops.restore()
    return {"bare": bare, "vltrain": vl}
