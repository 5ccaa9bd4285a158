"""`clusterctl submit | logs | cancel | resume`: the life of a run on Slurm or this machine.

Submit = plan (pure) -> launch spec (pure) -> run directory + registry row -> submitit (edge).
`--dry-run` stops before the run directory: it prints the plan and the exact sbatch script.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer

from clusterctl import output
from clusterctl.output import print_json
from vltrain.errors import UserError

ACTIVE = {"SUBMITTING", "SUBMITTED", "PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "UNKNOWN"}


def build_run(profile_name: str, config: Path | None, overrides: dict[str, Any]):
    """Profile + train config -> (profile, TrainConfig with the batch split filled in, plan dict)."""
    from clusterctl.planning import plan_for_run
    from clusterctl.profiles import load_profile
    from vltrain.config import load_train_config

    profile = load_profile(profile_name, flag="--profile")
    cfg = absolute_data_paths(load_train_config(config, overrides))
    plan, resolved = plan_for_run(profile, cfg)
    return profile, resolved, plan.to_dict() | {"steps": resolved.steps, "estimate": run_estimate(profile, plan, resolved.steps)}


def run_estimate(profile, plan, steps: int) -> dict[str, Any]:
    """Time, GPU-hours, kWh and CO2 the plan implies for the whole run, stored beside what gets measured."""
    from clusterctl.carbon import country_intensity
    from clusterctl.estimates import Setup, Work, estimate
    from clusterctl.planning import DEFAULT_MFU

    site = profile.site
    if site.carbon_intensity_g_per_kwh is not None:
        intensity, source = site.carbon_intensity_g_per_kwh, f"profile {profile.name}"
    else:
        gi = country_intensity(site.country_iso)
        intensity, source = gi.g_per_kwh, gi.source
    setup = Setup(gpus=plan.world_size, peak_tflops=profile.gpu.peak_bf16_tflops, power_w=profile.gpu.power_w,
                  pue=site.pue, carbon_intensity_g_per_kwh=intensity, intensity_source=source, nodes=profile.nodes.count)
    flops = steps * plan.split.global_batch * plan.flops_per_sample
    e = estimate(setup, Work(flops=flops, describe=f"{steps} steps x {plan.split.global_batch} samples"), DEFAULT_MFU)
    return {k: getattr(e, k) for k in ("hours", "gpu_hours", "energy_kwh", "co2_kg", "mfu", "carbon_intensity_g_per_kwh", "intensity_source")}


def absolute_data_paths(cfg):
    """Relative data paths are the submitter's (its working directory); jobs start elsewhere."""
    d = cfg.data
    fixed = {k: str(Path(v).absolute()) for k in ("shards", "eval_shards", "tokenizer")
             if (v := getattr(d, k)) and not v.startswith(("/", "s3:", "gs:", "http:", "https:", "pipe:"))}
    if fixed and d.shards and "{" not in d.shards and not Path(fixed.get("shards", d.shards)).exists():
        raise UserError(f"data.shards: {d.shards!r} does not exist; allowed: a directory of shards (vltrain data synth --out DIR ...)")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, **fixed)) if fixed else cfg


def run_profile(run):
    """The profile a run was submitted with (a copy lives in its run directory)."""
    from clusterctl.profiles import parse_profile

    path = Path(run.run_dir) / "profile.json"
    data = json.loads(path.read_text())
    data.pop("derived", None)
    return parse_profile(data, str(path))


def submit_attempt(reg, run, profile, kind: str, hold: bool = False) -> str:
    """Submit one attempt of `run` (first submission, resume or retry); returns the job id."""
    from clusterctl.launcher import launch_spec, submit as submit_job
    from clusterctl.rundir import write_json
    from vltrain.loop import TrainJob

    run_dir = Path(run.run_dir)
    spec = launch_spec(profile, run_dir, run.name, hold=hold)
    write_json(run_dir / "launch.json", dataclasses.asdict(spec))
    job = submit_job(spec, TrainJob(str(run_dir)))
    reg.add_job(run.run_id, str(job.job_id), kind)
    reg.set_run_state(run.run_id, "PENDING" if spec.executor == "slurm" else "RUNNING")
    reg.add_event(run.run_id, kind, {"job_id": str(job.job_id)})
    return str(job.job_id)


