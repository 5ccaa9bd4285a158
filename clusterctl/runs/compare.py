"""`clusterctl compare`: several runs side by side (what differs in their configs, how far each got,
what each used), for a sweep or for runs picked by hand.

The pure parts (flatten, config_differences, loss_figures, thin) take plain data; `compare` is the
edge: it resolves the references (run id, prefix, name, or a sweep id: every run whose plan says
plan["sweep"]["id"] is that id), reads each run's config, metrics.jsonl, eval.json and provenance,
and takes GPU-hours and energy from the registry's summaries (runs.history.current: status's own
refresh, nothing else asked of Slurm). Money comes from clusterctl.planning.cost.money when the
run's profile sets a price.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from clusterctl.runs.dbfile import shown
from clusterctl.runs.registry import Registry
from clusterctl.specs import RunRecord
from vltrain.common.errors import UserError

CURVE_POINTS = 400  # points of each run's total-loss curve in --json (a million steps are thinned)
ABSENT = "(absent)"  # a dotted key that one run's config has and another's has not


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested table as dotted keys ("optim.lr"); lists (stages) are values as they are."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def config_differences(configs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The dotted keys whose values are not the same in every config, each with every run's value
    (ABSENT where a config has no such key), in key order. One config: nothing differs."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    out = {}
    for k in keys:
        values = [f.get(k, ABSENT) for f in flat]
        if any(v != values[0] or type(v) is not type(values[0]) for v in values[1:]):
            out[k] = values
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def loss_figures(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, Any]]:
    """For each loss term of `keys`: the final value (the last logged step's; NaN kept: a diverged
    run must look diverged) and the best (the lowest finite value) with its step. Rows in step order."""
    out = {}
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        if not pts:
            continue
        finite = [p for p in pts if math.isfinite(p[1])]
        best = min(finite, key=lambda p: p[1]) if finite else None
        out[k] = {
            "final": pts[-1][1],
            "final_step": pts[-1][0],
            "best": best[1] if best else None,
            "best_step": best[0] if best else None,
        }
    return out


def thin(points: list[tuple[float, float]], n: int = CURVE_POINTS) -> list[tuple[float, float]]:
    """At most `n` points of a curve, evenly spaced over its steps, the first and last always kept."""
    if len(points) <= n:
        return points
    idx = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [points[i] for i in idx]


def resolve(reg: Registry, refs: list[str]) -> list[RunRecord]:
    """Each reference as its run (id, unique prefix, name) or, failing that, its sweep's runs; a run
    named twice is compared once. An unknown reference is one line naming it."""
    out: dict[str, RunRecord] = {}
    for ref in refs:
        try:
            found = [reg.get_run(ref)]
        except UserError as e:
            found = reg.sweep_runs(ref)  # plan["sweep"]["id"] (runs.sweep), in point order
            if not found and "no run matches" not in str(e):
                raise  # several runs share the prefix, or not UTF-8: get_run's own line
            if not found:
                raise UserError(
                    f"RUN|SWEEP: no run or sweep matches {shown(ref)}; allowed: a run id, a unique id "
                    "prefix, a run name or a sweep id (clusterctl status --all lists them)"
                ) from None
        for r in found:
            out.setdefault(r.run_id, r)
    full = reg.runs_by_ids(out)  # get_run's record may come without config and plan on old schemas
    return [full.get(k, r) for k, r in out.items()]


def run_config(run: RunRecord) -> dict[str, Any]:
    """The run's resolved config (the registry's copy, else the run directory's config.toml) with
    every default filled in by the trainer's own parser, so that a run written before a section
    existed compares by value, not as absent; as it is when it no longer parses, {} when unreadable."""
    from clusterctl.runs.readback import read_table
    from vltrain.rundir import RunDir

    data = run.config
    if not data:
        try:
            data = read_table(RunDir(run.run_dir).config, "the resolved config.toml clusterctl submit wrote")
        except UserError:
            return {}
    from vltrain.config import parse_train_config

    try:
        return parse_train_config(dict(data), run.run_dir).to_dict()
    except (UserError, TypeError, ValueError, RecursionError):
        return data


class Figures(NamedTuple):
    """What one run's row of the comparison holds (as_dict: its --json object)."""

    run: RunRecord
    steps: int  # distinct steps logged (0: no metrics yet)
    losses: dict[str, dict[str, Any]]
    curve: list[tuple[float, float]]  # (step, total loss) of every logged step
    eval: dict[str, Any] | None
    usage: dict[str, Any]
    money: dict[str, Any] | None
    commit: str | None
    dirty: bool | None


