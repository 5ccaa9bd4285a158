"""`clusterctl submit --sweep key=v1,v2 [--sweep-file FILE] [--max-parallel N]`: one run per point.

Each point is prepared as `submit` prepares a run, with the point as one more layer of overrides
(named --sweep in errors, so an unknown key is refused as --set refuses it). `--dry-run` lists every
point's resolved difference from the base config and submits nothing; otherwise clusterctl.runs.sweep
submits them (one job array on Slurm, one after another locally).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.render import output
from clusterctl.render.output import print_json
from clusterctl.specs import RunState
from vltrain.common.errors import UserError

if TYPE_CHECKING:
    from clusterctl.cli.options import PlanningFlags


def _line(text: str, err: bool = False) -> None:
    (output.err_console if err else output.console).print(text, markup=False, highlight=False, soft_wrap=True)


def sweep(
    flags: PlanningFlags,
    steps: int | None,
    name: str | None,
    items: list[str],
    sweep_file: Path | None,
    *,
    max_parallel: int,
    max_retries: int,
    dry_run: bool,
    hold: bool,
    json_: bool,
) -> int:
    """The sweep's points prepared, then listed (--dry-run) or submitted; the exit code."""
    from clusterctl.runs import sweep as sw

    axes = sw.parse_axes(items)
    points = sw.combine(axes, sw.read_points(sweep_file) if sweep_file is not None else None)
    base = flags.prepare(steps, name=name, check=False, estimate=False)
    prepared = [flags.prepare(steps, extra=[(sw.FLAG, pt)], name=name) for pt in points]
    diffs = [sw.difference(base.config.to_dict(), p.config.to_dict()) for p in prepared]
    executor = base.profile.executor
    from clusterctl.backends import get_backend

    if dry_run:
        return _dry_run(base.name, base.profile.name, executor, points, prepared, diffs, max_parallel, json_)
    from clusterctl.runs.submit import refuse

    for i, p in enumerate(prepared):
        try:
            refuse(p)
        except UserError as e:
            raise UserError(f"{sw.FLAG}: point {i} ({sw.describe(diffs[i])}): {e}") from None
    from clusterctl.runs.registry import Registry

    reg = Registry()
    reg.require_writable()
    sweep_id = sw.new_id(base.name)
    if get_backend(executor).has_scheduler:
        done = sw.submit_array(reg, prepared, points, sweep_id, max_retries, max_parallel, hold=hold)
        _submitted(sweep_id, done, points, max_parallel, json_)
        return 0
    if hold:
        raise UserError(f"--hold: executor {executor!r} has no scheduler to hold a job; allowed: a Slurm profile")
    _line(f"sweep {sweep_id}: {len(points)} points, one after another (executor {executor})", err=json_)
    finals = sw.submit_local(
        reg,
        prepared,
        points,
        sweep_id,
        max_retries,
        lambda i, run_id, job_id, run_dir: _line(f"  {i}  {run_id}  job {job_id}  {sw.describe(diffs[i])}", json_),
    )
    rows = [{"index": i, "state": s} for i, s in enumerate(finals)]
    if json_:
        print_json(
            {
                "sweep_id": sweep_id,
                "runs": [r | {"run_id": run.run_id} for r, run in zip(rows, sw.runs_of(reg, sweep_id))],
            }
        )
    else:
        for r in rows:
            _line(f"  point {r['index']}: {r['state']}")
    return 0 if all(s == RunState.COMPLETED for s in finals) else 1


def _dry_run(
    name: str,
    profile: str,
    executor: str,
    points: list[dict[str, Any]],
    prepared: list[Any],
    diffs: list[dict[str, list[Any]]],
    max_parallel: int,
    json_: bool,
) -> int:
    """Every point's resolved difference, one line each (or JSON); exit 2 when submit would refuse one."""
    from clusterctl.backends import get_backend
    from clusterctl.runs.sweep import describe

    rows: list[dict[str, Any]] = [
        {
            "index": i,
            "point": pt,
            "difference": diff,
            "problems": list(p.checks.problems),
            "warnings": list(p.checks.warnings),
        }
        for i, (pt, p, diff) in enumerate(zip(points, prepared, diffs))
    ]
    if json_:
        print_json(
            {"name": name, "profile": profile, "executor": executor, "max_parallel": max_parallel, "points": rows}
        )
    else:
        arrays = get_backend(executor).has_scheduler
        how = f"one job array, at most {max_parallel} at once" if arrays else "one after another"
        _line(f"sweep of {len(rows)} points on profile {profile} ({how}); nothing submitted")
        for r in rows:
            _line(f"  {r['index']}  {describe(r['difference'])}")
            for problem in r["problems"]:
                _line(f"     problem: {problem}")
    return 2 if any(r["problems"] for r in rows) else 0


def _submitted(
    sweep_id: str, done: list[tuple[str, str, Path]], points: list[dict[str, Any]], par: int, json_: bool
) -> None:
    if json_:
        print_json(
            {
                "sweep_id": sweep_id,
                "runs": [
                    {"index": i, "run_id": r, "job_id": j, "run_dir": str(d), "point": pt}
                    for i, ((r, j, d), pt) in enumerate(zip(done, points))
                ],
            }
        )
        return
    array = done[0][1].split("_")[0]
    _line(f"submitted sweep {sweep_id}: {len(done)} runs as job array {array} (at most {par} at once)")
    for i, (run_id, job_id, _) in enumerate(done):
        _line(f"  {i}  {run_id}  job {job_id}  {', '.join(f'{k}={v}' for k, v in points[i].items())}")
    _line(f"  follow   clusterctl status {sweep_id}")
