"""The live view of runs (`watch`, `submit --watch`): a refresh loop drawn with rich, and its keys.

Each refresh makes one batched scheduler question for every watched run (clusterctl.runs.status),
reads only the new bytes of each run's metrics.jsonl and rank-0 log (render.watch_view.Tail), and
redraws a rich Live view sized for 80x24. `q` or Ctrl-C leaves cleanly (the terminal is restored);
when stdout is not a terminal it prints plain progress lines instead, and the same `note:` lines
`status` prints (a controller that does not answer, a read-only registry) whenever they change. A
refresh waits for Slurm at most $CLUSTERCTL_SLURM_TIMEOUT (the first one counted from the process's
start, backends.slurm.commands). When every watched run has
reached a final state (clusterctl.specs.FINAL_STATES: UNKNOWN is not one) it prints a one-screen
summary and returns 0 if all completed.
"""

from __future__ import annotations

import os
import select
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from clusterctl.specs import FINAL_STATES, RunState
from vltrain.rundir import RunDir

if TYPE_CHECKING:
    from clusterctl.runs.status import RunStatus

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


def watch_runs(run_ids: list[str], interval: float = 2.0) -> int:
    """The live loop; returns the exit code (0: all completed or the user quit, 1: a run did not complete)."""
    from clusterctl.render.output import console
    from clusterctl.render.safe import printable
    from clusterctl.render.watch_view import (
        RunView,
        Tail,
        fits_panels,
        plain_line,
        run_panel,
        runs_table,
        summary_lines,
    )
    from clusterctl.runs.artifacts import EnergyTotals, LatestEval, count_events, eval_summary
    from clusterctl.runs.lifecycle import refresh_and_retry
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.status import summarize, why_ended, with_skipped

    reg = Registry()
    runs = [reg.get_run(r) for r in run_ids]
    dirs = {r.run_id: RunDir(r.run_dir) for r in runs}
    views = {r.run_id: RunView(Tail(dirs[r.run_id].metrics), Tail(Path("/nonexistent"))) for r in runs}
    energy = {r.run_id: EnergyTotals(r.run_dir) for r in runs}
    latest_eval = {r.run_id: LatestEval(r.run_dir) for r in runs}
    tty = sys.stdout.isatty()
    keys = Keys() if tty else None
    last_plain: dict[str, tuple] = {}
    last_notes: list[str] = []
    fresh = None
    live = None
    quit_ = False
    rows: list[RunStatus] = []
    try:
        if tty:
            from rich.console import Group
            from rich.live import Live
            from rich.text import Text

            live = Live(console=console, auto_refresh=False, screen=True, transient=False)
            live.start()
        while True:
            now = time.time()
            fresh = refresh_and_retry(reg, runs, None, now)
            if fresh.retried:
                continue  # at once: the new jobs' states
            states, jobs = fresh.states, fresh.jobs
            rows = []
            for r in runs:
                r.state = states[r.run_id]
                v = views[r.run_id]
                v.feed_metrics(v.metrics.lines())
                if jobs[r.run_id]:
                    log = dirs[r.run_id].task_log(jobs[r.run_id][-1].job_id, 0)
                    if v.log.path != log:
                        v.log = Tail(log)
                    v.feed_log(v.log.lines())
                v.energy_kwh, v.co2_kg = energy[r.run_id].read()
                v.eval = latest_eval[r.run_id].read()
                resumes = count_events(dirs[r.run_id].events, "resume")
                ended, waits = why_ended(r, jobs[r.run_id]), fresh.waiting.get(r.run_id)
                rows.append(summarize(r, jobs[r.run_id], v.last or None, resumes, now, ended, waits))
            fresh.notes = with_skipped(fresh.notes)  # run files refused (safe_read): said like status says them
            done = all(row["state"] in FINAL_STATES for row in rows)
            if live is not None:
                width = min(console.width, 100)
                footer = Text(
                    f"{fresh.source} | refresh {interval:g}s | q quits"
                    + (" | " + "; ".join(printable(n) for n in fresh.notes) if fresh.notes else ""),
                    style="dim",
                    no_wrap=True,
                    overflow="ellipsis",
                )
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
                if fresh.notes != last_notes:  # the notes status prints, each time they change
                    for note in fresh.notes:
                        print(f"note: {printable(note)}", flush=True)
                    last_notes = list(fresh.notes)
            if done:
                break
            if keys is not None:
                pressed = keys.wait(interval)
            else:
                time.sleep(interval)
                pressed = None
            if pressed in ("q", "Q"):
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
    evals = {r.run_id: eval_summary(r.run_dir) for r in runs}
    for line in summary_lines(rows, views, evals):
        print(line, flush=True)
    said = set(last_notes) if live is None else set()  # the view is gone: what did not answer stays said
    for note in with_skipped(fresh.notes if fresh is not None else []):  # and eval.json, read just now
        if note not in said:
            print(f"note: {printable(note)}", flush=True)
    return 0 if all(row["state"] == RunState.COMPLETED for row in rows) else 1
