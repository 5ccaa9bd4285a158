"""sbatch as submitit calls it, bounded in time and read strictly (imported only to submit).

submitit runs `sbatch <script>` through subprocess with no time-out and reads the job id with a
loose regex (`job (\\d+)` anywhere), raising a multi-line FailedSubmissionError when it finds none:
a hung controller, or an sbatch wrapper on PATH that never returns, hung `submit` for ever, and odd
output was a traceback. Here submitit's executor keeps its own flow (script, job folder, pickles)
and changes two steps: the command runs under coreutils' `timeout`, which signals sbatch's whole
process group, and the output is parsed by parse.sbatch_job_id. Each failure is one line.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import submitit
from submitit.core import utils

from clusterctl.backends.slurm.commands import TIMEOUT_ENV, configured_timeout
from clusterctl.backends.slurm.parse import sbatch_job_id
from vltrain.common.errors import UserError

# Seconds sbatch may take to hand the job to slurmctld: longer than a status refresh's 10 s, since a
# busy controller accepts a job more slowly than it answers squeue; $CLUSTERCTL_SLURM_TIMEOUT replaces it.
SBATCH_TIMEOUT_S = 60.0
KILL_AFTER_S = 5  # after the time-out's TERM, KILL: an sbatch that ignores TERM still ends
TIMED_OUT = (124, 137)  # timeout(1)'s exit codes: TERM sent at the limit, KILL after KILL_AFTER_S


def sbatch_timeout() -> float:
    """$CLUSTERCTL_SLURM_TIMEOUT when set (one-line error when it is not a time-out), else SBATCH_TIMEOUT_S."""
    return configured_timeout(SBATCH_TIMEOUT_S)


def bounded(argv: list[str], seconds: float) -> list[str]:
    """`argv` under coreutils' timeout (pure but for finding it; without it, unbounded as before)."""
    if shutil.which("timeout") is None:
        return argv
    return ["timeout", f"--kill-after={KILL_AFTER_S}", f"{seconds:g}", *argv]


class BoundedSlurmExecutor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor with sbatch bounded by `sbatch_timeout_s` and its output read strictly."""

    def __init__(self, *args: Any, sbatch_timeout_s: float = SBATCH_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sbatch_timeout_s = sbatch_timeout_s

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return bounded(super()._make_submission_command(submission_file_path), self.sbatch_timeout_s)

    @staticmethod
    def _get_job_id_from_submission_command(string: bytes | str) -> str:
        return sbatch_job_id(string.decode(errors="replace") if isinstance(string, bytes) else string)

    def _submit_command(self, command: str) -> Any:
        try:
            return super()._submit_command(command)
        except utils.FailedJobError as e:
            cause = e.__cause__
            if isinstance(cause, subprocess.CalledProcessError) and cause.returncode in TIMED_OUT:
                raise UserError(
                    f"sbatch: did not answer within {self.sbatch_timeout_s:g} s (${TIMEOUT_ENV}, default "
                    f"{SBATCH_TIMEOUT_S:g}); it may still have queued the job: check `squeue --me` before "
                    f"submitting again; allowed: a retry once slurmctld answers, or a longer ${TIMEOUT_ENV}"
                ) from None
            raise
