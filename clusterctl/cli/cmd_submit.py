"""`clusterctl submit`: plan a run for a profile and start it (clusterctl.runs.submit).

What runs is the profile's recipe (or --config), with --model, --set and the planning flags on top;
the checks before sbatch (clusterctl.runs.preflight) refuse what the job could not get past.
`--dry-run` stops before the run directory: it prints the plan, the resolved config, what the
backend would submit (for Slurm, the exact sbatch script) and what the checks found; it exits 2
when submit would refuse (a problem), 0 when submit would start the run.
`--wait` and `--watch` follow the run afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from clusterctl.cli.options import PlanningFlags, planning_flags
from clusterctl.render import output
from clusterctl.render.fold import fold
from clusterctl.render.output import print_json
from clusterctl.specs import ACTIVE_STATES, RunState

if TYPE_CHECKING:
    from clusterctl.runs.fork import Source
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.submit import Prepared


@planning_flags
def submit(
    flags: PlanningFlags,
    steps: int = typer.Option(None, "--steps", help="Optimizer steps in the run."),
    name: str = typer.Option(None, "--name", help="Run name (Slurm job name); default: the model preset."),
    max_retries: int = typer.Option(
        2, "--max-retries", min=0, max=100, help="Resubmissions after cluster failures (node failure, exit 75/137/143)."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the plan, the resolved config, the checks and the sbatch script; submit nothing "
        "(exit 2 when submit would refuse).",
    ),
    watch: bool = typer.Option(False, "--watch", help="Follow the run in the live view after submitting."),
    hold: bool = typer.Option(False, "--hold", help="Submit held (sbatch --hold); start it with scontrol release."),
    wait: bool = typer.Option(
        False, "--wait", help="Stream rank 0's log until the run ends; exit 0 only if it completed."
    ),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    snapshot: bool = typer.Option(
        False,
        "--snapshot",
        help="Copy the source into the run directory (code/): every attempt, requeued or retried, imports it.",
    ),
    after: list[str] = typer.Option(
        None,
        "--after",
        metavar="RUN[:ok|any]",
        help="Start once run RUN completed (:ok, the default) or ended however (:any); repeatable (all must hold).",
    ),
    budget: float = typer.Option(
        None,
        "--budget",
        metavar="AMOUNT",
        help="Refuse the run if its estimate costs more (in the profile's [cost] currency).",
    ),
    sweep: list[str] = typer.Option(
        None,
        "--sweep",
        metavar="KEY=V1,V2",
        help="One run per value (repeatable: the grid of all keys); one Slurm job array, or one after another locally.",
    ),
    sweep_file: Path = typer.Option(
        None, "--sweep-file", help="A sweep's points: a JSON list of objects or TOML [[point]] tables."
    ),
    max_parallel: int = typer.Option(
        4, "--max-parallel", min=1, max=1000, help="A sweep's runs at once (the job array's %N)."
    ),
    from_: str = typer.Option(
        None,
        "--from",
        metavar="RUN[@STEP]",
        help="Start from RUN's newest checkpoint (or its newest at or under STEP): weights, optimizer and step; "
        "RUN's config is the base (--config, --set on top).",
    ),
    weights_only: bool = typer.Option(
        False, "--weights-only", help="With --from: load the weights only, at step 0 with a fresh optimizer."
    ),
) -> None:
    """Plan a run for a profile (its recipe, or --config) and submit it (Slurm via submitit, or a local process)."""
    from clusterctl.runs.registry import Registry
    from clusterctl.runs.submit import create, new_run_dir, refuse
    from clusterctl.runs.submit import dry_run as preview

    src = _fork(flags, from_, weights_only, bool(sweep or sweep_file is not None))
    if sweep or sweep_file is not None:
        others = (after, watch, wait, snapshot, budget is not None)
        raise typer.Exit(
            _sweep(flags, steps, name, sweep or [], sweep_file, max_parallel, max_retries, dry_run, hold, json_, others)
        )
    p = flags.prepare(steps, name=name, extra=src.layers() if src else None)
    if src:  # runs.fork: refused before anything is written; the lineage goes into the plan
        from clusterctl.runs.fork import check

        check(src, p.config, p.profile)
        p.plan["lineage"] = src.lineage()
    if budget is not None:  # planning.cost: over budget is a problem (dry-run lists it, submit refuses)
        _budget(p, budget)
    if snapshot:
        import dataclasses

        p = dataclasses.replace(p, snapshot=True)
    reg = Registry()
    run_id, run_dir = new_run_dir(reg, p.name)
    if dry_run:
        d = preview(p, run_dir, hold=hold)
        text = d.pop("text")
        if json_:
            print_json(d)
        else:
            from clusterctl.render.plan_view import print_dry_run

            print_dry_run(p.profile.name, p.profile_source, p.plan, d, text)
            for line in d["checks_skipped"]:
                output.console.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)
            if d["notify"]:  # the webhooks submit copies into the run directory, masked
                output.console.print(f"notify: {d['notify']}", markup=False, highlight=False, soft_wrap=True)
        if p.checks.problems:  # what submit would refuse: the same exit code as submit's refusal
            raise typer.Exit(2)
        return
    refuse(p)  # a refusal is the only line: no warning before it
    waits = _after(reg, after, p.profile.executor) if after else None
    if src:
        from clusterctl.runs.fork import submit as submit_fork

        job_id = submit_fork(reg, src, p, run_id, run_dir, max_retries, hold, waits)
    else:
        job_id = create(reg, p, run_id, run_dir, max_retries, hold=hold, after=waits)
    for line in p.checks.warnings:  # only once submitted: sbatch's refusal, too, is the only line
        # folded at spaces by render.fold, not by rich, which cuts a path longer than the terminal mid-word
        output.err_console.print(fold(f"warning: {line}"), markup=False, highlight=False, soft_wrap=True)
    if json_:
        print_json(
            {"run_id": run_id, "job_id": job_id, "run_dir": str(run_dir), "plan": p.plan} | _snapshot(p, run_dir)
        )
    else:
        _print_submitted(p, run_id, job_id, run_dir)
        for w in [w for w in waits or [] if w["job_id"]]:  # what the scheduler holds it for (runs.dependencies)
            said = f"{w['run_id']} to {'complete' if w['condition'] == 'ok' else 'end'} (job {w['job_id']})"
            output.console.print(f"  waits    for {said}", markup=False, highlight=False, soft_wrap=True)
    if watch:
        from clusterctl.cli.live import watch_runs

        raise typer.Exit(watch_runs([run_id]))
    if wait and (code := _wait(reg, run_id, run_dir)):
        raise typer.Exit(code)


def _budget(p: Prepared, budget: float) -> None:
    """--budget against the whole run's estimate priced at the profile's [cost]: a problem when over."""
    from clusterctl.planning.cost import budget_problem

    where = f"profile {p.profile.name!r}"
    if problem := budget_problem(budget, p.plan.get("estimate") or {}, p.profile, where):
        p.checks.problems.insert(0, problem)


def _fork(flags: PlanningFlags, from_: str | None, weights_only: bool, sweep: bool) -> Source | None:
    """--from's checkpoint (runs.fork), its run's config the base unless --config names one."""
    from vltrain.common.errors import UserError

    if from_ is None:
        if weights_only:
            raise UserError("--weights-only: only with --from; allowed: --from RUN[@STEP] --weights-only")
        return None
    if sweep:
        raise UserError("--from: not with --sweep; allowed: --from for a single run")
    from clusterctl.runs.fork import resolve
    from clusterctl.runs.registry import Registry
    from vltrain.rundir import RunDir

    src = resolve(Registry(), from_, weights_only)
    if flags.config is None:
        flags.config = RunDir(src.run.run_dir).config
    return src


def _sweep(flags, steps, name, items, sweep_file, max_parallel, max_retries, dry_run, hold, json_, others) -> int:
    """submit --sweep/--sweep-file (cli.sweep_submit); --after, --watch, --wait, --snapshot, --budget: a single run's."""
    from clusterctl.cli.sweep_submit import sweep
    from vltrain.common.errors import UserError

    for flag, given in zip(("--after", "--watch", "--wait", "--snapshot", "--budget"), others):
        if given:
            raise UserError(
                f"{flag}: not with --sweep; allowed: --sweep with --dry-run, --hold, --json, --max-parallel"
            )
    return sweep(
        flags,
        steps,
        name,
        items,
        sweep_file,
        max_parallel=max_parallel,
        max_retries=max_retries,
        dry_run=dry_run,
        hold=hold,
        json_=json_,
    )