def submit(
    profile: str = typer.Option(..., "--profile", "-p", help="Cluster profile name or path."),
    config: Path = typer.Option(None, "--config", "-c", help="Train config TOML (default: built-in defaults)."),
    model: str = typer.Option(None, "--model", help="Model preset (overrides the config)."),
    global_batch: int = typer.Option(None, "--global-batch", help="Samples per optimizer step."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps in the run."),
    name: str = typer.Option(None, "--name", help="Run name (Slurm job name); default: the model preset."),
    set_: list[str] = typer.Option([], "--set", help="Config override key=value, repeatable (e.g. optim.lr=3e-4)."),
    max_retries: int = typer.Option(2, "--max-retries", min=0, max=100, help="Resubmissions after cluster failures (node failure, exit 75/137/143)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and the sbatch script; submit nothing."),
    watch: bool = typer.Option(False, "--watch", help="Follow the run in the live view after submitting."),
    hold: bool = typer.Option(False, "--hold", help="Submit held (sbatch --hold); start it with scontrol release."),
    wait: bool = typer.Option(False, "--wait", help="Stream rank 0's log until the run ends; exit 0 only if it completed."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Plan a run for a profile and submit it (Slurm via submitit, or a local process)."""
    from vltrain.config import parse_overrides

    overrides = parse_overrides(set_)
    overrides |= {k: v for k, v in (("model", model), ("global_batch", global_batch), ("steps", steps)) if v is not None}
    prof, cfg, plan = build_run(profile, config, overrides)
    from clusterctl.launcher import check_job_name, launch_spec, render_sbatch
    from clusterctl.registry import Registry, RunRecord
    from clusterctl.rundir import runs_root, write_json, write_toml

    run_name = check_job_name(name or (cfg.model if isinstance(cfg.model, str) else cfg.model.name))
    reg = Registry()
    run_id = reg.new_run_id(run_name)
    run_dir = runs_root() / run_id
    if dry_run:
        spec = launch_spec(prof, run_dir, run_name, hold=hold)
        if json_:
            print_json({"plan": plan, "executor": spec.executor, "run_dir": str(run_dir),
                        "sbatch": render_sbatch(spec) if spec.executor == "slurm" else None, "env": spec.env})
            return
        from clusterctl.cmd_plan import print_plan

        print_plan(plan)
        if spec.executor == "slurm":
            output.console.print("[bold]sbatch script[/bold] (submitit would submit this):")
            output.console.print(render_sbatch(spec), markup=False, highlight=False, soft_wrap=True)
        else:
            output.console.print(f"local executor: {spec.params['tasks_per_node']} process(es) on this machine, run dir {run_dir}")
        return
    run_dir.mkdir(parents=True, mode=0o700)
    run = RunRecord(run_id=run_id, name=run_name, profile=prof.name, executor=prof.executor, run_dir=str(run_dir),
                    created_at=time.time(), user=getpass.getuser(), gpus=prof.world_size, total_steps=cfg.steps,
                    state="SUBMITTING", config=cfg.to_dict(), plan=plan | {"max_retries": max_retries})
    try:
        write_toml(run_dir / "config.toml", cfg.to_dict())
        write_json(run_dir / "plan.json", run.plan)
        write_json(run_dir / "profile.json", prof.to_dict())
        from vltrain.dsconfig import deepspeed_config

        write_json(run_dir / "ds_config.json", deepspeed_config(cfg, cfg.micro_batch, cfg.accumulation, prof.world_size))
        reg.add_run(run)
        job_id = submit_attempt(reg, run, prof, "submit", hold=hold)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-written: no directory, no registry row
        reg.delete_run(run_id)
        raise
    if json_:
        print_json({"run_id": run_id, "job_id": job_id, "run_dir": str(run_dir), "plan": plan})
    else:
        output.console.print(f"submitted [bold]{run_id}[/bold] as job {job_id} on {prof.name} ({prof.world_size} x {prof.gpu.model})")
        output.console.print(f"  run dir  {run_dir}")
        output.console.print(f"  follow   clusterctl status {run_id}   |   clusterctl logs {run_id} --follow")
    if watch:
        from clusterctl.cmd_watch import watch_runs

        raise typer.Exit(watch_runs([run_id]))
    elif wait:
        final = follow_log(reg, reg.get_run(run_id), rank=0, stderr=False)
        if final in ACTIVE:  # Ctrl-C: stopped waiting, not the run
            raise typer.Exit(130)
        _print_outcome(reg.get_run(run_id), final)
        if final != "COMPLETED":
            raise typer.Exit(1)


def _print_outcome(run, state: str) -> None:
    """One line for the end of a run, with its evaluation when the trainer wrote one."""
    colour = "green" if state == "COMPLETED" else "red"
    output.console.print(f"run {run.run_id}: [{colour}]{state}[/{colour}]")
    from clusterctl.cmd_watch import _eval

    ev = _eval(Path(run.run_dir))
    if ev:
        chance = json.loads((Path(run.run_dir) / "eval.json").read_text()).get("chance_r1")
        output.console.print("held-out eval: " + "  ".join(f"{k} {v:.3f}" for k, v in ev.items())
                      + (f"  (chance R@1 {chance:.4f})" if isinstance(chance, (int, float)) else ""))


def _latest_job(reg, run) -> Any:
    jobs = reg.jobs(run.run_id)
    if not jobs:
        raise UserError(f"RUN: {run.run_id} has no Slurm job yet; allowed: a run that was submitted")
    return jobs[-1]


def logs(
    run: str = typer.Argument(..., help="Run id, id prefix or name."),
    rank: int = typer.Option(0, "--rank", min=0, help="Global rank whose log to show."),
    stderr: bool = typer.Option(False, "--stderr", help="Show stderr instead of stdout."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines of the latest job until the run ends (Ctrl-C stops)."),
    job: str = typer.Option(None, "--job", help="A specific Slurm job id of the run (default: the latest)."),
) -> None:
    """Print a rank's log of a run's latest job (requeued attempts append to the same file)."""
    from clusterctl.registry import Registry
    from clusterctl.rundir import task_log

    reg = Registry()
    r = reg.get_run(run)
    if rank >= r.gpus:
        raise UserError(f"--rank: {rank} is out of range; allowed: 0 to {r.gpus - 1}")
    if follow:
        follow_log(reg, r, rank, stderr)
        return
    job_id = job or _latest_job(reg, r).job_id
    path = task_log(Path(r.run_dir), job_id, rank, stderr)
    if not path.exists():
        raise UserError(f"{path}: no log yet (job {job_id} may still be pending)")
    sys.stdout.buffer.write(path.read_bytes())
    sys.stdout.buffer.flush()


def follow_log(reg, run, rank: int, stderr: bool, poll_s: float = 1.0) -> str:
    """Print new bytes of the rank's log of the run's latest job (it changes on retry or resume)
    until the run is no longer active; returns the final state. Ctrl-C stops following."""
    from clusterctl.rundir import task_log

    offsets: dict[str, int] = {}
    state = run.state
    try:
        while True:
            state = _refresh_state(reg, run)
            jobs = reg.jobs(run.run_id)
            if jobs:
                job_id = jobs[-1].job_id
                path = task_log(Path(run.run_dir), job_id, rank, stderr)
                if path.exists():
                    with path.open("rb") as f:
                        f.seek(offsets.get(job_id, 0))
                        chunk = f.read()
                        offsets[job_id] = f.tell()
                    if chunk:
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.buffer.flush()
            if state not in ACTIVE:
                return state
            time.sleep(poll_s)
    except KeyboardInterrupt:  # the run is in its own session: it goes on (launcher._own_session)
        print(f"\nstopped following; {run.run_id} is {state} and goes on (clusterctl cancel {run.name} stops it)",
              file=sys.stderr, flush=True)
        return state


def _refresh_state(reg, run) -> str:
    """The run's state now, after retrying it if its last job failed for a cluster reason."""
    from clusterctl.cmd_status import refresh
    from clusterctl.retry import reconcile

    state = refresh(reg, [run])[run.run_id]
    run.state = state
    if state in ("FAILED", "NODE_FAIL") and reconcile(reg, [run]):
        run.state = state = reg.get_run(run.run_id).state
    return state


def cancel(run: str = typer.Argument(..., help="Run id, id prefix or name.")) -> None:
    """Cancel a run's active job (scancel on Slurm; SIGTERM to the local job's controller)."""
    from clusterctl.registry import Registry

    reg = Registry()
    r = reg.get_run(run)
    job = _latest_job(reg, r)
    if r.executor == "slurm":
        from clusterctl.slurm import scancel

        scancel(job.job_id)
    else:
        _terminate_local(int(job.job_id))
    reg.update_job(job.job_id, state="CANCELLED", ended_at=time.time())
    reg.set_run_state(r.run_id, "CANCELLED")
    reg.add_event(r.run_id, "cancel", {"job_id": job.job_id})
    output.console.print(f"cancelled {r.run_id} (job {job.job_id})")


def _terminate_local(pid: int) -> None:
    """SIGTERM the trainer processes of a local job (they checkpoint and exit), then submitit's
    controller: the controller alone does not pass the signal on to its children."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for p in [*map(int, children), pid]:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass


def resume(
    run: str = typer.Argument(..., help="Run id, id prefix or name."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Resubmit a stopped run; the trainer continues from the newest complete checkpoint."""
    from clusterctl.registry import Registry

    reg = Registry()
    r = reg.get_run(run)
    state = _refresh_state(reg, r)
    if state in ACTIVE:
        raise UserError(f"RUN: {r.run_id} is {state}; allowed: a run that is not pending or running (cancel it first)")
    prof = run_profile(r)
    ckpts = sorted((Path(r.run_dir) / "checkpoints").glob("step_*"))
    job_id = submit_attempt(reg, r, prof, "resume")
    where = f"from {ckpts[-1].name}" if ckpts else "from the start (no complete checkpoint yet)"
    if json_:
        print_json({"run_id": r.run_id, "job_id": job_id, "resume_from": ckpts[-1].name if ckpts else None})
    else:
        output.console.print(f"resumed {r.run_id} as job {job_id}, {where}")
