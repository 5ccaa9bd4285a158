"""A sweep's points as ONE Slurm job array (submitit's array submission), each task in its own run.

Every point is a run of its own (run directory, registry row, retries), but submitit's array has one
folder for all its tasks. The sweep directory holds `tasks/<i>`, a link to point i's run directory,
and the array's folder is `<sweep dir>/tasks/%a/submitit/%A_%a`: Slurm expands %a in each task's
--output, and submitit moves task i's pickle to `tasks/i/submitit/<A>_<i>/`, so through the link
each task's pickle and logs land in its own run directory under its job id `<A>_<i>`, where a single
job's would (`clusterctl logs`, the result pickles, runs.repair). The one script all tasks share
picks each task's set-up (its `cd`, its run directory's environment) by $SLURM_ARRAY_TASK_ID.

The array is submitted held and released once submitit has moved the pickles: a task that started
before its folder existed could not open its log (Slurm would fail it with nothing written).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from clusterctl.specs import LaunchSpec
from vltrain.common.errors import UserError

TASKS = "tasks"  # <sweep dir>/tasks/<i> -> point i's run directory


def task_setup(setups: list[list[str]]) -> list[str]:
    """One set-up for the array's script: task i runs point i's own lines (pure)."""
    lines = ['case "${SLURM_ARRAY_TASK_ID:-}" in']
    for i, setup in enumerate(setups):
        lines += [f"{i})", *setup, ";;"]
    lines += ['*) echo "clusterctl: array task ${SLURM_ARRAY_TASK_ID:-?} has no run" >&2; exit 1;;', "esac"]
    return lines


def array_spec(specs: list[LaunchSpec], sweep_dir: Path, max_parallel: int) -> LaunchSpec:
    """The array's launch spec from each point's own (pure): the same sbatch parameters, the set-up
    chosen per task, at most `max_parallel` tasks at once. Points whose jobs would differ in more
    than their run directory (e.g. a container's mounts) cannot share one array: one line."""
    first = specs[0]
    same = {k: v for k, v in first.params.items() if k not in ("setup", "job_name")}
    for i, s in enumerate(specs[1:], 1):
        other = {k: v for k, v in s.params.items() if k not in ("setup", "job_name")}
        if other != same:
            keys = sorted(k for k in set(same) | set(other) if same.get(k) != other.get(k))
            raise UserError(
                f"--sweep: point {i}'s Slurm job differs from point 0's in {', '.join(keys)}; allowed: "
                "sweeps over settings that keep the job's shape (one job array has one sbatch request)"
            )
    if "%" in str(sweep_dir):
        raise UserError(f"run directory: {str(sweep_dir)!r} contains '%'; allowed: a path without %")
    params: dict[str, Any] = dict(first.params)
    params["setup"] = task_setup([list(s.params["setup"]) for s in specs])
    params["array_parallelism"] = max(1, max_parallel)
    params["additional_parameters"] = dict(params.get("additional_parameters") or {}) | {"hold": True}
    folder = str(sweep_dir / TASKS / "%a" / "submitit" / "%A_%a")
    return dataclasses.replace(first, folder=folder, params=params, env={})


def link_tasks(sweep_dir: Path, run_dirs: list[Path]) -> None:
    """`tasks/<i>` -> point i's run directory (edge), before the array is submitted."""
    tasks = sweep_dir / TASKS
    tasks.mkdir(parents=True, exist_ok=True)
    for i, run_dir in enumerate(run_dirs):
        (tasks / str(i)).symlink_to(Path(run_dir).absolute(), target_is_directory=True)


def submit_array(spec: LaunchSpec, fns: list[Any], release: bool) -> list[str]:
    """Submit `fns` (one Attempt per point) as one array held, then release it unless the user asked
    for --hold (edge); returns the tasks' job ids `<A>_<i>`, in the points' order."""
    import submitit

    from clusterctl.backends import common
    from clusterctl.backends.slurm.parse import sbatch_error_line
    from clusterctl.backends.slurm.sbatch import sbatch_timeout

    ArrayExecutor = _array_executor()

    ex = ArrayExecutor(
        folder=spec.folder,
        max_num_timeout=spec.max_num_timeout,
        python=common.job_python(spec.python),
        sbatch_timeout_s=sbatch_timeout(),
    )
    ex.update_parameters(**spec.params)
    try:
        with common.quiet_fds((2,)):
            jobs = ex.submit_array(fns)
    except submitit.core.utils.FailedJobError as e:
        raise UserError(f"sbatch: {sbatch_error_line(str(e))}") from None
    ids = [str(j.job_id) for j in jobs]
    if release and ids:
        _release(ids[0].split("_")[0])
    return ids


def _release(array_id: str) -> None:
    """`scontrol release <A>`: every task of the held array may start (edge)."""
    from clusterctl.backends.slurm import commands as slurm

    try:
        r = slurm.run(["scontrol", "release", array_id], slurm.configured_timeout(30.0))
    except (OSError, TimeoutError) as e:
        r = None
        why = str(e)
    if r is None or r.returncode != 0:
        why = why if r is None else slurm.error_line(r.stderr, "scontrol")
        raise UserError(f"scontrol release {array_id}: {why}; allowed: `scontrol release {array_id}` by hand")


def _array_executor() -> type:
    """BoundedSlurmExecutor whose array submission keeps its python and bounded sbatch. Written here
    because submitit's own (SlurmExecutor._internal_process_submissions) submits through a plain
    SlurmExecutor it makes, with the default interpreter (no -P, not a container's) and unbounded sbatch."""
    import uuid

    from submitit.core import utils
    from submitit.slurm.slurm import SlurmJob

    from clusterctl.backends.slurm import commands as slurm
    from clusterctl.backends.slurm.sbatch import BoundedSlurmExecutor

    class FirstTask(BoundedSlurmExecutor):
        """sbatch's answer read as task 0's id: submitit files the array's script under the job it
        returns, and a folder with %a has no place for a bare array id (<A>_submission.sh goes to
        task 0's folder)."""

        @staticmethod
        def _get_job_id_from_submission_command(string: bytes | str) -> str:
            return BoundedSlurmExecutor._get_job_id_from_submission_command(string) + "_0"

    class ArrayExecutor(BoundedSlurmExecutor):
        def _internal_process_submissions(self, delayed: list[Any]) -> list[Any]:
            folder = utils.JobPaths.get_first_id_independent_folder(self.folder)
            folder.mkdir(parents=True, exist_ok=True)
            pickles = []
            for d in delayed:
                path = folder / f"{uuid.uuid4().hex}.pkl"
                d.set_timeout(self.parameters.get("time", 5), self.max_num_timeout)
                d.dump(path)
                pickles.append(path)
            ex = FirstTask(
                self.folder, self.max_num_timeout, python=self.python, sbatch_timeout_s=self.sbatch_timeout_s
            )
            ex.update_parameters(**self.parameters)
            ex.parameters["map_count"] = len(delayed)
            first = ex._submit_command(ex._submitit_command_str)
            array_id = str(first.job_id).split("_")[0]
            tasks = list(range(first.num_tasks))
            jobs: list[Any] = [
                SlurmJob(folder=self.folder, job_id=f"{array_id}_{a}", tasks=tasks) for a in range(len(delayed))
            ]
            try:
                for job, path in zip(jobs, pickles):
                    job.paths.move_temporary_file(path, "submitted_pickle")
            except BaseException:  # the array is held: nothing ran; leave nothing queued either
                with contextlib.suppress(UserError, OSError):
                    slurm.scancel(array_id)
                raise
            return jobs

    return ArrayExecutor
