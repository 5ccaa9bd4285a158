"""`clusterctl logs | cancel | resume`: a submitted run's logs and life cycle (clusterctl.runs.lifecycle)."""

from __future__ import annotations

import sys

import typer

from clusterctl.cli.options import RUN
from clusterctl.render import output
from clusterctl.render.output import print_json
from clusterctl.render.safe import printable
from clusterctl.runs.registry import Registry
from vltrain.common.errors import UserError


def logs(
    run: str = RUN,
    rank: int = typer.Option(0, "--rank", min=0, help="Global rank whose log to show."),
    stderr: bool = typer.Option(False, "--stderr", help="Show stderr instead of stdout."),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing new lines of the latest job until the run ends (Ctrl-C stops)."
    ),
    job: str = typer.Option(None, "--job", help="A specific Slurm job id of the run (default: the latest)."),
) -> None:
    """Print a rank's log of a run's latest job (requeued attempts append to the same file)."""
    from clusterctl.runs.lifecycle import follow_log, latest_job, log_path

    reg = Registry()
    r = reg.get_run(run)
    if rank >= r.gpus:
        raise UserError(f"--rank: {rank} is out of range; allowed: 0 to {r.gpus - 1}")
    if follow:
        follow_log(reg, r, rank, stderr)
        return
    job_id = job or latest_job(reg, r).job_id
    path = log_path(r, job_id, rank, stderr)
    if not path.exists():
        raise UserError(f"{path}: no log yet (job {job_id} may still be pending)")
    sys.stdout.buffer.write(path.read_bytes())
    sys.stdout.buffer.flush()


def cancel(run: str = RUN) -> None:
    """Cancel a run's active job (scancel on Slurm; SIGTERM to the local job's trainer processes)."""
    from clusterctl.runs.lifecycle import cancel as cancel_run
    from clusterctl.runs.sweep import runs_of

    reg = Registry()
    if members := runs_of(reg, run):  # a sweep id: each of its runs still active
        _cancel_sweep(reg, run, members)
        return
    r = reg.get_run(run)
    reg.require_writable()  # a cancel the registry cannot record would leave it saying the run goes on
    job = cancel_run(reg, r)
    output.console.print(f"cancelled {printable(r.run_id)} (job {printable(job.job_id)})", markup=False)


def _cancel_sweep(reg: Registry, sweep_id: str, runs: list) -> None:
    """cancel SWEEP: each run of the sweep that is still pending or running (lifecycle.cancel)."""
    from clusterctl.runs.lifecycle import cancel as cancel_run
    from clusterctl.specs import ACTIVE_STATES

    reg.require_writable()
    active = [r for r in runs if r.state in ACTIVE_STATES]
    for r in active:
        job = cancel_run(reg, r)
        output.console.print(f"cancelled {printable(r.run_id)} (job {printable(job.job_id)})", markup=False)
    if not active:
        output.console.print(f"sweep {printable(sweep_id)}: no run still pending or running", markup=False)


def resume(
    run: str = RUN,
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    allow_env: bool = typer.Option(
        False,
        "--allow-env",
        help="Resubmit even if the run directory's profile.json sets environment variables that load code "
        "(read it first: a run directory can be forged or edited).",
    ),
    steps: int = typer.Option(
        None, "--steps", min=1, help="Extend the run to N optimizer steps (the cosine decay is re-planned over N)."
    ),
) -> None:
    """Resubmit a stopped run; the trainer continues from the newest complete checkpoint."""
    from clusterctl.runs.lifecycle import resume as resume_run

    reg = Registry()
    r = reg.get_run(run)
    reg.require_writable()
    job_id, ckpt, skipped = resume_run(reg, r, allow_env=allow_env, steps=steps)
    if json_:
        print_json({"run_id": r.run_id, "job_id": job_id, "resume_from": ckpt, "skipped_checkpoints": skipped})
        return
    where = f"from {printable(ckpt)}" if ckpt else "from the start (no complete checkpoint yet)"
    output.console.print(f"resumed {printable(r.run_id)} as job {printable(job_id)}, {where}", markup=False)
    for line in skipped:
        output.console.print(f"  skipped damaged checkpoint {printable(line)}", markup=False, soft_wrap=True)
