"""`clusterctl watch [RUN ...]` (and `submit --watch`): a live view of runs until they finish.

Each refresh makes one batched squeue call for every watched run (plus one sacct only when a job
ended or was requeued; clusterctl.cmd_status), reads only the new bytes of each run's metrics.jsonl
and rank-0 log (clusterctl.watch_view.Tail), and redraws a rich Live view sized for 80x24. `q` or Ctrl-C leaves cleanly (the terminal is restored);
when stdout is not a terminal it prints plain progress lines instead. When every watched run has
finished it prints a one-screen summary and exits (0 if all completed).
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from vltrain.errors import UserError


PLAIN_HEARTBEAT_S = 60.0  # without a terminal: a line per run at least this often, even if it did not move


class Keys:
    """Single key presses from a terminal without Enter (cbreak); restores the terminal on exit."""

    def __init__(self) -> None:
        self.fd = None
        self.saved = None
        try:
            if sys.stdin.isatty():
                import termios
                import tty

                self.fd = sys.stdin.fileno()
                self.saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
        except Exception:  # not a real terminal (pipes, some CI shells): no key handling
            self.fd = None

    def wait(self, seconds: float) -> str | None:
        """Sleep up to `seconds`; return a key pressed meanwhile."""
        if self.fd is None:
            time.sleep(seconds)
            return None
        ready, _, _ = select.select([self.fd], [], [], seconds)
        return os.read(self.fd, 1).decode(errors="ignore") if ready else None

    def restore(self) -> None:
        if self.fd is not None and self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def _energy(run_dir: Path, cache: dict) -> tuple[float, float]:
    """Run totals from the per-node energy files, re-read only when one of them changed."""
    from clusterctl.reports import read_energy

    files = sorted((run_dir / "energy").glob("node*-*.csv"))
    key = tuple((p.name, p.stat().st_mtime_ns) for p in files if p.exists())
    if cache.get("key") != key:
        readings = read_energy(run_dir)
        cache.update(key=key, value=(sum(r.energy_kwh for r in readings), sum(r.co2_kg for r in readings)))
    return cache.get("value", (0.0, 0.0))


def _eval(run_dir: Path) -> dict:
    try:
        ev = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return {}
    flat = {}
    for side in ("i2t", "t2i"):
        for k in ("R@1", "R@5"):
            if isinstance(ev.get(side), dict) and isinstance(ev[side].get(k), (int, float)):
                flat[f"{side} {k}"] = ev[side][k]
    if isinstance(ev.get("cider"), (int, float)):
        flat["CIDEr"] = ev["cider"]
    return flat


def watch_runs(run_ids: list[str], interval: float = 2.0) -> int:
    """The live loop; returns the exit code (0: all completed or the user quit, 1: a run did not complete)."""
    from clusterctl.cmd_status import _refresh, summarize, count_events
    from clusterctl.output import console
    from clusterctl.registry import Registry
    from clusterctl.rundir import task_log
    from clusterctl.watch_view import FINAL, RunView, Tail, fits_panels, plain_line, run_panel, runs_table, summary_lines

    reg = Registry()
    runs = [reg.get_run(r) for r in run_ids]
    views = {r.run_id: RunView(Tail(Path(r.run_dir) / "metrics.jsonl"), Tail(Path("/nonexistent"))) for r in runs}
    energy_cache: dict[str, dict] = {r.run_id: {} for r in runs}
    tty = sys.stdout.isatty()
    keys = Keys() if tty else None
    last_plain: dict[str, tuple] = {}
    live = None
    quit_ = False
    rows: list[dict] = []
    try:
        if tty:
            from rich.console import Group
            from rich.live import Live
            from rich.text import Text

            live = Live(console=console, auto_refresh=False, screen=True, transient=False)
            live.start()
        while True:
            now = time.time()
            states, jobs, view = _refresh(reg, runs, None, now)
            failed = [r for r in runs if states[r.run_id] in ("FAILED", "NODE_FAIL")]
            if failed:
                from clusterctl.retry import reconcile

                if reconcile(reg, failed):
                    continue
            rows = []
            for r in runs:
                r.state = states[r.run_id]
                v = views[r.run_id]
                v.feed_metrics(v.metrics.lines())
                if jobs[r.run_id]:
                    log = task_log(Path(r.run_dir), jobs[r.run_id][-1].job_id, 0)
                    if v.log.path != log:
                        v.log = Tail(log)
                    v.feed_log(v.log.lines())
                v.energy_kwh, v.co2_kg = _energy(Path(r.run_dir), energy_cache[r.run_id])
                rows.append(summarize(r, jobs[r.run_id], v.last or None,
                                      count_events(Path(r.run_dir) / "events.jsonl", "resume"), now))
            done = all(row["state"] in FINAL for row in rows)
            if live is not None:
                width = min(console.width, 100)
                footer = Text(f"{view.source} | refresh {interval:g}s | q quits" + (" | " + "; ".join(view.notes) if view.notes else ""),
                              style="dim", no_wrap=True, overflow="ellipsis")
                if fits_panels(len(rows), console.height):
                    body = [run_panel(row, views[row["run_id"]], width) for row in rows]
                else:  # more runs than full panels fit: one line each
                    body = [runs_table(rows, views, width, console.height)]
                live.update(Group(*body, footer), refresh=True)
            else:
                for row in rows:  # a line when the run moved (state, step, requeues), else once a minute
                    v = views[row["run_id"]]
                    key = (row["state"], v.last.get("step", row.get("step")), row.get("requeues"))
                    said_key, said_at = last_plain.get(row["run_id"], (None, 0.0))
                    if key != said_key or now - said_at >= PLAIN_HEARTBEAT_S:
                        print(plain_line(row, v), flush=True)
                        last_plain[row["run_id"]] = (key, now)
            if done:
                break
            key = keys.wait(interval) if keys else (time.sleep(interval) or None)
            if key in ("q", "Q"):
                quit_ = True
                break
    except KeyboardInterrupt:
        quit_ = True
    finally:
        if live is not None:
            live.stop()
        if keys is not None:
            keys.restore()
    if quit_:
        print("stopped watching; the runs go on (clusterctl status)", flush=True)
        return 0
    evals = {r.run_id: _eval(Path(r.run_dir)) for r in runs}
    for line in summary_lines(rows, views, evals):
        print(line, flush=True)
    return 0 if all(row["state"] == "COMPLETED" for row in rows) else 1


def watch(
    runs: Optional[list[str]] = typer.Argument(None, help="Run ids, id prefixes or names (default: the active runs)."),
    interval: float = typer.Option(2.0, "--interval", "-n", min=0.2, max=3600, help="Seconds between refreshes."),
) -> None:
    """Live view of runs: state, nodes, requeues, steps with ETA, loss sparklines, speed, GPU-hours, energy, log."""
    from clusterctl.registry import Registry

    if not runs:
        active = [r.run_id for r in Registry().list_runs(include_finished=False)]
        if not active:
            raise UserError("RUN: no active runs to watch; allowed: run ids (clusterctl status --all lists them)")
        runs = active
    raise typer.Exit(watch_runs(runs, interval))
