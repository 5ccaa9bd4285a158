"""Benchmark: `clusterctl status` with 10,000 runs in the registry vs `python -c "import typer"`.

Both commands run as fresh subprocesses, interleaved (one of each per round) so machine noise hits
both alike; the medians and their ratio are printed. Goal: ratio <= 3. `clusterctl profiles list`
runs in the same rounds as a reference: another light command (it reads and validates every profile
and draws a rich table), so a status slower than it is doing too much of its own.

The registry (in a temp dir, via $CLUSTERCTL_REGISTRY) holds 10,000 runs: 9,950 finished and 50
active (running or pending, 1-3 jobs each, a 20,000-line metrics.jsonl per running run). Slurm must
not be the bottleneck, so `--slurm` picks what squeue/sacct are:
  none   PATH without Slurm's tools: the calls fail at once and status says so (default when no
         cluster answers);
  local  the real local cluster of scripts/slurm-local.sh (default when `sinfo` answers): the 50
         active runs' current jobs are real jobs held in its queue (submitted here, cancelled at
         the end), so status makes one real squeue round trip; sacct is called only for jobs
         squeue cannot answer for (ended or Slurm-requeued ones; none here: the steady state of
         runs queued or running). Its ~90 ms round trip to slurmdbd is paid once, when a job ends.

    .venv/bin/python bench/bench_status.py [--runs 10000] [--rounds 7] [--slurm auto|none|local]
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

BIN = Path(sys.executable).parent


def populate(path: Path, runs_dir: Path, n: int, active: int, live_ids: list[str] | None = None) -> None:
    """Fill a registry through its public API; the active runs get run directories with metrics.
    `live_ids`: real Slurm job ids to give the active runs' current jobs (else made-up ids)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from clusterctl.runs.registry import Registry
    from clusterctl.specs import RunRecord

    reg = Registry(path)
    now = time.time()
    config = {"model": "tiny", "global_batch": 64, "optim": {"lr": 3e-4, "warmup": 100}}
    finals = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    for i in range(n):
        is_active = i >= n - active
        state = ("RUNNING" if i % 2 else "PENDING") if is_active else finals[i % 4]
        run_id = f"bench-{i:05d}"
        run_dir = runs_dir / run_id
        reg.add_run(
            RunRecord(
                run_id=run_id,
                name=f"bench{i % 50}",
                profile="a100x64",
                executor="slurm",
                run_dir=str(run_dir),
                created_at=now - (n - i) * 60,
                user="bench",
                gpus=64,
                total_steps=100_000,
                state=state,
                config=config,
                plan={"global_batch": 64, "world_size": 64},
            )
        )
        attempts = 1 + i % 3 if is_active else 1
        for a in range(attempts):
            job_id = str(100_000 + i * 3 + a)
            if live_ids and is_active and a == attempts - 1:
                job_id = live_ids[i - (n - active)]
            job = reg.add_job(run_id, job_id, "submit" if a == 0 else "retry", submitted_at=now - 7200)
            if not is_active or a < i % 3:
                reg.update_job(
                    job.job_id,
                    run_id=run_id,
                    state=finals[i % 4] if not is_active else "NODE_FAIL",
                    elapsed_s=3600.0,
                    alloc_gpus=64,
                )
        if is_active and state == "RUNNING":
            run_dir.mkdir(parents=True)
            with (run_dir / "metrics.jsonl").open("w") as f:
                for s in range(20_000):
                    f.write(json.dumps({"step": s, "loss": 5.0 / (1 + s), "samples_per_s": 1234.5}) + "\n")
    reg.close()


def timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    return dt


def submit_held(count: int) -> list[str]:
    """`count` real jobs held in the local cluster's queue (what queued runs look like to squeue)."""
    ids = []
    for _ in range(count):
        r = subprocess.run(
            ["sbatch", "--parsable", "--hold", "-o", "/dev/null", "-J", "bench-status", "--wrap", "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            raise SystemExit(f"sbatch failed: {r.stderr.strip()}")
        ids.append(r.stdout.strip().split(";")[0])
    return ids


def cluster_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--active", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--slurm", choices=("auto", "none", "local"), default="auto")
    args = ap.parse_args()
    mode = args.slurm if args.slurm != "auto" else ("local" if cluster_answers() else "none")

    tmp = Path(tempfile.mkdtemp(prefix="bench-status-"))
    live_ids = submit_held(args.active) if mode == "local" else None
    try:
        db = tmp / "registry.db"
        t = time.perf_counter()
        populate(db, tmp / "runs", args.runs, args.active, live_ids)
        print(f"registry: {args.runs:,} runs ({args.active} active) written in {time.perf_counter() - t:.1f} s")
        nobin = tmp / "nobin"
        nobin.mkdir()
        path = os.environ["PATH"] if mode == "local" else str(nobin)
        env = os.environ | {"CLUSTERCTL_REGISTRY": str(db), "PATH": path, "COLUMNS": "200"}
        status = [str(BIN / "clusterctl"), "status"]
        typer_ = [sys.executable, "-c", "import typer"]
        floor = [str(BIN / "clusterctl"), "profiles", "list"]  # another light command, for reference
        timed(status, env), timed(typer_, env), timed(floor, env)  # warm the page cache
        st, ty, fl = [], [], []
        for _ in range(args.rounds):
            st.append(timed(status, env))
            ty.append(timed(typer_, env))
            fl.append(timed(floor, env))
        all_json = timed([*status, "--all", "--json"], env)
        ms, mt = statistics.median(st), statistics.median(ty)
        print(
            f"slurm tools: {'the local cluster (real squeue; the active runs are real held jobs)' if mode == 'local' else 'none on PATH (calls fail at once)'}"
        )
        print(f"{'command':<42} {'median':>9} {'min':>9}   ({args.rounds} rounds, interleaved)")
        label = 'python -c "import typer"'
        print(f"{label:<42} {mt * 1000:>7.0f}ms {min(ty) * 1000:>7.0f}ms")
        print(
            f"{'clusterctl profiles list (reference)':<42} {statistics.median(fl) * 1000:>7.0f}ms {min(fl) * 1000:>7.0f}ms"
        )
        print(f"{'clusterctl status':<42} {ms * 1000:>7.0f}ms {min(st) * 1000:>7.0f}ms")
        print(f"{'clusterctl status --all --json (once)':<42} {all_json * 1000:>7.0f}ms")
        print(
            f"ratio status / import typer: {ms / mt:.2f}x (goal <= 3x); "
            f"status / profiles list: {ms / statistics.median(fl):.2f}x"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if live_ids:
            subprocess.run(["scancel", *live_ids], timeout=30)


if __name__ == "__main__":
    main()
