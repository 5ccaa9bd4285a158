"""Sweeps: one ordinary run per point of a grid (`--sweep key=v1,v2`) or a list (`--sweep-file`).

Each point is a normal run (its own run directory, registry row, resume, retries, follow-up and
notifications); what groups them is plan["sweep"] = {"id", "index", "point"} in each run's plan (the
registry's and plan.json), so no table of its own is needed and `status`/`watch`/`cancel`/`report`
expand a sweep id to its runs (runs_of). On a scheduler the points go as ONE job array
(Backend.submit_array, backends.slurm.array: each task in its own run directory, job id <A>_<i>);
a retry or resume of one point is an ordinary single job of that run. Without a scheduler (the
local executor) `submit` runs the points one after another, each a normal local run, and waits for
each to end before it submits the next (submit_local).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vltrain.common.errors import UserError

if TYPE_CHECKING:
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.submit import Prepared
    from clusterctl.specs import RunRecord

FLAG = "--sweep"
FILE_FLAG = "--sweep-file"
SWEEP_WORD = "-sweep-"  # in every sweep id (new_id): only such a reference is looked up as one
MAX_POINTS = 1000  # Slurm's default MaxArraySize is 1001: a bigger grid is a typo more often than a plan
SHAPE = 'allowed: --sweep key=v1,v2,... (values as --set takes them: 3e-4, true, "x", [1, 2]), e.g. --sweep optim.lr=1e-4,3e-4'


# --- pure ---------------------------------------------------------------------------------------


def split_values(raw: str) -> list[str]:
    """'1e-4,3e-4,[1, 2]' -> ['1e-4', '3e-4', '[1, 2]']: commas outside brackets and quotes (pure).
    By hand: csv would split inside TOML's [..] and {..}."""
    out, depth, quote, cur = [], 0, "", ""
    for c in raw:
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += c
    return [*out, cur.strip()]


def parse_value(key: str, raw: str) -> Any:
    """A TOML literal (3e-4, true, "x", [1, 2]) or else a bare string: what --set takes."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    except RecursionError:
        raise UserError(f"{FLAG} {key}: {raw[:40]!r} nests too deep; {SHAPE}") from None


def parse_axes(items: list[str]) -> list[tuple[str, list[Any]]]:
    """`--sweep key=v1,v2` items -> [(key, [v1, v2])], each key once, each value list non-empty."""
    axes: list[tuple[str, list[Any]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(c in item for c in "\n\r\0"):
            raise UserError(f"{FLAG}: {item!r} is not key=v1,v2,...; {SHAPE}")
        values = split_values(raw)
        if any(v == "" for v in values):
            raise UserError(f"{FLAG} {key}: {raw!r} has an empty value; {SHAPE}")
        if key in (k for k, _ in axes):
            raise UserError(f"{FLAG} {key}: given twice; allowed: each key once, its values comma-separated")
        axes.append((key, [parse_value(key, v) for v in values]))
    return axes


def grid(axes: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis varying slowest (pure)."""
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1} (pure)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def file_points(data: Any, where: str) -> list[dict[str, Any]]:
    """A sweep file's points: a JSON list of objects, or TOML's [[point]] tables (pure); keys
    dotted or nested."""
    items = data.get("point") if isinstance(data, dict) and set(data) == {"point"} else data
    if not isinstance(items, list) or not items or not all(isinstance(p, dict) and p for p in items):
        raise UserError(
            f"{FILE_FLAG}: {where}: holds no list of points; allowed: a JSON list of objects "
            '([{"optim.lr": 1e-4}, ...]) or TOML [[point]] tables'
        )
    return [flatten(p) for p in items]


