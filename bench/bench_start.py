"""Benchmark: time to first step of the demo (local profile) and of a 2-node slurm-local run.

What a user waits for between typing `clusterctl submit` and the first optimizer step's metrics line:
clusterctl's start-up and plan, the launcher (submitit's local executor, or sbatch + Slurm's
scheduling + srun on 2 nodes), Python and library imports in every rank, data and tokenizer, the
model, DeepSpeed's engine (its gloo/shm comm op comes from the per-environment extension cache), and
the first step itself. Each is a fresh `clusterctl submit` of configs/tiny.toml for 2 steps
(log_every 1) on synthetic shards made once; its figure is the first metrics line's time minus the
moment submit was launched, split at the trainer's `start` event (before: launch and start-up; after:
data, model, engine and the first step). The floor is a fresh `python -c "import torch, deepspeed"`,
timed in the same rounds (interleaved), so each row is also a ratio to what any PyTorch + DeepSpeed
process pays before doing anything.

    .venv/bin/python bench/bench_start.py [--rounds 5] [--only demo,slurm] [--detail]

--detail also prints where each launcher's time goes, phase by phase (medians over the rounds): submit's
share (the CLI's start, the plan and checks, writing the run and sbatch; measured as `clusterctl --help`
and `submit --dry-run` beside each submit), the launcher's (from sbatch's return to the rank-0 process's
creation: Slurm's scheduling, the batch script, srun), and the trainer's `startup` event
(vltrain.startup: Python and unpickling the job, imports, the rendezvous, tokenizer, engine, loader,
energy tracker, the first step).

The slurm row needs the local cluster (`make slurm-up`; SLURM_CONF as scripts/slurm-local.sh says);
without it the row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
SLURM_CONF = "/var/tmp/clusterctl-slurm/etc/slurm.conf"


def make_data(root: Path) -> Path:
    """Synthetic shards and a tokenizer, made once (what `make demo` makes, smaller)."""
    data = root / "synth"
    vl = str(BIN / "vltrain")
    synth = ["data", "synth", "--out", str(data), "--n", "600", "--shards", "4", "--holdout", "100"]
    subprocess.run([vl, *synth, "--image-size", "32"], check=True, capture_output=True)
    subprocess.run(
        [vl, "tokenizer", "train", "--shards", str(data), "--vocab-size", "1000", "--out", str(data / "tok.model")],
        check=True,
        capture_output=True,
    )
    return data


def slurm_env() -> dict[str, str] | None:
    """The environment that reaches the local Slurm cluster, or None when it is not up."""
    env = dict(os.environ)
    if "SLURM_CONF" not in env and Path(SLURM_CONF).exists():
        env["SLURM_CONF"] = SLURM_CONF
    if shutil.which("sinfo") is None:
        return None
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    return env if r.returncode == 0 and "idle" in r.stdout else None


def first_line(path: Path, deadline: float) -> dict[str, Any] | None:
    while time.time() < deadline:
        try:
            with path.open(encoding="utf-8") as f:
                line = f.readline()
            if line.endswith("\n"):
                return json.loads(line)
        except OSError:
            pass
        time.sleep(0.05)
    return None


def start_event(path: Path) -> float | None:
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            e = json.loads(line)
            if e.get("event") in ("start", "resume"):
                return float(e["time"])
    except (OSError, ValueError):
        pass
    return None


def submit_command(profile: str, data: Path) -> list[str]:
    cmd = [str(BIN / "clusterctl"), "submit", "--profile", profile, "--steps", "2", "--json"]
    cmd += ["--set", "log_every=1", "--set", "eval_every=0", "--set", "checkpoint_every=0"]
    return [*cmd, "--set", f"data.shards={data}", "--set", f"data.tokenizer={data / 'tok.model'}"]


def time_to_first_step(
    profile: str, data: Path, work: Path, env: dict[str, str], detail: dict[str, float] | None = None
) -> tuple[float, float]:
    """(seconds from launching submit to the first metrics line, of which before the trainer's start).
    `detail`: filled with the phases (seconds) of `phase_split`."""
    work.mkdir(parents=True, exist_ok=True)
    env = env | {"CLUSTERCTL_REGISTRY": str(work / "registry.db")}
    t0 = time.time()
    r = subprocess.run(submit_command(profile, data), cwd=work, env=env, capture_output=True, text=True, timeout=300)
    t_submit = time.time()
    if r.returncode != 0:
        raise RuntimeError(f"submit --profile {profile} failed: {r.stderr.strip()[-400:]}")
    run_dir = Path(json.loads(r.stdout)["run_dir"])
    first = first_line(run_dir / "metrics.jsonl", t0 + 600)
    if first is None:
        raise RuntimeError(f"{profile}: no first step within 600 s ({run_dir})")
    started = start_event(run_dir / "events.jsonl") or first["time"]
    wait_until_ended(run_dir)
    if detail is not None:
        detail |= phase_split(run_dir, t0, t_submit, first["time"])
    return first["time"] - t0, started - t0


def phase_split(run_dir: Path, t0: float, t_submit: float, first_metrics: float) -> dict[str, float]:
    """Where one run's time to first step went (seconds by phase, in order): submit until its job was
    handed over (the submitted pickle's ctime: submitit moves it into the job's folder once sbatch, or
    the local executor, returned), the launcher until the rank-0 process existed, the trainer's own
    `startup` phases (rank 0), and writing the first metrics line. Submit's own end overlaps the job."""
    pickles = sorted(run_dir.glob("submitit/*/*_submitted.pkl"))
    handed = pickles[0].stat().st_ctime if pickles else None
    startup = next((e for e in events(run_dir) if e.get("event") == "startup"), None)
    out: dict[str, float] = {}
    if handed is not None:
        out["submit: until the job is handed over"] = handed - t0
    if startup is not None and startup.get("process_started") and handed is not None:
        out["launcher: to the rank-0 process's creation"] = startup["process_started"] - handed
    if startup is not None:
        out |= {f"rank 0: {k}": v for k, v in startup["phases"].items()}
        out["metrics line after the first step"] = first_metrics - startup["time"]
    out["(submit's whole run, overlapping the job)"] = t_submit - t0
    return out


def events(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError):
        return []


def cli_shares(profile: str, data: Path, work: Path, env: dict[str, str]) -> dict[str, float]:
    """submit's start and plan, timed beside the real submit: `clusterctl --help` (Python, typer, the
    CLI's modules) and `submit --dry-run` (that, the profile, config, plan and checks, and rendering the
    job without writing or submitting it)."""
    work.mkdir(parents=True, exist_ok=True)
    env = env | {"CLUSTERCTL_REGISTRY": str(work / "registry.db")}
    out = {}
    for name, cmd in (
        ("submit: CLI start (`clusterctl --help`)", [str(BIN / "clusterctl"), "--help"]),
        ("submit: + plan and checks (`submit --dry-run`)", [*submit_command(profile, data), "--dry-run"]),
    ):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=work, env=env, capture_output=True, check=True, timeout=300)
        out[name] = time.perf_counter() - t0
    return out


