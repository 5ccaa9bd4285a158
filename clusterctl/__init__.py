"""clusterctl: plan, submit, resume and account vision-language pre-training runs on Slurm."""

__version__ = "0.1.0"