def _eval(run: RunRecord) -> dict[str, Any] | None:
    from clusterctl.runs.artifacts import read_eval
    from clusterctl.runs.reports import eval_row

    ev = read_eval(run.run_dir)
    if not ev:
        return None
    row = eval_row(run, ev)
    keep = ("step", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "zero_shot_top1", "chance_top1")
    return {k: row[k] for k in keep}


def _money(run: RunRecord, gpu_hours: float, kwh: float | None) -> dict[str, Any] | None:
    """The run's cost at its profile's prices (profile.json as submitted, else the profile of that
    name): planning.cost.money, None when no price is set or the profile cannot be read."""
    from clusterctl.planning.cost import money
    from clusterctl.runs.readback import read_table
    from vltrain.rundir import RunDir

    prices: Any
    try:
        prices = read_table(RunDir(run.run_dir).profile, "the profile.json clusterctl submit wrote")
    except UserError:
        from clusterctl.planning.profiles import load_profile

        try:
            prices = load_profile(run.profile)
        except (UserError, OSError):
            return None
    try:
        return money(gpu_hours, kwh, prices)
    except (UserError, TypeError, ValueError):  # a hand-edited [cost] table
        return None


def _usage(reg: Registry, runs: list[RunRecord]) -> tuple[dict[str, Any], list[str]]:
    """Each run's summary (GPU-hours, energy): stored when settled, else refreshed and computed."""
    from clusterctl.runs.history import current

    index = [item for r in runs for item in reg.index(run_id=r.run_id)]
    cur = current(reg, index)
    return {run.run_id: s for run, s in cur.rows}, cur.notes


def compare(reg: Registry, refs: list[str]) -> tuple[list[Figures], dict[str, list[Any]], list[str]]:
    """The runs `refs` name (resolve), each with its figures, the config keys that differ among them,
    and the notes (a backend that did not answer, a file refused)."""
    from clusterctl.runs.artifacts import metric_rows
    from clusterctl.runs.provenance import commit_of
    from clusterctl.runs.reports import OBJECTIVES, run_stages, step_record, trained_keys
    from clusterctl.runs.status import with_skipped

    runs = resolve(reg, refs)
    summaries, notes = _usage(reg, runs)
    out = []
    for r in runs:
        rows = metric_rows(r.run_dir, fields=OBJECTIVES)
        stages = run_stages(r.run_dir)
        keys = trained_keys(stages, [k for k in OBJECTIVES if any(k in d for d in rows)])
        rows = [step_record(d, keys, stages) for d in rows]  # a term its stage does not weight: None, not 0
        s = summaries.get(r.run_id)
        hours = s.gpu_hours if s else 0.0
        kwh = s.energy_kwh if s and s.energy_files else None  # None: not measured (no codecarbon file)
        usage = {
            "gpu_hours": hours,
            "gpu_hours_source": s.gpu_hours_source if s else "none",
            "energy_kwh": kwh,
            "energy_files": s.energy_files if s else 0,
        }
        curve = [(d["step"], d["loss"]) for d in rows if _finite(d.get("loss"))]
        commit, dirty = commit_of(r.run_dir)
        money = _money(r, hours, kwh)  # energy not measured: not priced as 0
        out.append(Figures(r, len(rows), loss_figures(rows, keys), curve, _eval(r), usage, money, commit, dirty))
    diffs = config_differences([run_config(r) for r in runs])
    return out, diffs, with_skipped(notes)


def as_dict(f: Figures) -> dict[str, Any]:
    """One run of `compare --json`."""
    r = f.run
    return {
        "run_id": r.run_id,
        "name": r.name,
        "profile": r.profile,
        "state": r.state,
        "sweep": r.plan.get("sweep"),
        "lineage": r.plan.get("lineage"),
        "commit": f.commit,
        "dirty": f.dirty,
        "steps_logged": f.steps,
        "losses": f.losses,
        "eval": f.eval,
        **f.usage,
        "money": f.money,
        "curve": [list(p) for p in thin(f.curve)],
    }
