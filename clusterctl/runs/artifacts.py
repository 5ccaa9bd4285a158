"""What the trainer wrote into a run directory, read back for status, watch and reports (edge).

Reads are cheap however long the run: the last metrics line is read backwards from the end of the
file, energy totals are re-read only when a node's file changed. Layout: vltrain.rundir.

One reader for metrics.jsonl: `metric_record` turns one line (bytes or text) into a record or None,
and status (`tail_json`), watch (`render.watch_view.RunView`) and `report loss` (`metric_rows`) all
take lines through it, so a cut line, random bytes or a `step` that is not a number is skipped the
same way everywhere. JSON that leaves clusterctl (the registry's columns, `--json` output) goes
through `dumps_strict`: NaN and Infinity are not JSON, so they are written as null.

Every file is opened through vltrain.common.safe_read: a FIFO, a device (a link to /dev/zero) or a
directory in a file's place is skipped with a note, and each read has a byte cap (below), so no run
directory can hang or exhaust status, watch or a report.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from vltrain.common import safe_read
from vltrain.rundir import RunDir

EVENTS_MAX = 64 << 20  # bytes of events.jsonl read (a few hundred bytes per checkpoint or restart)
EVAL_MAX = 16 << 20  # bytes of eval.json (a few hundred bytes in practice)
FAILURE_MAX = 1 << 20  # bytes of one failures/rankNNNNN.json (its reason is cut to MAX_REASON)
METRICS_MAX = 1 << 30  # bytes of metrics.jsonl read line by line (10 million records)


def finite(obj: Any) -> Any:
    """`obj` with every float that is NaN or infinite replaced by None, in nested dicts, lists and
    tuples too (tuples become lists, as JSON has them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """json.dumps that only ever writes JSON: non-finite floats become null (allow_nan=False then
    guarantees none is left). Keyword arguments are json.dumps's (indent, sort_keys, default)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def _metric_value(v: Any) -> Any:
    """A number as Python can format it: an int too large for a float is +-inf (NaN and inf stay:
    a diverged loss must look diverged; JSON output turns them into null)."""
    if isinstance(v, int) and not isinstance(v, bool):
        try:
            float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf
    return v


def metric_record(line: bytes | str) -> dict[str, Any] | None:
    """One metrics.jsonl line as a record, or None when it is not one: not JSON (a line cut by a
    kill, random bytes, text that is not UTF-8), not an object, or without a finite, non-negative
    number as `step`. Numbers too large for a float become +-inf."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(obj, dict):
        return None
    rec = {k: _metric_value(v) for k, v in obj.items()}
    step = rec.get("step")
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step) or step < 0:
        return None
    return rec


def last_json_line(buf: bytes, complete_first: bool) -> dict[str, Any] | None:
    """The last line of `buf` that is a metrics record (metric_record); a half-written last line is
    skipped. `complete_first`: buf starts at the start of the file (its first line is whole)."""
    lines = buf.split(b"\n")
    for line in reversed(lines if complete_first else lines[1:]):
        if line.strip():
            rec = metric_record(line)
            if rec is not None:
                return rec
    return None


def tail_json(path: Path, chunk: int = 8192, max_bytes: int = 1 << 20) -> dict[str, Any] | None:
    """The last complete metrics record of a JSONL file (metric_record), read backwards from the
    end in chunks, at most `max_bytes`."""
    try:
        f = safe_read.open_regular(path)
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
    """How many events of `kind` the trainer wrote (the first EVENTS_MAX bytes of events.jsonl)."""
    return len(events_of(path, kind))


def events_of(path: Path, *kinds: str) -> list[dict[str, Any]]:
    """The trainer's events of the given kinds, in the order written (the first EVENTS_MAX bytes of
    events.jsonl, one pass); a line that is not a JSON object is skipped."""
    try:
        f = safe_read.open_regular(path)
    except OSError:
        return []
    out = []
    with f:
        for line in safe_read.capped_lines(f, path, EVENTS_MAX):
            if any(k.encode() in line for k in kinds):
                try:
                    ev = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(ev, dict) and any(is_kind(ev, k) for k in kinds):
                    out.append(ev)
    return out


def is_kind(ev: dict[str, Any], kind: str) -> bool:
    """Whether event `ev` is of `kind` (the trainer's "event" key; "kind" and "type" as older writers)."""
    return kind in (ev.get("event"), ev.get("kind"), ev.get("type"))