def wait_until_ended(run_dir: Path) -> None:
    """The 2-step run ends by itself; wait for its final checkpoint so rounds do not overlap."""
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if '"reason": "final"' in (run_dir / "events.jsonl").read_text(encoding="utf-8"):
                time.sleep(1.0)  # the process leaves after its final event
                return
        except OSError:
            pass
        time.sleep(0.2)


def extension_builds() -> dict[str, int]:
    """mtime of every built extension in this environment's cache (vltrain.distenv.extensions_dir)."""
    from vltrain.distenv import extensions_dir

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or extensions_dir(sys.prefix, os.environ, "cpu"))
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*.so")} if root.exists() else {}


def import_floor() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, deepspeed"], check=True, capture_output=True)
    return time.perf_counter() - t0


def rows(
    rounds: int = 5, only: tuple[str, ...] = ("demo", "slurm"), details: dict[str, list[dict[str, float]]] | None = None
) -> list[dict[str, Any]]:
    """One row per launcher: time to first step as a ratio to the import floor (median of the
    per-round ratios, min-max spread), with the seconds and the split at the trainer's start.
    `details`: filled per launcher with each round's phases (time_to_first_step's `detail`, cli_shares)."""
    root = Path(tempfile.mkdtemp(prefix="bench-start-"))
    try:
        data = make_data(root)
        launchers = {"demo": ("local", dict(os.environ))}
        senv = slurm_env() if "slurm" in only else None
        if senv is not None:
            launchers["slurm"] = ("slurm-local", senv)
        launchers = {k: v for k, v in launchers.items() if k in only}
        import_floor()  # warm the page cache for both sides
        got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in launchers}
        starts = rebuilds = 0
        for i in range(rounds):
            for name, (profile, env) in launchers.items():
                floor = import_floor()
                built = extension_builds()
                detail: dict[str, float] | None = (
                    {"floor: `import torch, deepspeed`": floor} if details is not None else None
                )
                total, before = time_to_first_step(profile, data, root / f"{name}-{i}", env, detail)
                got[name].append((total / floor, total, before))
                if details is not None and detail is not None:
                    detail["time to first step"] = total
                    detail |= cli_shares(profile, data, root / f"{name}-{i}-cli", env)
                    details.setdefault(name, []).append(detail)
                if built:  # the first start of a fresh environment builds it: that one is allowed
                    starts += 1
                    rebuilds += extension_builds() != built
        out = []
        for name, samples in got.items():
            ratios = [s[0] for s in samples]
            out.append(
                {
                    "name": f"time to first step, {'demo (local profile)' if name == 'demo' else '2-node slurm-local'}"
                    " vs `import torch, deepspeed`",
                    "ratio": statistics.median(ratios),
                    "spread": (min(ratios), max(ratios)),
                    "goal": None,
                    "ok": None,
                    "seconds": statistics.median(s[1] for s in samples),
                    "before_start_s": statistics.median(s[2] for s in samples),
                    "detail": f"{statistics.median(s[1] for s in samples):.1f} s, of which "
                    f"{statistics.median(s[2] for s in samples):.1f} s before the trainer's start event",
                }
            )
        out.append(
            {
                "name": "trainer starts that rebuilt DeepSpeed's comm op (after this environment's first)",
                "ratio": rebuilds / starts if starts else None,
                "spread": None,
                "goal": "0",
                "ok": rebuilds == 0 if starts else None,
                "note": f"{rebuilds} of {starts} starts",
                "detail": f"{rebuilds} of {starts} starts",
            }
        )
        if "slurm" in only and senv is None:
            out.append(
                {
                    "name": "time to first step, 2-node slurm-local",
                    "ratio": None,
                    "spread": None,
                    "goal": None,
                    "note": "the local Slurm cluster is not up (make slurm-up)",
                }
            )
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="demo,slurm")
    ap.add_argument("--detail", action="store_true", help="also print each launcher's phases (medians)")
    args = ap.parse_args()
    details: dict[str, list[dict[str, float]]] | None = {} if args.detail else None
    for r in rows(args.rounds, tuple(args.only.split(",")), details):
        if r["ratio"] is None or r["spread"] is None:
            print(f"{r['name']}: {r['note']}")
            continue
        lo, hi = r["spread"]
        print(
            f"{r['name']}: {r['ratio']:.1f}x ({lo:.1f}-{hi:.1f}) = {r['seconds']:.1f} s, of which "
            f"{r['before_start_s']:.1f} s before the trainer's start event"
        )

    for name, samples in (details or {}).items():
        print(f"\n{name}: where the time to first step goes (median of {len(samples)} rounds, seconds)")
        for line in detail_table(samples):
            print(line)


def detail_table(samples: list[dict[str, float]]) -> list[str]:
    """The phases in the order first seen, each as the median over the rounds that have it."""
    names = list(dict.fromkeys(k for s in samples for k in s))
    return [f"  {k:<52} {statistics.median(s[k] for s in samples if k in s):6.2f}" for k in names]


if __name__ == "__main__":
    main()