def _after(reg: Registry, after: list[str], executor: str) -> list[dict]:
    """--after's runs, each refreshed (and retried if its last job failed for a cluster reason)."""
    from clusterctl.runs.dependencies import resolve_after
    from clusterctl.runs.lifecycle import current_state

    return resolve_after(reg, after, executor, current_state)


def _print_submitted(p: Prepared, run_id: str, job_id: str, run_dir: Path) -> None:
    """What was submitted, and the commands that follow it: each command on a line of its own, never
    wrapped by rich (soft_wrap), so a terminal of any width can copy it whole."""
    from clusterctl.runs.snapshot import summary_line

    prof = p.profile
    output.console.print(f"submitted [bold]{run_id}[/bold] as job {job_id}", highlight=False, soft_wrap=True)
    for line in (
        f"  profile  {prof.name} ({prof.world_size} x {prof.gpu.model}) from {p.profile_source}",
        f"  run dir  {run_dir}",
        *(f"  snapshot {summary_line(s)} in {run_dir}/code" for s in _snapshot(p, run_dir).values() if s),
        f"  follow   clusterctl status {run_id}",
        f"           clusterctl logs {run_id} --follow",
    ):
        output.console.print(line, markup=False, highlight=False, soft_wrap=True)


def _snapshot(p: Prepared, run_dir: Path) -> dict:
    """{"snapshot": what --snapshot copied (runs.snapshot.take, kept in provenance.json)}, {} without it."""
    from clusterctl.runs.provenance import read

    return {"snapshot": (read(run_dir) or {}).get("snapshot")} if p.snapshot else {}