def startup_headline(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest attempt's time to its first step by phase (vltrain.startup's `startup` event, rank
    0's): attempt, step, total_s and phases (name -> seconds, in order), the numbers only where they
    are finite numbers; None before a first step or when the newest such event is not one."""
    ev = next((e for e in reversed(events) if is_kind(e, "startup")), None)
    if ev is None or not _num(ev.get("total_s")) or not isinstance(ev.get("phases"), dict):
        return None
    phases = {str(k): v for k, v in ev["phases"].items() if _num(v)}
    attempt, step = ev.get("attempt"), ev.get("step")
    return {
        "attempt": attempt if _num(attempt) else None,
        "step": step if _num(step) else None,
        "total_s": ev["total_s"],
        "phases": phases,
    }


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def zero_shot(ev: dict[str, Any]) -> dict[str, Any] | None:
    """eval.json's "zero_shot" (vltrain.zero_shot: top1, top5, classes, n, templates, chance_top1) when its
    top-1 is a number; None when the held-out shards had no classes."""
    zs = ev.get("zero_shot")
    return zs if isinstance(zs, dict) and _num(zs.get("top1")) else None


def eval_headline(ev: dict[str, Any]) -> dict[str, Any] | None:
    """The one figure status and watch show for a run's latest evaluation: zero-shot top-1 when it has
    one, else image-to-text R@1; with its chance level and the step evaluated. None without either."""
    zs = zero_shot(ev)
    step = ev.get("step") if _num(ev.get("step")) else None
    if zs is not None:
        chance = zs.get("chance_top1")
        return {"metric": "top-1", "value": zs["top1"], "chance": chance if _num(chance) else None, "step": step}
    r1 = ev.get("i2t", {}).get("R@1") if isinstance(ev.get("i2t"), dict) else None
    if not _num(r1):
        return None
    return {
        "metric": "R@1",
        "value": r1,
        "chance": ev["chance_r1"] if _num(ev.get("chance_r1")) else None,
        "step": step,
    }


class LatestEval:
    """A run's eval.json for watch's refreshes: re-read only when the file changed (size, mtime)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = RunDir(run_dir).eval
        self._key: tuple[int, int] | None = None
        self.value: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        try:
            st = self.path.stat()
        except OSError:
            self._key, self.value = None, {}
            return self.value
        key = (st.st_size, st.st_mtime_ns)
        if key != self._key:
            self._key, self.value = key, read_eval(self.path.parent)
        return self.value


def eval_summary(run_dir: str | Path) -> dict[str, float]:
    """The run's latest held-out evaluation as flat figures ('zero-shot top-1' when the held-out shards
    have classes, 'i2t R@1', ..., 'CIDEr'); {} if none."""
    ev = read_eval(run_dir)
    flat = {}
    if (zs := zero_shot(ev)) is not None:
        flat["zero-shot top-1"] = zs["top1"]
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
        ev = json.loads(safe_read.read_capped(RunDir(run_dir).eval, EVAL_MAX))
    except (OSError, ValueError, RecursionError):
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

        stamps = []
        for p in self.run_dir.energy_files():
            try:
                stamps.append((p.name, p.stat().st_mtime_ns))
            except OSError:  # gone since the glob
                continue
        key = tuple(stamps)
        if key != self._key:
            readings = read_energy(self.run_dir.root)
            self._key, self.value = key, (sum(r.energy_kwh for r in readings), sum(r.co2_kg for r in readings))
        return self.value


def metric_rows(run_dir: str | Path, fields: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Every logged step of metrics.jsonl, one record per step (the last line written for it: a
    resumed run logs the steps after its checkpoint again), in step order. Lines that are not
    records (metric_record) are skipped. `fields`: keep only `step` and these keys of each record
    (a 100 MB file holds a million records). Read line by line, never the whole file at once."""
    path = RunDir(run_dir).metrics
    try:
        f = safe_read.open_regular(path)
    except OSError:
        return []
    by_step: dict[float, dict[str, Any]] = {}
    with f:
        for line in safe_read.capped_lines(f, path, METRICS_MAX):
            if line.strip() and (rec := metric_record(line)) is not None:
                if fields is not None:
                    rec = {k: rec[k] for k in ("step", *fields) if k in rec}
                by_step.pop(rec["step"], None)
                by_step[rec["step"]] = rec
    return sorted(by_step.values(), key=lambda r: r["step"])


FULL_READ_MAX = 8 << 20  # bytes of metrics.jsonl that `report loss` reads whole; beyond, its head and tail


class LossSummary:
    """What `report loss` says of a run's metrics.jsonl: the record of the lowest and of the highest
    logged step, the distinct steps logged (None when the file was too large to read whole), which
    objectives were logged, and the file's size. (A plain class: this module loads with every
    command, and a dataclass costs a millisecond to make.)"""

    __slots__ = ("first", "keys", "last", "size", "steps")

    def __init__(self, first: dict, last: dict, steps: int | None, keys: list[str], size: int) -> None:
        self.first, self.last, self.steps, self.keys, self.size = first, last, steps, keys, size


def loss_summary(
    run_dir: str | Path, keys: tuple[str, ...] = ("loss", "itc", "mlm", "caption"), full_max: int = FULL_READ_MAX
) -> LossSummary | None:
    """The first and last records of metrics.jsonl as metric_rows orders them (the last line written
    for the lowest and for the highest step) and how many steps were logged, read line by line in
    one pass, keeping no record but those two. A file over `full_max` bytes is read like status
    reads it: its first record from the head (at most 1 MiB), its last from the tail (tail_json);
    the steps are then not counted. None when there is no record."""
    path = RunDir(run_dir).metrics
    try:
        f = safe_read.open_regular(path)
        size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    first = last = None
    with f:
        if size > full_max:
            first = _head_json(f, path)
            last = tail_json(path)
            if first is None or last is None:
                return None
            present = {k for k in keys if k in first or k in last}
            return LossSummary(first, last, None, [k for k in keys if k in present], size)
        seen: set[float] = set()
        present = set()
        for line in safe_read.capped_lines(f, path, METRICS_MAX):
            if not line.strip() or (rec := metric_record(line)) is None:
                continue
            step = rec["step"]
            seen.add(step)
            if first is None or step <= first["step"]:
                first = rec
            if last is None or step >= last["step"]:
                last = rec
            present.update(k for k in keys if k in rec)
    if first is None or last is None:
        return None
    return LossSummary(first, last, len(seen), [k for k in keys if k in present], size)


def _head_json(f: Any, path: Path, max_bytes: int = 1 << 20) -> dict[str, Any] | None:
    """The first metrics record of an open file, within its first `max_bytes`."""
    for line in safe_read.capped_lines(f, path, max_bytes, note=False):
        if line.strip() and (rec := metric_record(line)) is not None:
            return rec
    return None


# A user's error says what to fix; any other error comes next; a lost peer is usually the echo of
# another rank's failure, so it is the reason only when nothing else was recorded.
_KIND_ORDER = {"user": 0, "communication": 2}
MAX_REASON = 500  # characters of a reason kept (one line under a table)


def _count(v: Any) -> float:
    """A restart number or a time from a failure record; 0 when it is not a finite number."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return 0.0
    try:
        f = float(v)
    except OverflowError:
        return 0.0
    return f if math.isfinite(f) else 0.0


def failure_records(run_dir: str | Path, job_id: str | None) -> list[dict[str, Any]]:
    """The trainer's failure records (vltrain.loop record_failure, one per failing rank) of the job's
    latest restart."""
    records = []
    for p in RunDir(run_dir).failures.glob("rank*.json"):
        try:
            rec = json.loads(safe_read.read_capped(p, FAILURE_MAX))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("reason"), str) and str(rec.get("job_id")) == str(job_id):
            records.append(rec)
    if not records:
        return []
    last = max(_count(r.get("restart")) for r in records)
    return [r for r in records if _count(r.get("restart")) == last]


def user_failure(run_dir: str | Path, job_id: str | None) -> bool:
    """Did a rank of this job fail on the user's account (a bad input, a diverged loss)? Then the job
    is not retried, whatever exit code Slurm reports (srun --kill-on-bad-exit may SIGKILL the other
    ranks first: FAILED 9:0)."""
    return any(r.get("kind") == "user" for r in failure_records(run_dir, job_id))


def failure_reason(run_dir: str | Path, job_id: str | None) -> str | None:
    """Why the job `job_id` of a run failed, in one line: the most telling of the trainer's records of
    the latest restart, else the last line of the traceback submitit kept; None when neither says."""
    mine = failure_records(run_dir, job_id)
    if mine:
        best = min(mine, key=lambda r: (_KIND_ORDER.get(str(r.get("kind")), 1), _count(r.get("time"))))
        return best["reason"][:MAX_REASON]
    if job_id is None:
        return None
    from clusterctl.backends.results import submitit_error

    return submitit_error(str(run_dir), str(job_id))
