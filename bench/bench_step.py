"""Step time of the tiny preset: vltrain's training step vs a bare PyTorch loop, side by side.

Both loops get the same model (same seed), the same cached batches (the data loader is left out of
both: it is the same code either way), torch AdamW with the same parameter groups and LR schedule,
and gradient clipping at 1.0. vltrain's side is the trainer's own `train_step` on a real session
(DeepSpeed ZeRO engine, loss bookkeeping, stop flags), built from configs/tiny.toml. The two are
timed in alternating steps (ABAB..., one step each in turn) so that load from other processes hits both alike; the ratio
of the medians is printed, one row per accumulation (the global batch split into micro batch x
accumulation on one rank); under DeepSpeed ZeRO-2 the trainer's choice (one fp32 rank: stage 1 without gradient
hooks, vltrain.dsconfig.hookless_zero) and ZeRO-2 with its hooks under both reductions (vltrain.engines.deepspeed.grad_reduction:
coalesced, per micro step) are timed in the same rounds.
--profile adds a cProfile of vltrain's step by where the time goes. --ranks N (2, 4): the same on N gloo
ranks beside a bare DDP / FSDP2 loop (bench/step_ranks.py; rank_rows gives bench/run_all.py its rows).

    OMP_NUM_THREADS=2 python bench/bench_step.py [--config configs/tiny.toml] [--accum 1 4 8 16] [--rounds 5]
    OMP_NUM_THREADS=2 python bench/bench_step.py --ranks 2 [--set parallel.strategy=fsdp] [--set accumulation=8]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import functools
import io
import itertools
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GOAL = 1.05  # issue 17: vltrain's step within 5% of the bare loop at accumulation 1, 4, 8 and 16


def make_data(tmp: Path, n: int, image_size: int) -> tuple[str, str]:
    from vltrain.data.synth import write_synthetic_shards
    from vltrain.tokenizer import train_tokenizer_from_shards

    write_synthetic_shards(tmp / "shards", n=n, shards=2, seed=0, image_size=image_size)
    train_tokenizer_from_shards(tmp / "shards", 1000, tmp / "tok.model")
    return str(tmp / "shards"), str(tmp / "tok.model")


def bare_step_fn(cfg, batches, wrap: str = "none"):
    """The textbook loop: forward, backward (loss / accumulation), clip, AdamW step, LR schedule; -> a
    step() returning the step's mean loss. `wrap`: "none" (one rank), "ddp" (DistributedDataParallel,
    no_sync() on every micro step but the last) or "fsdp" (FSDP2's fully_shard per Block and at the
    root, as vltrain.parallel.fsdp wraps, gradient sync off on every micro step but the last): what a
    user would write instead of vltrain on several ranks (bench/step_ranks.py)."""
    import contextlib

    import torch

    from vltrain.dsconfig import warmup_steps
    from vltrain.engines.common import build_model, param_groups
    from vltrain.schedule import lr_factor

    model = build_model(cfg)  # seeded from cfg.seed: the same weights on every rank and as vltrain's
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from vltrain.model.layers import Block

        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block, reshard_after_forward=False)  # zero_stage 2: gathered from forward to backward
        fully_shard(model, reshard_after_forward=False)
    o = cfg.optim
    groups = param_groups(model.module if wrap == "ddp" else model, o.weight_decay)
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, peak=o.lr, min_lr=o.min_lr, warmup=warmup_steps(cfg), total=cfg.steps)
    )
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    accumulation = cfg.accumulation

    def step():
        total = 0.0
        for micro in range(accumulation):
            b = next(batches)
            last = micro == accumulation - 1
            if wrap == "fsdp":
                model.set_requires_gradient_sync(last)
            with model.no_sync() if wrap == "ddp" and not last else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    out = model(b["images"], b["input_ids"], b["attention_mask"], b.get("mlm_draws"))
                (out["loss"] / accumulation).backward()
            total = total + out["loss"].detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return float(total / accumulation)

    return step


def timed(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def make_session(cfg, tmp: Path, name: str, reduction: str = "auto"):
    """A trainer session as `vltrain train` builds it; `reduction` as VLTRAIN_GRAD_REDUCTION would set it
    (auto: the trainer's choice; coalesced / per_micro_step: ZeRO-2's gradient hooks kept on one rank)."""
    from vltrain import distenv
    from vltrain.loop import Session, StopRequests
    from vltrain.metrics import EventLog
    from vltrain.rundir import GRAD_REDUCTION

    (tmp / name).mkdir(exist_ok=True)  # several ranks: one run directory
    stops = StopRequests()
    saved = os.environ.get(GRAD_REDUCTION)
    os.environ[GRAD_REDUCTION] = reduction
    try:
        return Session(cfg, tmp / name, distenv.current(), EventLog(tmp / name, False, 0), stops), stops
    finally:
        os.environ.pop(GRAD_REDUCTION)
        if saved is not None:
            os.environ[GRAD_REDUCTION] = saved


def describe(eng) -> str:
    """How a DeepSpeed session reduces gradients, in words for the rows."""
    if getattr(eng, "stage", None) is None:
        return "vltrain"
    if eng.stage == 1 and eng.cfg.zero_stage == 2:
        return "ZeRO-2 on one rank as stage 1, no gradient hooks"
    return f"ZeRO-{eng.stage}, {eng.reduction.replace('_', ' ')} reduction"


def measure(cfg, tmp: Path, accumulation: int, args) -> tuple[dict[str, Any], list]:
    """Median ms/step of the bare loop and of vltrain's step, timed one step each in turn (bare, vltrain,
    ..., bare, ...). Under DeepSpeed ZeRO-2 (unless args.chosen_only) also ZeRO-2's two reductions with its
    gradient hooks kept (the trainer's choice before vltrain.dsconfig.hookless_zero), as sessions apart."""
    from vltrain.loop import batch_split

    cfg = dataclasses.replace(cfg, micro_batch=cfg.global_batch // accumulation, accumulation=accumulation)
    split = batch_split(cfg, 1)
    picked = ["auto"]
    if cfg.parallel.strategy == "deepspeed" and cfg.zero_stage == 2 and not getattr(args, "chosen_only", False):
        picked += ["coalesced", "per_micro_step"]
    sessions = {r: make_session(cfg, tmp, f"run-a{accumulation}-{r}", r) for r in picked}
    cached = list(itertools.islice(iter(sessions["auto"][0].loader), 4 * split.accumulation))

    def vl(session):
        batches = itertools.cycle(cached)
        return lambda: session.train_step(batches)

    variants = {"bare": bare_step_fn(cfg, itertools.cycle(cached))}
    variants |= {r: vl(session) for r, (session, _) in sessions.items()}
    for fn in variants.values():  # warm-up: allocator, first-call paths
        timed(fn, 3)
    times: dict[str, list[float]] = {k: [] for k in variants}
    rounds: dict[str, list[float]] = {k: [] for k in variants}  # each round's median, for the spread
    for _ in range(args.rounds):
        this: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.steps):  # one step of each in turn: a disturbance hits all sides alike
            for k, fn in variants.items():
                this[k] += timed(fn, 1)
        for k, t in this.items():
            times[k] += t
            rounds[k].append(statistics.median(t))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    spread = {k: [a / b for a, b in zip(v, rounds["bare"], strict=True)] for k, v in rounds.items()}
    words = {r: describe(session.engine) for r, (session, _) in sessions.items()}
    return {"ms": med, "spread": spread, "words": words}, [stops for _, stops in sessions.values()]


def rows(rounds: int = 5, accum: tuple[int, ...] = (1, 4, 8, 16), steps: int = 10, config: str | None = None):
    """Issue 17's accumulation rows for bench/run_all.py: vltrain's step (what the trainer runs) over the
    bare loop's, ratio of the medians, spread = min-max of the per-round ratios."""
    args = argparse.Namespace(rounds=rounds, steps=steps, chosen_only=True)
    cfg, tmp = setup(config or str(REPO / "configs" / "tiny.toml"), [])
    out = []
    for a in accum:
        m, stops = measure(cfg, tmp, a, args)
        for s in reversed(stops):  # signal handlers back, last installed first
            s.restore()
        ratio = m["ms"]["auto"] / m["ms"]["bare"]
        out.append(
            {
                "name": f"trainer step vs a bare PyTorch loop, tiny, accumulation {a}",
                "ratio": ratio,
                "spread": (min(m["spread"]["auto"]), max(m["spread"]["auto"])),
                "goal": f"<= {GOAL:g}x",
                "ok": ratio <= GOAL,
                "detail": f"bare {m['ms']['bare']:.0f} ms/step, vltrain {m['ms']['auto']:.0f} ms/step "
                f"({m['words']['auto']})",
            }
        )
    return out


def rank_rows(rounds: int = 5, steps: int = 3, config: str | None = None):
    """Issue 29's multi-rank rows for bench/run_all.py: 2 and 4 gloo ranks x DeepSpeed ZeRO-2 / FSDP2 x
    accumulation 1, 8, 16, each beside the bare DDP / FSDP2 loop (bench/step_ranks.py); one spawn per
    (ranks, strategy) times its three accumulations."""
    import step_ranks

    base, tmp = setup(config or str(REPO / "configs" / "tiny.toml"), [])
    out = []
    for world in (2, 4):
        for strategy in ("deepspeed", "fsdp"):
            cfg = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, strategy=strategy))
            for r in step_ranks.run(world, cfg, tmp, step_ranks.ACCUMULATIONS, rounds, steps):
                other = "DDP, no_sync()" if strategy == "deepspeed" else "FSDP2, sync skipped"
                out.append(
                    {
                        "name": f"trainer step vs bare {other}, {world} ranks, {strategy}, accumulation {r['accumulation']}",
                        "ratio": r["ratio"],
                        "spread": r["spread"],
                        "goal": f"<= {GOAL:g}x",
                        "ok": r["ratio"] <= GOAL,
                        "detail": f"bare {r['ms']['bare']:.0f} ms/step, vltrain {r['ms']['vltrain']:.0f} ms/step "
                        f"({r['words']}; {step_ranks.threads_per_rank(world)} threads/rank; rank 0's CPU time "
                        f"{r['cpu']['vltrain']:.3f}x)",
                    }
                )
    return out


