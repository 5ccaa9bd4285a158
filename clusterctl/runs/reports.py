"""The reports of `clusterctl report`: what runs used (`usage_report`: energy, CO2 and GPU-hours by run,
profile, day, month or user), how a run learned (`loss_report`: its loss per objective and stage)
and how it evaluates (`eval_report`: Recall@K and CIDEr of each run's eval.json).

A usage report sums in SQL the runs whose registry summary is settled (Registry.settled_totals; by
run, each run's own figures: settled_runs); the others (active, just ended, never summarised) are
refreshed from their backends once, their files read, their summaries stored (runs.history.current),
and added to the same groups. Filters are SQL's, on one snapshot of the registry. The rows and CSV
columns are runs.usage's (pure); the tables are render.report_view's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from clusterctl.runs.registry import Registry
from clusterctl.runs.sweep import run_filter
from clusterctl.specs import RunRecord
from vltrain.common.errors import UserError

OBJECTIVES = ("loss", "itc", "mlm", "caption", "mim")  # what `report loss` reads of each metrics record


class UsageReport(NamedTuple):
    """The rows of a usage report (by run for a table: columns, usage.run_columns), the runs it
    covers when a plot needs them, and the notes of the refresh (a backend that did not answer).
    (NamedTuples, not dataclasses: a report's start-up counts, and a dataclass costs ~1 ms to make.)"""

    rows: Any
    runs: list[RunRecord]
    notes: list[str]


def check_by(by: str) -> str:
    """`--by`: one of usage.BY."""
    from clusterctl.runs.usage import BY

    if by not in BY:
        raise UserError(f"--by: {by!r} is not known; allowed: {', '.join(BY)}")
    return by


def usage_report(
    by: str,
    run: str | None = None,
    profile: str | None = None,
    user: str | None = None,
    since: str | None = None,
    until: str | None = None,
    *,
    with_runs: bool = False,
    table: bool = False,
    reg: Registry | None = None,
) -> UsageReport:
    """The report grouped `by` (check_by) of the runs matching every filter (`since`/`until`: the
    flags' text, submitted in [since, until)), from `reg` (default: the user's registry, opened once
    the dates are read). `with_runs`: also the runs (for --plot). `table`: by run, the rows as the
    table reads them (usage.run_columns)."""
    from clusterctl.runs.history import current
    from clusterctl.runs.status import with_skipped
    from clusterctl.runs.usage import from_summary, group, parse_day, rows_of, run_columns

    lo = parse_day(since, "--since") if since else None
    hi = parse_day(until, "--until") if until else None
    if lo is not None and hi is not None and hi <= lo:
        raise UserError(f"--until: {until} is not after --since {since}; allowed: a later date")
    reg = Registry() if reg is None else reg
    filters: dict[str, Any] = run_filter(reg, run) | {"profile": profile, "user": user}
    filters |= {"since": lo, "until": hi}
    if not run:
        reg.verify()  # every run is read: a damaged page must not pass as a complete report
    by_run = by == "run"
    with reg.snapshot():  # the settled runs summed and the others listed from one state of the file
        totals = reg.settled_runs(**filters) if by_run else reg.settled_totals(by, **filters)
        stale = reg.index(**filters, stale_only=True)
    cur = current(reg, stale)
    groups = group([from_summary(r, s) for r, s in cur.rows], by)  # the runs that may still change
    runs = [r for r, _ in reg.index(**filters)] if with_runs else []
    if by_run and table:
        cols = run_columns(totals, rows_of(groups))
        return UsageReport(priced(cols, by, reg, filters), runs, with_skipped(cur.notes))
    rows = _by_run(totals, groups) if by_run else _by_group(totals, groups)
    return UsageReport(priced(rows, by, reg, filters), runs, with_skipped(cur.notes))


def profile_prices() -> dict[str, Any]:
    """The [cost] of every profile found (planning.profiles.discover, first of a name wins) that sets a
    price, by name; {} when none does (the usual case: a report then reads nothing more)."""
    from clusterctl.planning.profiles import discover, read_profile

    prices: dict[str, Any] = {}
    for path, shadowed in discover():
        try:
            p = read_profile(path)
        except UserError:  # profiles list names the broken file; a report goes on without its price
            continue
        if not shadowed and p.cost is not None:
            prices.setdefault(p.name, p.cost)
    return prices


def priced(rows: Any, by: str, reg: Registry, filters: dict[str, Any]) -> Any:
    """`rows` (a list of row dicts, or columns by name: usage.run_columns) with "cost" and "currency"
    (planning.cost.money of the row's GPU-hours and measured energy at its profile's current prices)
    when some profile sets a price; by run and by profile only (a day's or a user's runs may mix
    profiles and currencies). Unchanged, with no such keys, when nothing is priced."""
    from clusterctl.planning.cost import money

    prices = profile_prices() if by in ("run", "profile") else {}
    if not prices:
        return rows
    of: dict[str, str] = {}
    if by == "run":  # the run's profile: one query, only now that some profile has a price
        of = {r.run_id: r.profile for r, _ in reg.index(**filters)}
    columns = isinstance(rows, dict)
    keys = rows["key"] if columns else [r["key"] for r in rows]
    hours = rows["gpu_hours"] if columns else [r["gpu_hours"] for r in rows]
    kwh = rows["energy_kwh"] if columns else [r.get("energy_kwh") for r in rows]
    costs = []
    for k, h, e in zip(keys, hours, kwh):
        m = money(h, e or None, prices.get(of.get(k, "") if by == "run" else k))
        costs.append((m["total"], m["currency"]) if m else (None, None))
    if all(c is None for c, _ in costs):
        return rows
    if columns:
        return rows | {"cost": [c for c, _ in costs], "currency": [u for _, u in costs]}
    return [r | {"cost": c, "currency": u} for r, (c, u) in zip(rows, costs)]


def _by_run(totals: list[tuple], groups: dict[str, Any]) -> list[dict[str, Any]]:
    """The settled runs' rows, sorted by SQL; the few that may still change go into their places."""
    from bisect import bisect_left
    from operator import itemgetter

    from clusterctl.runs.usage import rows_of, run_rows

    rows = run_rows(totals)
    keys = list(map(itemgetter("key"), rows))
    for row in rows_of(groups):
        i = bisect_left(keys, row["key"])
        if i < len(keys) and keys[i] == row["key"]:  # not within one snapshot; as by group, the fresh row wins
            rows[i] = row
        else:
            rows.insert(i, row)
            keys.insert(i, row["key"])
    return rows


def _by_group(totals: list[tuple], groups: dict[str, Any]) -> list[dict[str, Any]]:
    """Groups summed by SQL alone, and those that also hold runs that may still change (added to them)."""
    from clusterctl.runs.usage import rows_of, sql_row

    rows = {t[0]: sql_row(t) for t in totals if t[0] not in groups}
    for t in totals:
        if t[0] in groups:
            groups[t[0]].add_sql(t[1:])
    rows |= {row["key"]: row for row in rows_of(groups)}
    return [rows[k] for k in sorted(rows)]


def energy_series(runs: list[RunRecord]) -> dict[str, list[tuple[float, float, float]]]:
    """Each run's cumulative (hours since submission, kWh, kg CO2), for --plot (edge: reads the
    energy timelines of every node-attempt)."""
    from clusterctl.runs.usage import read_timeline

    return {r.run_id: [((t - r.created_at) / 3600, e, c) for t, e, c in read_timeline(r.run_dir)] for r in runs}


class Stage(NamedTuple):
    """One stage of a run's curriculum as `report loss` shows it: its steps (inclusive) and the loss
    weights it trains with (vltrain.stages; a run without [[stages]] is one stage over all its steps)."""

    name: str
    first: int
    last: int
    weights: dict[str, float]


def run_stages(run_dir: str) -> list[Stage]:
    """The stages of the run's resolved config.toml (the trainer's own stage_bounds / stage_at, so the
    report marks the steps the trainer switched at); [] when the file is missing or unreadable."""
    from vltrain.rundir import RunDir

    path = RunDir(run_dir).config
    if not path.is_file():  # before the ~60 ms import of the config's types
        return []
    from vltrain.common.errors import UserError as ConfigError
    from vltrain.config import load_train_config
    from vltrain.stages import stage_at, stage_bounds, stage_name

    try:
        cfg = load_train_config(path)
    except (ConfigError, OSError, ValueError, RecursionError):
        return []
    out = []
    for i, (first, last) in enumerate(stage_bounds(cfg)):
        loss = stage_at(cfg, first)[1]
        name = stage_name(cfg, i) if cfg.stages else "whole run"
        out.append(Stage(name, first, last, {k: float(getattr(loss, k)) for k in OBJECTIVES[1:]}))
    return out


def trained_keys(stages: list[Stage], logged: list[str]) -> list[str]:
    """The objectives worth showing: the total and each one weighted > 0 in some stage (an objective
    weighted 0 throughout is logged as 0 or as an untrained value: noise on the plot). Without the
    config (`stages` empty), every objective logged."""
    if not stages:
        return logged
    return [k for k in logged if k == "loss" or any(s.weights.get(k, 0.0) > 0 for s in stages)]


class LossReport(NamedTuple):
    """A run's loss per objective: the records of its first and last logged step, the objectives
    shown (trained_keys), the steps logged (None: the file was too large to count them, `size`
    bytes), every step's record (when asked for, or for a run of several stages, else []) and its
    stages (run_stages)."""

    run_id: str
    first: dict[str, Any]
    last: dict[str, Any]
    keys: list[str]
    steps: int | None
    size: int
    every: list[dict[str, Any]]
    stages: list[Stage]


def loss_report(reg: Registry, ref: str, every: bool = False) -> LossReport:
    """The loss report of run `ref` (edge: reads its metrics.jsonl and config.toml): with `every`,
    the whole file, keeping only the objectives; else one pass keeping two records, or the head and
    tail of a large file (runs.artifacts.loss_summary). A run of several stages is read whole when
    its file is small enough to be counted (FULL_READ_MAX), so each stage gets its first and last."""
    import contextlib
    import os

    from clusterctl.runs.artifacts import FULL_READ_MAX, loss_summary, metric_rows
    from vltrain.rundir import RunDir

    r = reg.get_run(ref)
    stages = run_stages(r.run_dir)
    if len(stages) > 1 and not every:
        with contextlib.suppress(OSError):
            every = os.stat(RunDir(r.run_dir).metrics).st_size <= FULL_READ_MAX
    rows = metric_rows(r.run_dir, fields=OBJECTIVES) if every else []
    summary = None if every else loss_summary(r.run_dir, OBJECTIVES)
    if not rows and summary is None:
        from vltrain.common import safe_read

        path = RunDir(r.run_dir).metrics
        refused = [n for n in safe_read.skipped() if n.startswith(f"{path}: ")]
        why = refused[0].removesuffix("; skipped") if refused else f"{path}: no metrics yet"  # a FIFO, ...
        raise UserError(f"{why}; allowed: a run that has logged at least one step")
    if summary is not None:
        keys = trained_keys(stages, summary.keys)
        return LossReport(r.run_id, summary.first, summary.last, keys, summary.steps, summary.size, [], stages)
    keys = trained_keys(stages, [k for k in OBJECTIVES if any(k in d for d in rows)])
    return LossReport(r.run_id, rows[0], rows[-1], keys, len(rows), 0, rows, stages)


def stage_of(stages: list[Stage], step: float) -> int:
    """The index of the stage that holds `step` (the last for a step beyond them, as vltrain.stages)."""
    return next((i for i, s in enumerate(stages) if step <= s.last), len(stages) - 1)


def in_stages(stages: list[Stage], rows: list[dict[str, Any]]) -> list[tuple[Stage, list[dict[str, Any]]]]:
    """Each stage with the records of its steps (rows in step order); one stage holding every row
    when the stages are not known."""
    if not stages:
        return [(Stage("whole run", int(rows[0]["step"]), int(rows[-1]["step"]), {}), rows)] if rows else []
    out: list[tuple[Stage, list[dict[str, Any]]]] = [(s, []) for s in stages]
    for row in rows:
        out[stage_of(stages, row["step"])][1].append(row)
    return out


def step_record(row: dict[str, Any], keys: list[str], stages: list[Stage]) -> dict[str, Any]:
    """A step of `report loss --json`: the step and `keys`, an objective its stage does not weight
    as None (the trainer logs 0 for what it does not compute: not a loss of 0)."""
    weights = stages[stage_of(stages, row["step"])].weights if stages else {}
    return {k: row.get(k) if k in ("step", "loss") or weights.get(k, 1.0) > 0 else None for k in ("step", *keys)}


EVAL_KS = ("R@1", "R@5", "R@10")


def eval_row(
    run: RunRecord, ev: dict[str, Any], commit: tuple[str | None, bool | None] = (None, None)
) -> dict[str, Any]:
    """One run's row of `report eval` from its eval.json (vltrain.evaluate.eval_scores, plus the step
    evaluated): recall at 1, 5, 10 both ways, CIDEr-D, the pairs held out and chance R@1 (1/n), and
    zero-shot top-1/top-5 over the labelled held-out images with its classes, prompt templates and
    chance top-1 (1/classes); None where the run's eval.json has no zero-shot. `commit`: (commit,
    dirty) the run was submitted from (provenance.commit_of), what tells two runs' code apart."""

    def number(v: Any) -> int | float | None:
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    row: dict[str, Any] = {"run_id": run.run_id, "name": run.name, "profile": run.profile}
    row["step"] = number(ev.get("step"))
    row["n"] = number(ev.get("n"))
    row["chance_r1"] = number(ev.get("chance_r1"))
    for side in ("i2t", "t2i"):
        scores = ev.get(side)
        scores = scores if isinstance(scores, dict) else {}
        row |= {f"{side}_{k.replace('@', '').lower()}": number(scores.get(k)) for k in EVAL_KS}
    row["cider"] = number(ev.get("cider"))
    zs = ev.get("zero_shot")  # vltrain.zero_shot: absent when the held-out shards have no classes
    zs = zs if isinstance(zs, dict) else {}
    row |= {f"zero_shot_{k}": number(zs.get(k)) for k in ("top1", "top5", "classes", "n", "templates")}
    row["chance_top1"] = number(zs.get("chance_top1"))
    row["commit"], row["dirty"] = commit
    return row


def eval_report(
    reg: Registry, run: str | None = None, profile: str | None = None, user: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """`report eval`: a row per run that has an eval.json (edge: reads them), oldest first, and the
    runs matching the filters that have none (named in a note, not silently left out)."""
    from clusterctl.runs.artifacts import read_eval
    from clusterctl.runs.provenance import commit_of

    rows, missing = [], []
    for r, _ in reversed(reg.index(**run_filter(reg, run), profile=profile, user=user)):
        ev = read_eval(r.run_dir)
        if ev:
            rows.append(eval_row(r, ev, commit_of(r.run_dir)))
        else:
            missing.append(r.run_id)
    return rows, missing
