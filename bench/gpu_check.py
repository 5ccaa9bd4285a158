"""GPU check: the `large` preset (~1.0B) trained for 30 steps in bf16 on one GPU, next to the planner.

Reports, for the steps after the warm-up ones: MFU (model FLOPs, 3x forward, not counting
recomputation, over the GPU's dense bf16 peak), samples/s, and peak memory from
torch.cuda.max_memory_allocated / max_memory_reserved beside the planner's prediction for the same
plan (clusterctl.planning). Goals (issue 14): MFU >= 45% (torchtitan reports 33-39% for Llama-8B on
H100) and the planner within 10% of the measured peak. Batches are random tensors of the model's
shapes: this measures the trainer's compute path (DeepSpeed ZeRO-2 engine, bf16, fused AdamW), not
data loading. Runs in a few minutes on an H100/H200:

    .venv/bin/python bench/gpu_check.py [--steps 30] [--micro-batch N] [--json out.json]
    .venv/bin/python bench/gpu_check.py --device cpu --model tiny --steps 3   # the code path, on CPU

NOT MEASURED: no GPU was lent to the sessions that wrote and last changed this script (issue 23
included), so it has never run on one; docs/trainer.md ("Measured on a GPU") says "not measured" for
every figure it would give, and no number here or there comes from a GPU. Its code path runs on CPU
(tests/test_gpu_check.py), where the MFU it prints is against a made-up 0.2 TFLOP/s "peak" and means
nothing. The day it runs on a GPU, put its JSON's figures in docs/trainer.md with the device's name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def planner_profile(device_name: str, memory_gib: float, peak: float, kind: str):
    """A one-GPU profile for the planner, with the device's own memory and peak."""
    from clusterctl.planning.profiles import parse_profile

    return parse_profile(
        {
            "name": "one-gpu",
            "description": f"one {device_name}",
            "executor": "local",
            "nodes": {"count": 1, "gpus_per_node": 1, "cpus_per_node": 16, "memory_gib": 128},
            "gpu": {
                "model": device_name[:64].replace("/", " "),
                "kind": kind,
                "memory_gib": memory_gib,
                "peak_bf16_tflops": peak,
                "power_w": 700,
            },
            "interconnect": {"intra_node": "none", "inter_node": "none"},
            "site": {"country_iso": "USA"},
        },
        "<gpu_check>",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="large")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the figures (compile, allocator)")
    ap.add_argument("--micro-batch", type=int, default=0, help="default: the planner's largest that fits")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it where a GPU is (or --device cpu for the code path)")
        return 2
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", "29517"),
        DS_ACCELERATOR=args.device,
    )

    from clusterctl.planning.plan import make_plan
    from vltrain.config import TrainConfig
    from vltrain.distenv import detect
    from vltrain.engines.deepspeed import DeepSpeedEngine, build_engine
    from vltrain.metrics import peak_tflops
    from vltrain.model_math import active_objectives, forward_flops_per_sample, param_count
    from vltrain.presets import get_preset

    mcfg = get_preset(args.model)
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, memory_gib = props.name, props.total_memory / 2**30
        peak = peak_tflops(name) or 989.0
    else:
        name, memory_gib, peak = "CPU", 16.0, 0.2
    plan = make_plan(
        planner_profile(name, memory_gib, peak, args.device), mcfg, 1024, micro_batch=args.micro_batch or None
    )
    micro = plan.split.micro_batch if not args.micro_batch else args.micro_batch
    cfg = TrainConfig(
        model=args.model,
        global_batch=micro,
        micro_batch=micro,
        accumulation=1,
        steps=args.steps,
        precision="bf16",
        zero_stage=2,
    )
    device = DeepSpeedEngine.init_process_group(detect(dict(os.environ)), args.device)
    engine, _ = build_engine(cfg, micro, 1, 1, device)
    t_len = mcfg.max_text_len
    images = torch.randn(micro, 3, mcfg.image_size, mcfg.image_size, device=device, dtype=torch.bfloat16)
    ids = torch.randint(5, mcfg.vocab_size, (micro, t_len), device=device)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones(micro, t_len, dtype=torch.bool, device=device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine(images, ids, mask)
        engine.backward(out["loss"])
        engine.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(
            f"step {step + 1}/{args.steps} loss {float(out['loss'].detach()):.4f} {times[-1] * 1000:.0f} ms", flush=True
        )
    measured = times[args.warmup_steps :] or times
    step_s = statistics.median(measured)
    # model FLOPs of the objectives that train (all of them here), no recomputation (none here either)
    flops = 3 * forward_flops_per_sample(mcfg, text_len=t_len, objectives=active_objectives(cfg.loss)) * micro
    result = {
        "measured_on_gpu": args.device == "cuda",  # False: a code-path run, its figures are not measurements
        "device": name,
        "model": args.model,
        "params": param_count(mcfg),
        "micro_batch": micro,
        "step_s_median": step_s,
        "samples_per_s": micro / step_s,
        "mfu": flops / step_s / (peak * 1e12),
        "peak_bf16_tflops": peak,
        "memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        "memory_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if args.device == "cuda" else None,
        "planner_total_gib": plan.memory.total_gib,
        "planner_without_context_gib": plan.memory.total_gib - plan.memory.buffers_gib,
    }
    if result["memory_reserved_gib"]:
        result["planner_error"] = result["planner_total_gib"] / result["memory_reserved_gib"] - 1
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
