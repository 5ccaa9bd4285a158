"""The final evaluation as its own small job after training (train config `eval_after = "job"`).

Why: a run's last evaluation can take minutes; inside the training allocation every node waits for
it. With `eval_after = "job"` the trainer skips its own final evaluation (TrainConfig.final_eval_in_training;
periodic `eval_every` evaluations still run in training) and clusterctl queues a one-task job with one
GPU (Backend.side_spec, in <run_dir>/side/eval/) that starts once the training job COMPLETED
(afterok) and runs what `vltrain eval --run-dir RUN_DIR` runs (vltrain.evaluate.evaluate_run: the newest
sound checkpoint, on one process), writing eval.json atomically; `status` shows it when it lands.

Each new attempt of the run (retry, resume) has a new job id: `arm` queues a new evaluation after it
(runs.dependencies.on_new_attempt calls it from submit_attempt) and records it (registry event
"eval_job"); a Slurm requeue keeps the id, and the queued evaluation with it. The job before it was
cancelled by Slurm when the attempt it waited for failed (--kill-on-invalid-dep). A profile with no
scheduler (the local executor) is refused at submit, in one line (`problems`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vltrain.common.errors import UserError

if TYPE_CHECKING:
    from clusterctl.planning.profiles import ClusterProfile
    from clusterctl.runs.registry import Registry
    from clusterctl.specs import RunRecord

EVENT = "eval_job"  # registry event: {"job_id": the evaluation's job, "after": the training job it waits for}
KIND = "eval"  # its submitit folder: <run_dir>/side/eval/


def wanted(config: dict[str, Any]) -> bool:
    """Does this run's resolved config (RunRecord.config) queue its final evaluation as a job?"""
    return config.get("eval_after") == "job"


def job_name(run_name: str) -> str:
    """The evaluation job's name: the run's, with `-eval` (within Slurm's 64 characters)."""
    return f"{run_name[:59]}-eval"


def problems(profile: ClusterProfile, config: dict[str, Any]) -> list[str]:
    """What submit must refuse about eval_after for this profile (pure): 'job' needs a scheduler that
    holds a job until another completes (the backend's side_spec says whether it has one)."""
    from clusterctl.backends import get_backend

    if not wanted(config):
        return []
    try:
        get_backend(profile.executor).side_spec(profile, Path("/run"), job_name("run"), KIND, "afterok:1", gpus=1)
    except UserError:
        return [
            f"eval_after: 'job' queues the final evaluation as a job after training, and profile {profile.name!r} "
            f"(executor {profile.executor!r}) has no scheduler to queue it; allowed: eval_after = 'train' (the "
            "default: evaluate at the end of training) or a Slurm profile"
        ]
    return []


class EvalJob:
    """What the evaluation job runs: `vltrain eval --run-dir RUN_DIR`'s evaluation (evaluate_run), which
    writes eval.json atomically. Held-out shards missing: nothing to evaluate, as in training."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = str(run_dir)

    def __call__(self) -> dict[str, Any] | None:
        from vltrain.config import load_train_config
        from vltrain.evaluate import default_eval_shards, eval_line, evaluate_run
        from vltrain.rundir import RunDir

        if not default_eval_shards(load_train_config(RunDir(self.run_dir).config)):
            print("no held-out shards: nothing to evaluate", flush=True)
            return None
        result = evaluate_run(self.run_dir)
        print(eval_line(int(result["step"]), result), flush=True)
        return result


def latest(reg: Registry, run_id: str, queued: bool = False) -> dict[str, Any] | None:
    """The run's newest "eval_job" event's data (`queued`: the newest that queued a job, not a miss),
    None if none."""
    found = [
        e["data"] for e in reg.events(run_id) if e.get("kind") == EVENT and (e["data"].get("job_id") or not queued)
    ]
    return found[-1] if found else None


def arm(reg: Registry, run: RunRecord, profile: ClusterProfile, train_job: str) -> str | None:
    """Queue the run's evaluation after its training job `train_job` (edge: submits); returns the
    evaluation's job id, or None when the run evaluates in training or one already waits for that job
    (a requeue keeps the id). An evaluation still queued after an older attempt is cancelled first."""
    from clusterctl.backends import get_backend

    if not wanted(run.config):
        return None
    before = latest(reg, run.run_id, queued=True)
    if before and before.get("after") == train_job:
        return None
    backend = get_backend(run.executor)
    if before:
        with contextlib.suppress(UserError):  # it ended already (Slurm cancelled it with its attempt)
            backend.cancel(str(before["job_id"]))
    spec = backend.side_spec(profile, Path(run.run_dir), job_name(run.name), KIND, f"afterok:{train_job}", gpus=1)
    import submitit

    with submitit.helpers.clean_env():  # from inside a job (the follow-up's retry): not its SLURM_*
        job_id = backend.submit(spec, EvalJob(run.run_dir))
    reg.add_event(run.run_id, EVENT, {"job_id": job_id, "after": train_job})
    return job_id
