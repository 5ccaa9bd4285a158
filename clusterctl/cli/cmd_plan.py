"""`clusterctl plan`: split the global batch over a profile's GPUs and check it fits under ZeRO.

What it plans is what `submit` would run: the profile's recipe (or --config), with --model, --set
and the planning flags on top (the same flags as submit: cli/options.py PlanningFlags). The flag
names and JSON keys are a public interface (scripts depend on them).
"""

from __future__ import annotations

import typer

from clusterctl.cli.options import JSON, PlanningFlags, planning_flags
from clusterctl.render.output import print_json


@planning_flags
def plan(flags: PlanningFlags, json_: bool = JSON) -> None:
    """Split the global batch over the profile's GPUs and check it fits in GPU memory under ZeRO."""
    from clusterctl.planning.cpu_predict import plan_entry
    from clusterctl.runs.preflight import trainer_support

    # data checks are submit's; the whole run (planning.whole_run) is the plan's, submit's and `estimate`'s
    p = flags.prepare(check=False)
    d = p.plan | {"profile_source": p.profile_source} | plan_entry(p.profile, p.config.model, p.plan)  # CPU: issue 29
    if json_:
        print_json(d)
    else:
        from clusterctl.render.plan_view import print_plan
        from clusterctl.render.safe import printable
        from clusterctl.render.text import say

        say(f"profile {printable(p.profile.name)} from {printable(p.profile_source)}")
        print_plan(d)
        for line in trainer_support(p.config):
            say(f"note: {printable(line)}")
    if not p.plan["memory"]["fits"]:
        raise typer.Exit(1)
