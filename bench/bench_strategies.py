"""Step time of each parallel strategy vs DeepSpeed data parallel, same tiny config, same rank count.

Every layout trains the same config (the tiny preset, fp32, the same global batch, micro batch and
accumulation) through the real trainer (`torchrun -m vltrain.cli train`) on gloo; the step time is
the median of the trainer's own `step_time_s` over the steps after the first two (start-up, first
collectives). Layouts are run in alternating rounds (A B C ... A B C ...) so that load from other
processes hits them alike, and each is printed as a ratio to DeepSpeed DP at the same rank count,
measured in the same run. The ratios say what a strategy costs where it is not needed (a model this
small fits one rank): they are its overhead, not its benefit, which is memory on models that do not fit.

    OMP_NUM_THREADS=1 python bench/bench_strategies.py [--steps 8] [--rounds 3] [--ranks 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# (label, ranks, --set overrides); the first of each rank count is the reference
LAYOUTS = [
    ("deepspeed DP, ZeRO-2", 2, {"parallel.strategy": "deepspeed", "zero_stage": 2}),
    ("fsdp (zero_stage 2: params kept gathered)", 2, {"parallel.strategy": "fsdp", "zero_stage": 2}),
    ("fsdp (zero_stage 3: resharded after forward)", 2, {"parallel.strategy": "fsdp", "zero_stage": 3}),
    ("tensor parallel tp=2", 2, {"parallel.strategy": "fsdp", "parallel.tp": 2}),
    ("pipeline pp=2, 1F1B", 2, {"parallel.strategy": "fsdp", "parallel.pp": 2}),
    (
        "pipeline pp=2, interleaved 1F1B",
        2,
        {"parallel.strategy": "fsdp", "parallel.pp": 2, "parallel.pp_schedule": "interleaved1f1b"},
    ),
    ("deepspeed DP, ZeRO-2", 4, {"parallel.strategy": "deepspeed", "zero_stage": 2}),
    ("fsdp dp=4", 4, {"parallel.strategy": "fsdp", "zero_stage": 2}),
    ("tp=2 x pp=2", 4, {"parallel.strategy": "fsdp", "parallel.tp": 2, "parallel.pp": 2}),
]


def make_data(tmp: Path) -> tuple[str, str]:
    for args in (
        (
            "data",
            "synth",
            "--out",
            str(tmp / "data"),
            "--n",
            "600",
            "--shards",
            "4",
            "--holdout",
            "0",
            "--image-size",
            "32",
        ),
        ("tokenizer", "train", "--shards", str(tmp / "data"), "--vocab-size", "1000", "--out", str(tmp / "tok.model")),
    ):
        subprocess.run([str(BIN / "vltrain"), *args], check=True, capture_output=True)
    return str(tmp / "data"), str(tmp / "tok.model")


def run_layout(tmp: Path, n: int, ranks: int, sets: dict, steps: int, shards: str, tok: str) -> float:
    from vltrain.distenv import free_port

    run = tmp / f"run-{n}"
    base = {
        "model": "tiny",
        "precision": "fp32",
        "steps": steps,
        "global_batch": 16,
        "micro_batch": 4,  # accumulation = 16 / (4 x dp): the same samples per step whatever the layout
        "checkpoint_every": 0,
        "eval_every": 0,
        "log_every": 1,
        "data.shards": shards,
        "data.tokenizer": tok,
        "data.eval_shards": "",
    }
    args = []
    for k, v in (base | sets).items():
        args += ["--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}"]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    cmd += ["-m", "vltrain.cli", "train", "--run-dir", str(run), *args]
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "VLTRAIN_COUNTRY": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"layout {sets} on {ranks} ranks failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(m["step_time_s"] for m in rows if m["step"] > 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="*", default=[2, 4])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-strategies-"))
    shards, tok = make_data(tmp)
    layouts = [x for x in LAYOUTS if x[1] in args.ranks]
    times: dict[int, list[float]] = {i: [] for i in range(len(layouts))}
    n = 0
    for _ in range(args.rounds):
        for i, (_, ranks, sets) in enumerate(layouts):
            n += 1
            times[i].append(run_layout(tmp, n, ranks, sets, args.steps, shards, tok))
    print(f"tiny preset, fp32, global batch 16, {args.steps} steps, median step time over {args.rounds} rounds")
    print(f"{'layout':48s} {'ranks':>5s} {'s/step':>8s} {'vs DeepSpeed DP':>16s}  spread")
    ref: dict[int, float] = {}
    for i, (label, ranks, _) in enumerate(layouts):
        med = statistics.median(times[i])
        ref.setdefault(ranks, med)
        spread = f"{min(times[i]):.3f}-{max(times[i]):.3f}"
        print(f"{label:48s} {ranks:5d} {med:8.3f} {med / ref[ranks]:15.2f}x  {spread}")


if __name__ == "__main__":
    main()
