"""Which node a failed job's failure came from (pure but read_tail: tested on srun output recorded on 22.05).

When one rank dies, srun (--kill-on-bad-exit) kills the others, and its stderr (the batch script's:
rank 0's `<job>_0_log.err` under submitit) names each task as it ends, the culprit first:

    srun: error: a2: task 1: Killed
    srun: launch/slurm: _step_signal: Terminating StepId=545.0
    srun: error: a1: task 0: Terminated

Only the first such line is the failure; the tasks killed after it are its victims. A node that
dies whole is `srun: error: Node failure on a2`. When srun says nothing (it was killed too), a job
that ended NODE_FAIL names its nodes that Slurm marks down, drained or failing (`sinfo -N`).
"""

from __future__ import annotations

import re
from pathlib import Path

# srun's per-task end line: "srun: error: NODE: task N: WHY" (or "tasks 0-3: WHY" for several
# tasks of one node); and its node-failure line.
_TASK_END = re.compile(r"^srun: error: (?P<node>[^\s:]+): tasks? [\d,\-]+: (?P<why>.+?)\s*$")
_NODE_FAILURE = re.compile(r"^srun: error: Node failure on (?P<node>[^\s:]+)\s*$")
# what an attempt's task logs when it starts (submitit, on every task): the lines after the last one
# are the last attempt's (a requeued job appends every attempt to the same file)
_ATTEMPT_START = "Starting with JobEnvironment"
# sinfo's node states that mean "this node is sick" (a trailing '*': not responding; '~' '#' '!' '%'
# '$' '@' '^' '-': power and reservation flags, not health)
SICK_STATES = ("down", "drain", "drained", "draining", "fail", "failing", "not_responding")


def last_attempt(text: str) -> str:
    """The part of a job's log written by its last attempt (after the last task start line)."""
    at = text.rfind(_ATTEMPT_START)
    return text if at < 0 else text[at:]


def culprit(text: str) -> tuple[str | None, str]:
    """The node whose task ended first in srun's stderr `text` (the last attempt's), and srun's words;
    (None, "") when srun named none (the step was not started by srun, or srun was killed first)."""
    for line in last_attempt(text).splitlines():
        line = line.strip()
        if m := _NODE_FAILURE.match(line):
            return m["node"], "node failure"
        if m := _TASK_END.match(line):
            return m["node"], m["why"]
    return None, ""


def sick_nodes(sinfo_text: str) -> list[str]:
    """Nodes that `sinfo -h -N -o '%N|%T'` lists in a sick state (down*, drained, failing...), sorted."""
    out = set()
    for line in sinfo_text.splitlines():
        node, sep, state = line.strip().partition("|")
        token = state.strip().lower().rstrip("*~#!%$@^-+")
        if sep and node and (token in SICK_STATES or state.strip().endswith("*")):
            out.add(node)
    return sorted(out)


def read_tail(path: Path, limit: int = 1 << 20) -> str:
    """The last `limit` bytes of a log as text ("" when it cannot be read): the edge of this module."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
