"""Step time of the tiny preset: vltrain's training step vs a bare PyTorch loop, side by side.

Both loops get the same model (same seed), the same cached batches (the data loader is left out of
both: it is the same code either way), torch AdamW with the same parameter groups and LR schedule,
and gradient clipping at 1.0. vltrain's side is the trainer's own `train_step` on a real session
(DeepSpeed ZeRO engine, loss bookkeeping, stop flags), built from configs/tiny.toml. The two are
timed in alternating rounds (ABAB...) so that load from other processes hits both alike; the ratio
of the medians is printed, then a cProfile of vltrain's step by where the time goes.

    OMP_NUM_THREADS=2 python bench/bench_step.py [--config configs/tiny.toml] [--steps 20] [--rounds 5]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"))
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per round and loop")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (as vltrain train)")
    args = ap.parse_args()

    from vltrain import distenv
    from vltrain.cli import parse_overrides
    from vltrain.config import load_train_config
    from vltrain.loop import Session, StopRequests, batch_split
    from vltrain.metrics import EventLog

    tmp = Path(tempfile.mkdtemp(prefix="bench-step-"))
    cfg = load_train_config(args.config, parse_overrides(args.set))
    split = batch_split(cfg, 1)
    cfg = dataclasses.replace(
        cfg, micro_batch=split.micro_batch, accumulation=split.accumulation, checkpoint_every=0, eval_every=0
    )
    from vltrain.presets import resolve_model

    mcfg = resolve_model(cfg.model)
    shards, tok = make_data(tmp, max(256, split.micro_batch * 4), mcfg.image_size)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=shards, tokenizer=tok, eval_shards=""))

    os.environ.pop("VLTRAIN_COUNTRY", None)  # no energy tracker in the timed loop
    stops = StopRequests()
    (tmp / "run").mkdir()
    session = Session(cfg, tmp / "run", distenv.current(), EventLog(tmp / "run", False, 0), stops)
    cached = list(itertools.islice(iter(session.loader), 4 * split.accumulation))
    vl_batches, bare_batches = itertools.cycle(cached), itertools.cycle(cached)

    def vl_step():
        session.train_step(vl_batches)

    bare = bare_step_fn(cfg, bare_batches)
    for fn in (vl_step, bare):  # warm-up: allocator, first-call paths
        timed(fn, 3)
    vl_times, bare_times = [], []
    for _ in range(args.rounds):
        vl_times += timed(vl_step, args.steps)
        bare_times += timed(bare, args.steps)
    vl, b = statistics.median(vl_times), statistics.median(bare_times)
    print(
        f"tiny preset: {session.params / 1e6:.2f}M params, micro batch {split.micro_batch} x accumulation "
        f"{split.accumulation}, {cfg.precision}, ZeRO stage {cfg.zero_stage}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    print(f"bare PyTorch loop : {b * 1000:8.1f} ms/step (median of {len(bare_times)})")
    print(f"vltrain step      : {vl * 1000:8.1f} ms/step (median of {len(vl_times)})")
    print(f"ratio vltrain/bare: {vl / b:.3f}  (goal <= 1.10)")

    prof = cProfile.Profile()
    prof.enable()
    timed(vl_step, args.steps)
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
    print(f"\nwhere vltrain's step time goes (cProfile over {args.steps} steps, own time; profiling inflates Python):")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:48s} {t / args.steps * 1000:8.1f} ms/step  {t / total:6.1%}")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:3000])
    stops.restore()


if __name__ == "__main__":
    main()
