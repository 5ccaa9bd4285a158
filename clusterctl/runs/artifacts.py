"""What the trainer wrote into a run directory, read back for status, watch and reports (edge).

Reads are cheap however long the run: the last metrics line is read backwards from the end of the
file, energy totals are re-read only when a node's file changed. Layout: vltrain.rundir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vltrain.rundir import RunDir


def last_json_line(buf: bytes, complete_first: bool) -> dict[str, Any] | None:
    """The last line of `buf` that parses as a JSON object; a half-written last line is skipped.
    `complete_first`: buf starts at the start of the file (its first line is whole)."""
    lines = buf.split(b"\n")
    for line in reversed(lines if complete_first else lines[1:]):
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def tail_json(path: Path, chunk: int = 8192, max_bytes: int = 1 << 20) -> dict[str, Any] | None:
    """The last complete JSON line of a JSONL file, read backwards from the end in chunks."""
    try:
        f = path.open("rb")
    except OSError:
        return None
    with f:
        pos = f.seek(0, os.SEEK_END)
        end, buf = pos, b""
        while pos > 0 and end - pos < max_bytes:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            found = last_json_line(buf, complete_first=pos == 0)
            if found is not None:
                return found
    return None


def count_events(path: Path, kind: str) -> int:
    """How many events of `kind` the trainer wrote (events.jsonl is short: read whole)."""
    try:
        data = path.read_bytes()
    except OSError:
        return 0
    n = 0
    for line in data.splitlines():
        if kind.encode() in line:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            n += isinstance(ev, dict) and kind in (ev.get("event"), ev.get("kind"), ev.get("type"))
    return n


def eval_summary(run_dir: str | Path) -> dict[str, float]:
    """The run's latest held-out evaluation as flat figures ('i2t R@1', ..., 'CIDEr'); {} if none."""
    ev = read_eval(run_dir)
    flat = {}
    for side in ("i2t", "t2i"):
        for k in ("R@1", "R@5"):
            if isinstance(ev.get(side), dict) and isinstance(ev[side].get(k), (int, float)):
                flat[f"{side} {k}"] = ev[side][k]
    if isinstance(ev.get("cider"), (int, float)):
        flat["CIDEr"] = ev["cider"]
    return flat


def read_eval(run_dir: str | Path) -> dict[str, Any]:
    """eval.json as written by vltrain.evaluate; {} when missing or unreadable."""
    try:
        ev = json.loads(RunDir(run_dir).eval.read_text())
    except (OSError, ValueError):
        return {}
    return ev if isinstance(ev, dict) else {}


class EnergyTotals:
    """A run's kWh and kg CO2eq from its per-node energy files, re-read only when one changed."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = RunDir(run_dir)
        self._key: tuple | None = None
        self.value = (0.0, 0.0)

    def read(self) -> tuple[float, float]:
        from clusterctl.runs.usage import read_energy

        key = tuple((p.name, p.stat().st_mtime_ns) for p in self.run_dir.energy_files() if p.exists())
        if key != self._key:
            readings = read_energy(self.run_dir.root)
            self._key, self.value = key, (sum(r.energy_kwh for r in readings), sum(r.co2_kg for r in readings))
        return self.value


def metric_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every logged step of metrics.jsonl (a line cut by a kill is skipped)."""
    path = RunDir(run_dir).metrics
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict) and "step" in d:
                rows.append(d)
    return rows


# A user's error says what to fix; any other error comes next; a lost peer is usually the echo of
# another rank's failure, so it is the reason only when nothing else was recorded.
_KIND_ORDER = {"user": 0, "communication": 2}


def failure_reason(run_dir: str | Path, job_id: str | None) -> str | None:
    """Why the job `job_id` of a run failed, in one line: the trainer's record (vltrain.loop
    record_failure, one per failing rank: the most telling of the latest restart), else the last
    line of the traceback submitit kept; None when neither says."""
    records = []
    for p in RunDir(run_dir).failures.glob("rank*.json"):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("reason"), str) and str(rec.get("job_id")) == str(job_id):
            records.append(rec)
    if records:
        last = max(int(r.get("restart") or 0) for r in records)
        mine = [r for r in records if int(r.get("restart") or 0) == last]
        best = min(mine, key=lambda r: (_KIND_ORDER.get(r.get("kind"), 1), r.get("time") or 0.0))
        return best["reason"]
    if job_id is None:
        return None
    from clusterctl.backends.results import submitit_error

    return submitit_error(str(run_dir), str(job_id))
