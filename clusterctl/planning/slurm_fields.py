"""What a profile's [slurm] table may say (pure): time limits, the USR2 warning, extra sbatch options.

Each check returns a problem (words for a one-line UserError) or None. Why here: every one of these
was accepted once and failed later, on the cluster: a signal delay as long as the time limit made
the job requeue itself in a loop; an `extra` option abbreviated or outside clusterctl's control
changed who ran the job, where, or what sbatch printed (clusterctl reads the job id from it).
"""

from __future__ import annotations

import re

# Values of environment variables and sbatch options: no newline, quote, backslash, $ or backtick.
SAFE_VALUE = r"[A-Za-z0-9_.,:=/@%+\- ]{0,256}"
SAFE_VALUE_DOC = "up to 256 letters, digits, spaces and _.,:=/@%+- (no quotes, $, ` or newlines)"

TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_TIME_RES = [
    (re.compile(r"(\d+)"), ("m",)),
    (re.compile(r"(\d+):(\d{1,2})"), ("m", "s")),
    (re.compile(r"(\d+):(\d{1,2}):(\d{1,2})"), ("h", "m", "s")),
    (re.compile(r"(\d+)-(\d{1,2})"), ("d", "h")),
    (re.compile(r"(\d+)-(\d{1,2}):(\d{1,2})"), ("d", "h", "m")),
    (re.compile(r"(\d+)-(\d{1,2}):(\d{1,2}):(\d{1,2})"), ("d", "h", "m", "s")),
]
MAX_TIME_LIMIT_MIN = 365 * 1440


def slurm_time_to_minutes(text: str) -> float:
    """Slurm's time-limit formats (sbatch --time) to minutes; ValueError when it is none of them."""
    for rx, units in _TIME_RES:
        m = rx.fullmatch(text.strip())
        if m:
            parts = dict(zip(units, (int(g) for g in m.groups()), strict=True))
            if any(parts.get(u, 0) >= 60 for u in ("m", "s") if len(units) > 1 and u != units[0]):
                raise ValueError(text)
            if "h" in parts and units[0] != "h" and parts["h"] >= 24:
                raise ValueError(text)
            return parts.get("d", 0) * 1440 + parts.get("h", 0) * 60 + parts.get("m", 0) + parts.get("s", 0) / 60
    raise ValueError(text)


def check_time(text: str) -> str | None:
    try:
        minutes = slurm_time_to_minutes(text)
    except ValueError:
        return f"{text!r} is not a Slurm time limit"
    if minutes <= 0:
        return f"{text!r} is zero"
    if minutes > MAX_TIME_LIMIT_MIN:  # Slurm stores a longer one silently as something else
        return f"{text!r} is longer than {MAX_TIME_LIMIT_MIN // 1440} days"
    return None


# Slurm sends --signal's warning "up to 60 seconds earlier than specified" (sbatch(1)): its event
# loop runs about once a minute.
SIGNAL_SLACK_S = 60


def signal_delay_problem(time_limit: str, delay_s: int) -> str | None:
    """The USR2 warning must leave the job at least half its time limit to train: a job signalled
    at (or near) its start checkpoints and requeues itself before any step, for ever."""
    limit_s = slurm_time_to_minutes(time_limit) * 60
    most = int(limit_s / 2) - SIGNAL_SLACK_S
    if delay_s <= most:
        return None
    minutes = -(-2 * (delay_s + SIGNAL_SLACK_S) // 60)  # the shortest time limit that leaves room
    fix = (f"at most {most} s, or " if most >= 10 else "") + f"a time_limit of at least {minutes} minutes"
    return (
        f"{delay_s} s leaves too little of time_limit {time_limit!r} ({limit_s:g} s) to train (Slurm may signal "
        f"{SIGNAL_SLACK_S} s early; a job signalled at its start requeues itself in a loop); allowed: {fix} "
        f"(the warning plus {SIGNAL_SLACK_S} s within half the time limit)"
    )


# sbatch options clusterctl sets from the profile, or owns about a job: requeue on preemption, held
# submission, the environment the trainer gets, where logs go, one job per run.
MANAGED_SBATCH = frozenset(
    [
        "nodes",
        "ntasks-per-node",
        "gpus-per-node",
        "cpus-per-task",
        "mem",
        "time",
        "partition",
        "account",
        "qos",
        "constraint",
        "job-name",
        "output",
        "error",
        "signal",
        "gres",
        "array",
        "requeue",
        "no-requeue",
        "hold",
        "export",
        "export-file",
        "open-mode",
        "wckey",
        "exclusive",
        "ntasks",
        "gpus",
        "wrap",
        "chdir",
    ]
)
# sbatch options that change who runs the job, where, in what environment, or what sbatch prints.
UNSAFE_SBATCH = {
    "uid": "runs the job as another user",
    "gid": "runs the job as another group",
    "container": "runs the job in a container image the profile chooses",
    "container-id": "runs the job in a container the profile chooses",
    "get-user-env": "replaces the job's environment with a login shell's",
    "parsable": "changes what sbatch prints (clusterctl reads the job id from it)",
    "test-only": "submits nothing (clusterctl reads the job id from what sbatch prints)",
    "wait": "makes sbatch wait until the job ends",
    "clusters": "sends the job to another cluster, where status and cancel do not look",
    "cluster-constraint": "sends the job to another cluster, where status and cancel do not look",
    "mem-per-cpu": "conflicts with --mem, which clusterctl sets",
    "mem-per-gpu": "conflicts with --mem, which clusterctl sets",
    "help": "submits nothing",
    "usage": "submits nothing",
    "version": "submits nothing",
}
MAX_EXTRA = 32


def extra_problem(opts: dict[str, str]) -> str | None:
    """A problem with `slurm.extra`, or None. sbatch takes any unambiguous prefix of a long option
    (getopt_long: --ui=0 is --uid=0), so a prefix of a refused option is refused too."""
    refused = {k: "is set by clusterctl from the profile" for k in MANAGED_SBATCH} | UNSAFE_SBATCH
    for k, v in opts.items():
        if not re.fullmatch(r"[a-z][a-z0-9\-]{0,40}", k):
            return f"{k!r} is not an sbatch long option name"
        if k in refused:
            return f"{k!r} {refused[k]}"
        if full := next((o for o in sorted(refused) if o.startswith(k)), None):
            return f"{k!r} is a prefix sbatch may read as --{full}, and --{full} {refused[full]}"
        if not re.fullmatch(SAFE_VALUE, v):
            return f"{k}={v!r} has characters that are not allowed"
    return None
