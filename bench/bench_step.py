"""Step time of the tiny preset: vltrain's training step vs a bare PyTorch loop, side by side.

Both loops get the same model (same seed), the same cached batches (the data loader is left out of
both: it is the same code either way), torch AdamW with the same parameter groups and LR schedule,
and gradient clipping at 1.0. vltrain's side is the trainer's own `train_step` on a real session
(DeepSpeed ZeRO engine, loss bookkeeping, stop flags), built from configs/tiny.toml. The two are
timed in alternating steps (ABAB..., one step each in turn) so that load from other processes hits both alike; the ratio
of the medians is printed, one row per accumulation (the global batch split into micro batch x
accumulation on one rank); under DeepSpeed ZeRO-2 both gradient reductions (vltrain.engine.grad_reduction:
coalesced, per micro step) are timed in the same rounds and the one the trainer chooses is marked.
--profile adds a cProfile of vltrain's step by where the time goes.

    OMP_NUM_THREADS=2 python bench/bench_step.py [--config configs/tiny.toml] [--accum 1 4 8 16] [--rounds 5]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GOAL = 1.05  # issue 17: vltrain's step within 5% of the bare loop at accumulation 1, 4, 8 and 16


def make_data(tmp: Path, n: int, image_size: int) -> tuple[str, str]:
    from vltrain.data.synth import write_synthetic_shards
    from vltrain.tokenizer import train_tokenizer_from_shards

    write_synthetic_shards(tmp / "shards", n=n, shards=2, seed=0, image_size=image_size)
    train_tokenizer_from_shards(tmp / "shards", 1000, tmp / "tok.model")
    return str(tmp / "shards"), str(tmp / "tok.model")


def bare_step_fn(cfg, batches):
    """The textbook loop: forward, backward (loss / accumulation), clip, AdamW step, LR schedule."""
    import torch

    from vltrain.dsconfig import warmup_steps
    from vltrain.engine import build_model, param_groups
    from vltrain.schedule import lr_factor

    model = build_model(cfg)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, peak=o.lr, min_lr=o.min_lr, warmup=warmup_steps(cfg), total=cfg.steps)
    )
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    accumulation = cfg.accumulation

    def step():
        for _ in range(accumulation):
            b = next(batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = model(b["images"], b["input_ids"], b["attention_mask"])
            (out["loss"] / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return out["loss"].item()

    return step


def timed(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def make_session(cfg, tmp: Path, name: str):
    from vltrain import distenv
    from vltrain.loop import Session, StopRequests
    from vltrain.metrics import EventLog

    (tmp / name).mkdir()
    stops = StopRequests()
    return Session(cfg, tmp / name, distenv.current(), EventLog(tmp / name, False, 0), stops), stops


def measure(cfg, tmp: Path, accumulation: int, args) -> tuple[dict[str, float], object, object]:
    """Median ms/step of the bare loop and of vltrain's step under each ZeRO-2 gradient reduction,
    timed one step each in turn (bare, coalesced, per micro step, bare, ...) on one session."""
    from vltrain.engine import grad_reduction
    from vltrain.loop import batch_split

    cfg = dataclasses.replace(cfg, micro_batch=cfg.global_batch // accumulation, accumulation=accumulation)
    split = batch_split(cfg, 1)
    session, stops = make_session(cfg, tmp, f"run-a{accumulation}")
    cached = list(itertools.islice(iter(session.loader), 4 * split.accumulation))
    vl_batches, bare_batches = itertools.cycle(cached), itertools.cycle(cached)
    eng = session.engine

    def vl(reduction: str):
        def step():
            if reduction:
                eng.reduction = reduction
            session.train_step(vl_batches)

        return step

    variants = {"bare": bare_step_fn(cfg, bare_batches)}
    if hasattr(eng, "reduction"):  # DeepSpeed: both reductions, side by side (or the chosen one alone)
        picked = (
            [grad_reduction(cfg, "cpu")] if getattr(args, "chosen_only", False) else ["coalesced", "per_micro_step"]
        )
        variants |= {r: vl(r) for r in picked}
    else:
        variants["vltrain"] = vl("")
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
    chosen = grad_reduction(cfg, "cpu") if hasattr(eng, "reduction") else "vltrain"
    if hasattr(eng, "reduction"):
        eng.reduction = chosen
    return med | {"chosen": chosen, "spread": spread}, session, stops


def rows(rounds: int = 5, accum: tuple[int, ...] = (1, 4, 8, 16), steps: int = 10, config: str | None = None):
    """Issue 17's accumulation rows for bench/run_all.py: vltrain's step (the reduction it chooses) over
    the bare loop's, ratio of the medians, spread = min-max of the per-round ratios."""
    args = argparse.Namespace(rounds=rounds, steps=steps, chosen_only=True)
    cfg, tmp = setup(config or str(REPO / "configs" / "tiny.toml"), [])
    out = []
    stops = None
    for a in accum:
        if stops is not None:
            stops.restore()
        med, _, stops = measure(cfg, tmp, a, args)
        k = med["chosen"]
        ratio = med[k] / med["bare"]
        out.append(
            {
                "name": f"trainer step vs a bare PyTorch loop, tiny, accumulation {a}",
                "ratio": ratio,
                "spread": (min(med["spread"][k]), max(med["spread"][k])),
                "goal": f"<= {GOAL:g}x",
                "ok": ratio <= GOAL,
                "detail": f"bare {med['bare']:.0f} ms/step, vltrain {med[k]:.0f} ms/step ({k} ZeRO-2 reduction)",
            }
        )
    if stops is not None:
        stops.restore()
    return out


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
    args = ap.parse_args()

    cfg, tmp = setup(args.config, args.set)
    print(
        f"{cfg.model} preset, global batch {cfg.global_batch} on one rank, {cfg.precision}, ZeRO stage "
        f"{cfg.zero_stage}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}; ms/step are medians of "
        f"{args.rounds} x {args.steps} steps, variants timed one step each in turn"
    )
    print(f"{'accumulation':>12} {'micro':>5} {'bare ms':>8}  vltrain/bare by ZeRO-2 gradient reduction")
    session = stops = None
    for a in args.accum:
        med, session, stops = measure(cfg, tmp, a, args)
        ratios = "  ".join(
            f"{k} {med[k] / med['bare']:.3f} ({min(med['spread'][k]):.3f}-{max(med['spread'][k]):.3f})"
            f"{' (chosen)' if k == med['chosen'] else ''}"
            for k in med
            if k not in ("bare", "chosen", "spread")
        )
        print(f"{a:>12} {cfg.global_batch // a:>5} {med['bare']:8.1f}  {ratios}   (goal <= 1.05)", flush=True)
        if a != args.accum[-1]:
            stops.restore()
    if args.profile and session is not None:
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
