"""Benchmark: clusterctl's rows of issue 17, each as a ratio to `python -c "import typer"`, in one run.

Every command is a fresh process (what a user waits for), run interleaved with `import typer` in the
same round, so machine noise hits both alike; each row prints the median of the per-round ratios
and their spread (min-max). `report loss` is the ratio of a 100 MB metrics.jsonl to a 60 KB one
(time and peak memory). Goals are issue 17's.

The world (a temp dir, $CLUSTERCTL_REGISTRY): a registry of --runs runs (default 10,000) written
straight into SQLite, each with a run directory holding one codecarbon file per node (2 nodes) and a
short metrics.jsonl; the last 50 runs are active (25 running with a 20,000-line metrics.jsonl).
No Slurm on PATH: squeue/sacct fail at once, so Slurm is not what is measured. A first round warms
the page cache (and the report summaries the registry keeps; docs/reports.md).

    .venv/bin/python bench/bench_cli.py [--runs 10000] [--rounds 5] [--only status,energy,...] [--src DIR]

`--src DIR`: measure the clusterctl in another checkout (e.g. `git archive HEAD | tar -x -C DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADER = "timestamp,project_name,run_id,duration,emissions,energy_consumed,country_iso_code,pue\n"
PROFILES = ("a100x64", "a100x32", "h100x128", "slurm-local")
USERS = ("ann", "bob", "cyd")
FINALS = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def populate(src: Path, root: Path, n: int, active: int) -> Path:
    """A registry of `n` runs and their run directories (SQL inserts into a file the registry made)."""
    db = root / "registry.db"
    code = f"import sys; sys.path.insert(0, {str(src)!r}); from clusterctl.runs.registry import Registry; Registry(sys.argv[1]).close()"
    subprocess.run([sys.executable, "-c", code, str(db)], check=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    now = time.time()
    runs_dir = root / "runs"
    for i in range(n):
        is_active = i >= n - active
        state = ("RUNNING" if i % 2 else "PENDING") if is_active else FINALS[i % 4]
        run_id = f"bench-{i:05d}"
        run_dir = runs_dir / run_id
        created = now - (n - i) * 600  # ten minutes apart: 10,000 runs span ~70 days
        gpus = 64
        plan = {"global_batch": 64, "world_size": gpus, "estimate": {"energy_kwh": 12.5, "co2_kg": 0.7}}
        config = {"model": "tiny", "global_batch": 64, "steps": 100_000}
        conn.execute(
            "INSERT INTO runs (run_id, name, profile, executor, run_dir, created_at, user, gpus, total_steps, state,"
            " config, plan) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                run_id,
                f"bench{i % 50}",
                PROFILES[i % len(PROFILES)],
                "slurm",
                str(run_dir),
                created,
                USERS[i % len(USERS)],
                gpus,
                100_000,
                state,
                json.dumps(config),
                json.dumps(plan),
            ),
        )
        job_state = state if not is_active else ("RUNNING" if state == "RUNNING" else "PENDING")
        job_id = str(100_000 + i)
        conn.execute(
            "INSERT INTO jobs (job_id, run_id, attempt, kind, submitted_at, state, started_at, ended_at, elapsed_s,"
            " alloc_gpus, requeues) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                job_id,
                run_id,
                1,
                "submit",
                created,
                job_state,
                created + 60 if state != "PENDING" else None,
                created + 3660 if not is_active else None,
                3600.0 if not is_active and i % 3 else None,  # a third timed by the registry's clock
                gpus if not is_active else None,
                i % 7 == 0,
            ),
        )
        (run_dir / "energy").mkdir(parents=True)
        if state != "PENDING":
            for node in range(2):
                (run_dir / "energy" / f"node{node:03d}-{job_id}-r0.csv").write_text(
                    HEADER + f"t,p,r,3600,{0.05 + i % 5 * 0.01:.2f},{1.0 + i % 3 * 0.5},FRA,1.2\n"
                )
            lines = 20_000 if is_active else 10
            with (run_dir / "metrics.jsonl").open("w") as f:
                f.writelines(
                    f'{{"step": {s}, "loss": {5.0 / (1 + s):.6f}, "samples_per_s": 1234.5}}\n' for s in range(lines)
                )
    conn.execute("COMMIT")
    conn.close()
    return db


def loss_run(db: Path, root: Path, name: str, size: int) -> None:
    """A run whose metrics.jsonl is about `size` bytes (one record per step, four objectives)."""
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    line = '{{"step": {s}, "loss": {l:.6f}, "itc": {a:.6f}, "mlm": {b:.6f}, "caption": {c:.6f}, "lr": 0.0003, "samples_per_s": 1234.5}}\n'
    with (run_dir / "metrics.jsonl").open("w") as f:
        written, s = 0, 0
        while written < size:
            text = line.format(s=s, l=9 / (1 + s), a=3 / (1 + s), b=4 / (1 + s), c=2 / (1 + s))
            f.write(text)
            written += len(text)
            s += 1
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(
        "INSERT INTO runs (run_id, name, profile, executor, run_dir, created_at, user, gpus, total_steps, state,"
        " config, plan) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (name, name, "a100x64", "slurm", str(run_dir), time.time(), "ann", 8, s, "COMPLETED", "{}", "{}"),
    )
    conn.close()


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one process, run in the checkout measured (`python -m` puts
    the working directory first on the path)."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    p.stderr and p.stderr.close()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}): {err.strip()}")
    return dt, usage.ru_maxrss / 1024


CLUSTERCTL = [sys.executable, "-m", "clusterctl"]
# (key, label, argv, goal as a ratio to import typer)
ROWS = [
    ("status", "status (10,000 runs)", ["status"], 2.0),
    ("all-json", "status --all --json", ["status", "--all", "--json"], 3.0),
    ("gpu-month", "report gpu-hours --by month", ["report", "gpu-hours", "--by", "month"], 3.0),
    ("energy", "report energy", ["report", "energy"], 3.0),
    ("plan", "plan (a100x64, crossmodal-xl)", ["plan", "--profile", "a100x64", "--model", "crossmodal-xl"], 2.0),
    ("estimate", "estimate", ["estimate", "--profile", "a100x32", "--duration", "6w"], 2.0),
    ("help", "--help", ["--help"], 2.0),
]


def measure(
    rounds: int = 5,
    runs: int = 10_000,
    active: int = 50,
    only: set[str] | None = None,
    src: Path = REPO,
    loss_mb: float = 100.0,
    world: Path | None = None,
    say=print,
) -> dict:
    """Build (or reuse) the world and time every picked row against `import typer`, interleaved, in
    shuffled order each round. Returns times, ratios and peak RSS per row key."""
    rows = [r for r in ROWS if not only or r[0] in only]
    with_loss = not only or "loss" in only
    src = src.resolve()
    tmp = world or Path(tempfile.mkdtemp(prefix="bench-cli-"))
    try:
        t = time.perf_counter()
        db = tmp / "registry.db"
        if not db.exists():
            tmp.mkdir(parents=True, exist_ok=True)
            db = populate(src, tmp, runs, active)
            loss_run(db, tmp, "loss-60k", 60_000)
            loss_run(db, tmp, "loss-100m", int(loss_mb * 1e6))
            say(f"world: {runs:,} runs ({active} active), written in {time.perf_counter() - t:.1f} s")
        nobin = tmp / "nobin"
        nobin.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {
            "CLUSTERCTL_REGISTRY": str(db),
            "PATH": str(nobin),
            "COLUMNS": "200",
            "PYTHONPATH": str(src),
            # modules load from bytecode as in an installed clusterctl (typer's always does), kept
            # out of the checkout; the warm-up round writes it
            "PYTHONPYCACHEPREFIX": str(tmp / "pycache"),
        }
        typer_ = [sys.executable, "-c", "import typer"]
        cmds = {key: [*CLUSTERCTL, *argv] for key, _, argv, _ in rows}
        if with_loss:
            cmds["loss-60k"] = [*CLUSTERCTL, "report", "loss", "loss-60k"]
            cmds["loss-100m"] = [*CLUSTERCTL, "report", "loss", "loss-100m"]
        for argv in [typer_, *cmds.values()]:  # warm the page cache (and the registry's summaries)
            timed(argv, env)
        times: dict[str, list[float]] = {k: [] for k in ["typer", *cmds]}
        ratios: dict[str, list[float]] = {k: [] for k in cmds}
        rss: dict[str, list[float]] = {k: [] for k in cmds}
        order = list(cmds)
        for _ in range(rounds):
            random.shuffle(order)
            ty = timed(typer_, env)[0]
            times["typer"].append(ty)
            for key in order:
                dt, mem = timed(cmds[key], env)
                times[key].append(dt)
                rss[key].append(mem)
                ratios[key].append(dt / ty)
        return {"rows": rows, "with_loss": with_loss, "times": times, "ratios": ratios, "rss": rss}
    finally:
        if world is None:
            shutil.rmtree(tmp, ignore_errors=True)


def rows(rounds: int = 5) -> list[dict]:
    """Issue 17's clusterctl rows for bench/run_all.py (name, ratio, spread, goal, ok, detail)."""
    m = measure(rounds, say=lambda _: None)
    med = {k: statistics.median(v) for k, v in m["times"].items()}
    out = []
    for key, label, _, goal in m["rows"]:
        r = m["ratios"][key]
        out.append(
            {
                "name": f"clusterctl {label} vs `import typer`",
                "ratio": statistics.median(r),
                "spread": (min(r), max(r)),
                "goal": f"<= {goal:g}x",
                "ok": statistics.median(r) <= goal,
                "detail": f"{med[key] * 1000:.0f} ms vs {med['typer'] * 1000:.0f} ms",
            }
        )
    if m["with_loss"]:
        lr = [a / b for a, b in zip(m["times"]["loss-100m"], m["times"]["loss-60k"], strict=True)]
        mem = statistics.median(m["rss"]["loss-100m"]) / statistics.median(m["rss"]["loss-60k"])
        out.append(
            {
                "name": "clusterctl report loss, 100 MB metrics.jsonl vs 60 KB",
                "ratio": statistics.median(lr),
                "spread": (min(lr), max(lr)),
                "goal": "<= 2x",
                "ok": statistics.median(lr) <= 2 and mem <= 2,
                "detail": f"peak memory {mem:.2f}x ({statistics.median(m['rss']['loss-100m']):.0f} MiB)",
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--active", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated row keys: " + ",".join(k for k, *_ in ROWS) + ",loss")
    ap.add_argument("--src", type=Path, default=REPO, help="the checkout whose clusterctl is measured")
    ap.add_argument("--loss-mb", type=float, default=100.0)
    ap.add_argument("--world", type=Path, help="build the world here, or reuse the one there (kept)")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    m = measure(args.rounds, args.runs, args.active, only, args.src, args.loss_mb, args.world)
    times, ratios, rss = m["times"], m["ratios"], m["rss"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"python -c 'import typer': median {med['typer'] * 1000:.0f} ms over {args.rounds} rounds (interleaved)")
    print(f"{'clusterctl':<34} {'median':>8} {'ratio':>7} {'spread':>13} {'goal':>6}  ")
    for key, label, _, goal in m["rows"]:
        r = ratios[key]
        ok = "ok" if statistics.median(r) <= goal else "OVER"
        print(
            f"{label:<34} {med[key] * 1000:>6.0f}ms {statistics.median(r):>6.2f}x "
            f"{min(r):>5.2f}-{max(r):<5.2f}x {goal:>5.1f}x  {ok}"
        )
    if m["with_loss"]:
        lr = [a / b for a, b in zip(times["loss-100m"], times["loss-60k"], strict=True)]
        mem = statistics.median(rss["loss-100m"]) / statistics.median(rss["loss-60k"])
        print(
            f"{'report loss 100 MB / 60 KB':<34} {med['loss-100m'] * 1000:>6.0f}ms {statistics.median(lr):>6.2f}x "
            f"{min(lr):>5.2f}-{max(lr):<5.2f}x {2.0:>5.1f}x  {'ok' if statistics.median(lr) <= 2 else 'OVER'}"
        )
        print(
            f"  (60 KB: {med['loss-60k'] * 1000:.0f} ms, {statistics.median(rss['loss-60k']):.0f} MiB peak; "
            f"100 MB: {statistics.median(rss['loss-100m']):.0f} MiB peak, {mem:.2f}x)"
        )


if __name__ == "__main__":
    main()