def _wait(reg: Registry, run_id: str, run_dir: Path) -> int:
    """`--wait`: rank 0's log until the run ends, then its outcome; the exit code (130: Ctrl-C stopped
    waiting, not the run; 1: it did not complete)."""
    from clusterctl.runs.lifecycle import follow_log

    final = follow_log(reg, reg.get_run(run_id), rank=0, stderr=False)
    if final in ACTIVE_STATES:
        return 130
    _print_outcome(run_id, run_dir, final)
    return 0 if final == RunState.COMPLETED else 1


def _print_outcome(run_id: str, run_dir: Path, state: str) -> None:
    """One line for the end of a run, with its evaluation when the trainer wrote one: zero-shot top-1
    first when the held-out shards have classes, then Recall@K and CIDEr-D, and their chance levels."""
    from clusterctl.runs.artifacts import eval_summary, read_eval, zero_shot

    colour = "green" if state == RunState.COMPLETED else "red"
    output.console.print(f"run {run_id}: [{colour}]{state}[/{colour}]")
    ev = eval_summary(run_dir)
    if ev:
        full = read_eval(run_dir)
        chances = [("top-1", (zero_shot(full) or {}).get("chance_top1"), 3), ("R@1", full.get("chance_r1"), 4)]
        said = [f"{k} {c:.{d}f}" for k, c, d in chances if isinstance(c, (int, float)) and not isinstance(c, bool)]
        output.console.print(
            "held-out eval: "
            + "  ".join(f"{k} {v:.3f}" for k, v in ev.items())
            + (f"  (chance {', '.join(said)})" if said else ""),
            markup=False,
            highlight=False,
        )
