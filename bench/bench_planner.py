"""Benchmark: does `clusterctl plan` predict what a calibrated CPU cluster measures? (issue 29, point 2)

A copy of the slurm-local profile is calibrated (`clusterctl profiles calibrate`: one Slurm job on its
2 nodes), then each row is planned (`clusterctl plan --json`: its "cpu_prediction") and run for real
on slurm-local (`clusterctl submit --wait`): the tiny preset and a ~50M-parameter one (the `small`
preset at 64 px: 50.67M parameters, 16 patches; at 224 px it has 50.74M, only the image positions
differ, and a step costs 2.3x the FLOPs), each under DeepSpeed ZeRO-2 and FSDP (zero_stage 2), at
accumulation 1 and 8 with the same global batch. Measured per row (metrics.jsonl: every step logged;
the median over the steps after the first): the step time less the trainer's own data wait
(step_time_s - data_wait_s: the time blocked on the loader, which the planner does not predict: on
CPU the rank decodes its own images, whose cost is the data's, not the machine's; printed beside it,
with the step time it is part of), and mem_gib, the peak resident set of rank 0 (ru_maxrss, what the
trainer reports on CPU; the ranks hold the same). Tiny runs 30 steps of ~0.2 s (docs/planning.md
says what 10 gave). Prints predicted vs measured per row and ends with one line `max error: step time
X%, peak memory Y%`.

    .venv/bin/python bench/bench_planner.py [--recalibrate] [--profile FILE] [--only tiny-ds-1,...] [--keep DIR]

--profile: a calibrated profile to use as it is (else a fresh copy of slurm-local is calibrated).
Needs the local Slurm cluster (`make slurm-up`; SLURM_CONF as scripts/slurm-local.sh says).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
SLURM_CONF = "/var/tmp/clusterctl-slurm/etc/slurm.conf"
SMALL_IMAGE = 64  # px: the small preset's 16 patches keep a step ~1-3 s on one core
# The planner counts every micro batch's text at model.max_text_len (it cannot see the captions); the
# trainer pads a batch to its longest caption, up to 47 pieces in the synthetic data. The small preset's
# 64 would leave a quarter of the predicted text (and of its vocabulary heads) unrun: it runs at 48, as
# tiny does, so that the rows measure the rates, not the captions' lengths.
SMALL_TEXT = 48

MODELS = (("tiny", 64, 30), ("small", 16, 5))  # (model, global batch, steps)
# (row, model, global batch, steps, strategy, accumulation)
ROWS = [(f"{m}-{s}-{a}", m, gb, steps, s, a) for m, gb, steps in MODELS for s in ("ds", "fsdp") for a in (1, 8)]


def make_data(root: Path) -> Path:
    """Synthetic 32 px shards and a 1,000-piece tokenizer (the trainer resizes to the model's size); kept
    from an earlier run in the same --keep directory."""
    data = root / "synth"
    if (data / "tok.model").exists():
        return data
    vl = str(BIN / "vltrain")
    subprocess.run(
        [vl, "data", "synth", "--out", str(data), "--n", "800", "--shards", "4", "--holdout", "32"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [vl, "tokenizer", "train", "--shards", str(data), "--vocab-size", "1000", "--out", str(data / "tok.model")],
        check=True,
        capture_output=True,
    )
    return data


def vocab_32k(data: Path) -> Path:
    """A 32,000-piece tokenizer for the small preset (the synthetic captions fill ~1,000 pieces): trained on
    the captions and Python's standard library sources, ~10 s; only the vocabulary size matters here."""
    import sysconfig

    from vltrain.tokenizer import shard_captions, train_tokenizer

    def texts():
        yield from shard_captions(data)
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            yield from f.read_text(errors="ignore").splitlines()

    out = data / "tok32k.model"
    if out.exists():
        return out
    train_tokenizer(texts(), 32000, out)
    return out


def write_config(root: Path, model: str, data: Path, global_batch: int, steps: int) -> Path:
    """A short fp32 run: every step logged, no checkpoint but the last, the final evaluation on 32 pairs."""
    from vltrain.presets import get_preset

    if model == "small":
        table = dataclasses.asdict(get_preset("small")) | {
            "name": f"small-{SMALL_IMAGE}px",
            "image_size": SMALL_IMAGE,
            "max_text_len": SMALL_TEXT,
        }
        head = "[model]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items() if v is not None)
        tok = vocab_32k(data)
    else:
        head, tok = "", data / "tok.model"
    path = root / f"{model}.toml"
    body = (
        f'global_batch = {global_batch}\nsteps = {steps}\nprecision = "fp32"\nlog_every = 1\n'
        f"checkpoint_every = 0\neval_every = 0\n"
        + ('model = "tiny"\n' if model == "tiny" else "")
        + f'[data]\nshards = "{data}"\ntokenizer = "{tok}"\n[optim]\nlr = 1e-3\nwarmup_steps = 2\n'
    )
    path.write_text(body + head)
    return path


def env_for(root: Path) -> dict[str, str]:
    env = dict(os.environ) | {"CLUSTERCTL_REGISTRY": str(root / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(root / "runs")}
    if "SLURM_CONF" not in env and Path(SLURM_CONF).exists():
        env["SLURM_CONF"] = SLURM_CONF
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "clusterctl"), *args], env=env, capture_output=True, text=True)