def main_ranks(cfg, tmp: Path, args) -> None:
    """--ranks N: the table of bench/step_ranks.py's rows, then one line `ratio vltrain/bare: X` (the last row)."""
    import step_ranks

    fixed = any(s.split("=", 1)[0].strip() == "accumulation" for s in args.set)
    accums = [cfg.accumulation] if fixed else (args.accum if args.accum != [1, 4, 8, 16] else step_ranks.ACCUMULATIONS)
    wrap = "DistributedDataParallel, no_sync()" if cfg.parallel.strategy == "deepspeed" else "FSDP2, sync skipped"
    for a in accums:  # a batch that does not split: one line and exit 1 here, not a traceback in each rank
        step_ranks.rank_config(cfg, args.ranks, a)
    threads = step_ranks.threads_per_rank(args.ranks)
    print(
        f"{cfg.model} preset, global batch {cfg.global_batch} over {args.ranks} gloo ranks ({threads} threads each), "
        f"{cfg.precision}, {cfg.parallel.strategy} zero_stage {cfg.zero_stage} vs bare {wrap}; ms/step are rank "
        f"0's medians of {args.rounds} x {args.steps} steps, the two timed one step each in turn",
        flush=True,
    )
    compare = () if args.chosen_only or cfg.zero_stage != 2 else ("coalesced",)
    rows = step_ranks.run(args.ranks, cfg, tmp, accums, args.rounds, args.steps, args.profile, compare)
    print(f"{'accumulation':>12} {'micro':>5} {'bare ms':>8} {'vltrain ms':>10}  vltrain/bare (min-max of the rounds)")
    for r in rows:
        micro = cfg.global_batch // (args.ranks * r["accumulation"])
        print(
            f"{r['accumulation']:>12} {micro:>5} {r['ms']['bare']:8.1f} {r['ms']['vltrain']:10.1f}  {r['ratio']:.3f} "
            f"({r['spread'][0]:.3f}-{r['spread'][1]:.3f})  {r['words']}   (goal <= {GOAL:g})"
            + "".join(
                f";  {k} {v[0]:.3f} ({v[1]:.3f}-{v[2]:.3f})" for k, v in r["ratios"].items() if k.startswith("ZeRO")
            )
            + "; rank 0's CPU time / bare's: "
            + ", ".join(f"{k} {v:.3f}" for k, v in r["cpu"].items() if k != "bare")
        )
    print(f"ratio vltrain/bare: {rows[-1]['ratio']:.3f}")


