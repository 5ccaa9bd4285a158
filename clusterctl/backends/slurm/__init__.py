"""The Slurm backend: commands (squeue, sacct, scancel at the edge), parse (their output, pure),
backend (the Backend: submitit's SlurmExecutor, polling, cancel)."""

from clusterctl.backends.slurm.backend import BACKEND, SlurmBackend

__all__ = ["BACKEND", "SlurmBackend"]