def calibrated_profile(root: Path, env: dict[str, str]) -> Path:
    """A copy of slurm-local named slurm-local-cal, calibrated by `clusterctl profiles calibrate`."""
    path = root / "slurm-local-cal.toml"
    text = (REPO / "cluster_profiles" / "slurm-local.toml").read_text()
    path.write_text(text.replace('name = "slurm-local"', 'name = "slurm-local-cal"', 1))
    return calibrate(path, env)


def calibrate(path: Path, env: dict[str, str]) -> Path:
    """(Re)write the profile's [calibration] table with one Slurm job on its nodes."""
    r = cli(env, "profiles", "calibrate", str(path))
    if r.returncode != 0:
        raise SystemExit(f"calibrate failed: {r.stderr.strip() or r.stdout.strip()}")
    return path


def overrides(strategy: str, accumulation: int) -> list[str]:
    sets = [f"accumulation={accumulation}", "zero_stage=2"]
    sets += ["parallel.strategy=fsdp"] if strategy == "fsdp" else ["parallel.strategy=deepspeed"]
    return [a for s in sets for a in ("--set", s)]


def predicted(env: dict[str, str], profile: Path, config: Path, sets: list[str]) -> dict[str, Any]:
    r = cli(env, "plan", "--profile", str(profile), "--config", str(config), *sets, "--json")
    if r.returncode != 0:
        raise SystemExit(f"plan failed: {r.stderr.strip()}")
    pred = json.loads(r.stdout).get("cpu_prediction")
    if not pred:
        raise SystemExit(f"plan --json has no cpu_prediction for {profile}")
    return pred


def measured(env: dict[str, str], profile: Path, config: Path, sets: list[str], name: str) -> dict[str, Any]:
    """Run it for real; the median step time after the first step and rank 0's peak resident set."""
    r = cli(
        env, "submit", "--profile", str(profile), "--config", str(config), *sets, "--name", name, "--json", "--wait"
    )
    head, _ = json.JSONDecoder().raw_decode(r.stdout.lstrip())
    if r.returncode != 0:
        raise SystemExit(f"run {name} failed ({r.returncode}): see {head.get('run_dir')}\n{r.stderr[-2000:]}")
    lines = (Path(head["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    rows = {rec["step"]: rec for rec in map(json.loads, filter(None, lines))}
    steps = [rows[s] for s in sorted(rows)]
    return {
        "step_time_s": statistics.median(r["step_time_s"] - r["data_wait_s"] for r in steps[1:]),
        "data_wait_s": statistics.median(r["data_wait_s"] for r in steps[1:]),
        "with_data_s": statistics.median(r["step_time_s"] for r in steps[1:]),
        "mem_gib": max(r["mem_gib"] for r in steps),
        "run_dir": head["run_dir"],
    }


def error(pred: float, meas: float) -> float:
    return abs(pred - meas) / meas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, help="a calibrated profile file (default: calibrate a copy of slurm-local)")
    ap.add_argument("--only", default="", help="rows to run, comma-separated (default: all 8)")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    ap.add_argument(
        "--recalibrate",
        action="store_true",
        help="calibrate again before every row: on a shared machine the row and its calibration then see the "
        "same load (the calibration and the run are the two sides of each row, interleaved); --profile is then "
        "not used: a fresh copy of slurm-local is calibrated",
    )
    args = ap.parse_args()
    if shutil.which("sinfo") is None:
        raise SystemExit("bench_planner: needs the local Slurm cluster (make slurm-up)")
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-planner-"))
    root.mkdir(parents=True, exist_ok=True)
    env = env_for(root)
    try:
        profile = calibrated_profile(root, env) if args.profile is None or args.recalibrate else args.profile
        calibrated_rows = 0
        data = make_data(root)
        configs = {m: write_config(root, m, data, gb, steps) for m, gb, steps in MODELS}
        wanted = set(filter(None, args.only.split(",")))
        print(
            f"{'row':<14} {'step s pred':>11} {'meas':>7} {'err':>6} {'data s':>7} {'with data':>9}   "
            f"{'mem GiB pred':>12} {'meas':>6} {'err':>6}"
        )
        worst_t = worst_m = 0.0
        for row, model, _, _, strategy, acc in ROWS:
            if wanted and row not in wanted:
                continue
            sets = overrides(strategy, acc)
            if args.recalibrate and calibrated_rows:
                calibrate(profile, env)  # the bench's own copy (calibrated_profile)
            calibrated_rows += 1
            pred = predicted(env, profile, configs[model], sets)
            meas = measured(env, profile, configs[model], sets, f"bench-{row}")
            et, em = error(pred["step_time_s"], meas["step_time_s"]), error(pred["peak_rss_gib"], meas["mem_gib"])
            worst_t, worst_m = max(worst_t, et), max(worst_m, em)
            print(
                f"{row:<14} {pred['step_time_s']:>11.3f} {meas['step_time_s']:>7.3f} {et:>6.1%} "
                f"{meas['data_wait_s']:>7.3f} {meas['with_data_s']:>9.3f}   "
                f"{pred['peak_rss_gib']:>12.3f} {meas['mem_gib']:>6.3f} {em:>6.1%}",
                flush=True,
            )
        print(f"max error: step time {worst_t:.1%}, peak memory {worst_m:.1%}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