def combine(axes: list[tuple[str, list[Any]]], listed: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The sweep's points: the file's list, each crossed with the grid (pure); at most MAX_POINTS."""
    points = [a | g for a in (listed or [{}]) for g in (grid(axes) if axes else [{}])]
    clash = sorted({k for k, _ in axes} & {k for p in listed or [] for k in p})
    if clash:
        raise UserError(f"{FLAG} {clash[0]}: also set by {FILE_FLAG}; allowed: each key in one of them")
    if len(points) > MAX_POINTS:
        raise UserError(f"{FLAG}: {len(points)} points; allowed: at most {MAX_POINTS} (Slurm's array size)")
    return points


def difference(base: dict[str, Any], resolved: dict[str, Any]) -> dict[str, list[Any]]:
    """The resolved config's differences from the sweep's base config: {dotted key: [base, point]} (pure).
    More than the point itself where a setting moves others (e.g. the model preset's widths)."""
    a, b = flatten(base), flatten(resolved)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def describe(diff: dict[str, list[Any]]) -> str:
    """'optim.lr=0.001 (was 0.0003), ...' for the dry-run listing (pure)."""
    return ", ".join(f"{k}={json.dumps(new)} (was {json.dumps(old)})" for k, (old, new) in diff.items()) or (
        "no difference from the base config"
    )


def membership(sweep_id: str, index: int, point: dict[str, Any]) -> dict[str, Any]:
    """plan["sweep"] of point `index` (the shared convention that compare reads)."""
    return {"id": sweep_id, "index": index, "point": point}


def new_id(name: str) -> str:
    """`<name>-sweep-YYYYMMDD-HHMMSS-<4 hex>`, made as run ids are."""
    return f"{name}{SWEEP_WORD}{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def sweep_of(run: RunRecord) -> dict[str, Any] | None:
    s = (run.plan or {}).get("sweep")
    return s if isinstance(s, dict) else None


# --- edges --------------------------------------------------------------------------------------


def read_points(path: Path) -> list[dict[str, Any]]:
    """--sweep-file FILE (.json or .toml) -> its points, one line on error."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{FILE_FLAG}: {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise UserError(
            f"{FILE_FLAG}: {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({e})"
        ) from None
    return file_points(data, str(path))


def runs_of(reg: Registry, ref: str) -> list[RunRecord]:
    """The runs of sweep `ref` in point order (Registry.sweep_runs); [] when `ref` is no sweep's id."""
    return reg.sweep_runs(ref) if SWEEP_WORD in ref else []


def run_filter(reg: Registry, ref: str | None) -> dict[str, Any]:
    """A report's --run as the registry's filters: a sweep id stands for its runs, anything else
    names one run (Registry.get_run: id, unique prefix or name)."""
    if ref and runs_of(reg, ref):
        return {"run_id": None, "sweep": ref}
    return {"run_id": reg.get_run(ref).run_id if ref else None}


def expand(reg: Registry, refs: list[str]) -> list[str]:
    """Run references with each sweep id replaced by its runs' ids (status, watch, cancel)."""
    out: list[str] = []
    for ref in refs:
        out += [r.run_id for r in runs_of(reg, ref)] or [ref]
    return out


def _member(p: Prepared, sweep_id: str, index: int, point: dict[str, Any]) -> Prepared:
    return dataclasses.replace(p, plan=p.plan | {"sweep": membership(sweep_id, index, point)})


def submit_array(
    reg: Registry,
    prepared: list[Prepared],
    points: list[dict[str, Any]],
    sweep_id: str,
    max_retries: int,
    max_parallel: int,
    hold: bool = False,
) -> list[tuple[str, str, Path]]:
    """Every point's run directory and registry row, then ONE job array for them all; returns (run id,
    job id, run dir) per point. Nothing is left behind when any step fails (no directory, no row)."""
    import shutil

    from clusterctl.backends import get_backend
    from clusterctl.runs.attempt import Attempt
    from clusterctl.runs.submit import attempt_submitted, create, new_run_dir, runs_root
    from vltrain.common.atomic import write_json
    from vltrain.rundir import RunDir

    sweep_dir = runs_root() / sweep_id
    made: list[tuple[str, Path]] = []
    backend = get_backend(prepared[0].profile.executor)
    try:
        for i, p in enumerate(prepared):
            run_id, run_dir = new_run_dir(reg, p.name)
            made.append((run_id, run_dir))
            create(reg, _member(p, sweep_id, i, points[i]), run_id, run_dir, max_retries, defer=True)
        specs = [backend.launch_spec(p.profile, d, p.name, hold=hold) for p, (_, d) in zip(prepared, made)]
        for spec, (_, run_dir) in zip(specs, made):
            write_json(RunDir(run_dir).launch, dataclasses.asdict(spec))
        registry = str(Path(reg.path).absolute())
        fns = [Attempt(str(d), run_id, registry) for run_id, d in made]
        job_ids = backend.submit_array(specs, fns, sweep_dir, max_parallel, release=not hold)
    except BaseException:
        for run_id, run_dir in made:
            shutil.rmtree(run_dir, ignore_errors=True)
            reg.delete_run(run_id)
        shutil.rmtree(sweep_dir, ignore_errors=True)
        raise
    write_json(sweep_dir / "sweep.json", {"id": sweep_id, "points": points, "runs": [r for r, _ in made]})
    for p, (run_id, _), job_id in zip(prepared, made, job_ids):
        attempt_submitted(reg, reg.get_run(run_id), p.profile, job_id, "submit", {"sweep": sweep_id})
    return [(r, j, d) for (r, d), j in zip(made, job_ids)]


def submit_local(
    reg: Registry,
    prepared: list[Prepared],
    points: list[dict[str, Any]],
    sweep_id: str,
    max_retries: int,
    on_submitted: Callable[[int, str, str, Path], None],
    poll_s: float = 2.0,
) -> list[str]:
    """Without a scheduler: point i is submitted (a normal run) once point i-1 ended, however it
    ended; returns each run's final state. Ctrl-C stops waiting: the points not yet submitted are not."""
    from clusterctl.runs.lifecycle import current_state
    from clusterctl.runs.submit import create, new_run_dir
    from clusterctl.specs import ACTIVE_STATES, RunState

    finals = []
    for i, p in enumerate(prepared):
        run_id, run_dir = new_run_dir(reg, p.name)
        job_id = create(reg, _member(p, sweep_id, i, points[i]), run_id, run_dir, max_retries)
        on_submitted(i, run_id, job_id, run_dir)
        state: str = RunState.RUNNING
        while state in ACTIVE_STATES:
            # a wait first: polled within a millisecond of its start, the job's pid may still be the
            # fork of this process, not yet submitit's controller (backends.local.pid_alive: FAILED)
            time.sleep(poll_s)
            state = current_state(reg, reg.get_run(run_id))
        finals.append(state)
    return finals