def setup(config: str, overrides: list[str]):
    """The bench's config (no checkpoints, no eval) on synthetic shards made in a temp dir."""
    from vltrain.cli import parse_overrides
    from vltrain.config import load_train_config
    from vltrain.presets import resolve_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-step-"))
    cfg = load_train_config(config, parse_overrides(overrides))
    cfg = dataclasses.replace(cfg, checkpoint_every=0, eval_every=0)
    mcfg = resolve_model(cfg.model)
    shards, tok = make_data(tmp, max(256, cfg.global_batch * 4), mcfg.image_size)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=shards, tokenizer=tok, eval_shards=""))
    os.environ.pop("VLTRAIN_COUNTRY", None)  # no energy tracker in the timed loop
    return cfg, tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"))
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per round and loop")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--accum", type=int, nargs="+", default=[1, 4, 8, 16], help="accumulation steps, one row each")
    ap.add_argument("--profile", action="store_true", help="cProfile vltrain's step at the last --accum")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (as vltrain train)")
    ap.add_argument("--ranks", type=int, default=1, help="gloo ranks on this machine (2, 4: vs bare DDP / FSDP2)")
    ap.add_argument(
        "--chosen-only", action="store_true", help="--ranks: time only the trainer's choice (not ZeRO-2's hooks)"
    )
    args = ap.parse_args()

    cfg, tmp = setup(args.config, args.set)
    if args.ranks > 1:
        return main_ranks(cfg, tmp, args)
    print(
        f"{cfg.model} preset, global batch {cfg.global_batch} on one rank, {cfg.precision}, ZeRO stage "
        f"{cfg.zero_stage}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}; ms/step are medians of "
        f"{args.rounds} x {args.steps} steps, variants timed one step each in turn"
    )
    print(f"{'accumulation':>12} {'micro':>5} {'bare ms':>8}  vltrain/bare (min-max of the rounds)")
    for a in args.accum:
        m, stops = measure(cfg, tmp, a, args)
        ratios = "  ".join(
            f"{m['words'][k]}{' (chosen)' if k == 'auto' else ''} {m['ms'][k] / m['ms']['bare']:.3f} "
            f"({min(m['spread'][k]):.3f}-{max(m['spread'][k]):.3f})"
            for k in m["words"]
        )
        print(f"{a:>12} {cfg.global_batch // a:>5} {m['ms']['bare']:8.1f}  {ratios}   (goal <= {GOAL:g})", flush=True)
        for s in reversed(stops):  # signal handlers back, last installed first
            s.restore()
    if args.profile:
        a = args.accum[-1]
        session, stops = make_session(
            dataclasses.replace(cfg, micro_batch=cfg.global_batch // a, accumulation=a), tmp, "profiled"
        )
        profile(session, args.steps)
        stops.restore()


def profile(session, steps: int) -> None:
    import itertools as it

    batches = it.cycle(list(it.islice(iter(session.loader), 4 * session.split.accumulation)))
    prof = cProfile.Profile()
    prof.enable()
    timed(lambda: session.train_step(batches), steps)
    prof.disable()
    stats = pstats.Stats(prof)
    groups: dict[str, float] = {}
    for (file, _, fn), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "run_backward" in fn:
            g = "autograd backward (kernels)"
        elif file == "~" or fn.startswith("<built-in") or fn.startswith("<method"):
            g = "forward kernels and other C calls"
        elif "deepspeed" in file:
            g = "DeepSpeed Python (hooks, buckets, ZeRO step)"
        elif "torch/optim" in file:
            g = "torch optimizer Python"
        elif "vltrain" in file:
            g = "vltrain Python (model + loop)"
        else:
            g = "other Python (torch.nn, ...)"
        groups[g] = groups.get(g, 0.0) + own
    total = sum(groups.values())
    print(f"\nwhere vltrain's step time goes (cProfile over {steps} steps, own time; profiling inflates Python):")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:48s} {t / steps * 1000:8.1f} ms/step  {t / total:6.1%}")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:3000])


if __name__ == "__main__":
    main()
