"""The whole run a plan implies: wall time, GPU-hours, energy and CO2 at the plan's expected MFU, and how
far that is from the run the recipe's paper states (pure but for reading the recipe).

One function, `whole_run`, for all three places that state it, so that they agree: human and JSON
`plan`, `submit --dry-run` (and the estimate stored with each run), and `estimate --profile P` with
no work given (the profile's recipe). The work is steps x global batch x the plan's FLOPs per sample;
the MFU is the plan's expected one (DEFAULT_MFU lowered by the communication compute does not hide),
in model FLOPs as `estimate` counts it (recomputation excluded; HFU beside it);
the setup (power, PUE, grid intensity) is planning.site's, as `estimate` builds it.

The paper's run comes from the recipe's `[paper]` table (planning.recipes.paper_facts): its stated
duration on its GPUs (else its stated GPU-hours). A recipe whose GPU-hours are PAPER_FAR (2x) or
more from the paper's gets a warning saying by how much, and why that matters: a shorter run means
the recipe's model or steps are far smaller than the paper's; a longer one that the paper's time
needs a higher MFU than the plan expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.planning.estimates import Work, count_words, estimate

if TYPE_CHECKING:
    from clusterctl.planning.estimates import Setup
    from clusterctl.planning.plan import Plan
    from clusterctl.planning.profiles import ClusterProfile
    from vltrain.config import TrainConfig

PAPER_FAR = 2.0  # a recipe whose GPU-hours are this far (either way) from the paper's gets a warning


def run_work(plan: Plan, steps: int) -> Work:
    """The run's FLOPs: steps x global batch x the plan's FLOPs per sample (its objectives; those that
    run with recomputation, and the model's without)."""
    samples = steps * plan.split.global_batch
    return Work(
        flops=samples * plan.flops_per_sample,
        model_flops=samples * plan.model_flops_per_sample(),
        describe=f"{steps:,} steps x {plan.split.global_batch:,} samples ({count_words(samples)})",
    )


def whole_run(
    profile: ClusterProfile, plan: Plan, steps: int, setup: Setup | None = None, recipe: Path | None = None
) -> dict[str, Any]:
    """Time, GPU-hours, kWh and CO2 of `steps` optimizer steps at the plan's expected MFU, on the
    profile's setup (planning.site.make_setup) unless `setup` is given (estimate's overrides); with
    the `recipe` file, the paper's run beside it ("paper", see paper_run) and the recipe's name."""
    from clusterctl.planning.cost import money
    from clusterctl.planning.site import make_setup

    e = estimate(setup or make_setup(profile), run_work(plan, steps), plan.model_mfu_expected())
    d = {k: v for k, v in e.to_dict().items() if k != "findings"}
    d |= {"steps": steps, "samples": steps * plan.split.global_batch, "recipe": recipe.stem if recipe else None}
    d["money"] = money(d["gpu_hours"], d["energy_kwh"], profile)  # None without a [cost] price
    # a CPU profile's hours are no GPU-hours: the paper's run is set beside GPU runs only
    paper = paper_run(recipe_facts(recipe), d) if profile.gpu.kind == "cuda" else None
    return d | {"paper": paper.to_dict() if paper else None}


@dataclass(frozen=True)
class PaperRun:
    """The run the paper states: its GPU-hours (its duration x its GPUs, else its GPU-hour figure)."""

    gpu_hours: float
    duration_h: float | None
    gpus: int | None
    ratio: float  # the paper's GPU-hours / the recipe's

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu_hours": self.gpu_hours,
            "duration_h": self.duration_h,
            "gpus": self.gpus,
            "ratio": round(self.ratio, 4),
        }


def paper_run(facts: Any, run: dict[str, Any]) -> PaperRun | None:
    """The paper's run against `run` (whole_run's dict); None when the paper states neither a duration
    on a GPU count nor GPU-hours. A stated duration wins over stated GPU-hours: it is what the paper
    measured, while GPU-hour figures are often derived (seed 000's 750,000 is 23x its 6 weeks x 32)."""
    if facts is None:
        return None
    if facts.duration_h and facts.gpus:
        gpu_h = facts.duration_h * facts.gpus
    elif facts.gpu_hours:
        gpu_h = float(facts.gpu_hours)
    else:
        return None
    return PaperRun(gpu_h, facts.duration_h, facts.gpus, gpu_h / run["gpu_hours"] if run["gpu_hours"] else 0.0)


def duration_words(hours: float) -> str:
    """'12.2 h', '276 h (11.5 days)', '1,008 h (6.0 weeks)': hours, then the unit a person reads; a
    twin's seconds or minutes as such ('4.2 s', '12 min')."""
    if hours < 1 / 60:
        return f"{hours * 3600:.2g} s"
    if hours < 1:
        return f"{hours * 60:.2g} min"
    h = f"{hours:,.1f} h" if hours < 100 else f"{hours:,.0f} h"
    if hours >= 24 * 7 * 3:
        return f"{h} ({hours / 168:,.1f} weeks)"
    return f"{h} ({hours / 24:,.1f} days)" if hours >= 48 else h


def paper_warnings(run: dict[str, Any]) -> list[str]:
    """The plan's warning when the whole run (whole_run's dict) is PAPER_FAR or more from the paper's."""
    p = run.get("paper")
    if not p:
        return []
    line = paper_warning(run["recipe"], run, PaperRun(p["gpu_hours"], p["duration_h"], p["gpus"], p["ratio"]))
    return [line] if line else []


def paper_warning(recipe: str, run: dict[str, Any], paper: PaperRun) -> str | None:
    """One line when the recipe's run is PAPER_FAR or more from the paper's, else None."""
    if not run["gpu_hours"] or 1 / PAPER_FAR < paper.ratio < PAPER_FAR:
        return None
    ours = f"{duration_words(run['hours'])} on {run['gpus']} GPUs" if run.get("hours") else "-"
    if paper.duration_h and paper.gpus:
        theirs = f"{duration_words(paper.duration_h)} on {paper.gpus} GPUs"
    else:
        theirs = f"{count_words(paper.gpu_hours)} GPU-hours"
    if paper.ratio > 1:
        gap = f"{paper.ratio:,.0f}x shorter" if paper.ratio >= 10 else f"{paper.ratio:.1f}x shorter"
        why = "the model or steps are far smaller than the paper's"
    else:
        gap = f"{1 / paper.ratio:.1f}x longer"
        need = run["mfu"] / paper.ratio
        why = f"the paper's time needs {need:.0%} MFU, the plan expects {run['mfu']:.0%}"
    return (
        f"duration: recipe {recipe} runs {ours} ({count_words(run['gpu_hours'])} GPU-hours) at the expected "
        f"{run['mfu']:.0%} MFU; the paper states {theirs}: {gap} ({why})"
    )


def recipe_facts(path: Path | None) -> Any:
    """The recipe's PaperFacts (planning.recipes.paper_facts), None without a recipe file."""
    if path is None:
        return None
    from clusterctl.planning.recipes import paper_facts

    return paper_facts(path)


def recipe_config(profile: ClusterProfile) -> tuple[TrainConfig, Path]:
    """The train config of the recipe the profile names, as `plan --profile` reads it (no flags on top)."""
    from clusterctl.planning.recipes import find_recipe
    from vltrain.common.errors import UserError
    from vltrain.config import load_train_config

    if not profile.recipe:
        raise UserError(f"--profile: {profile.name} names no recipe; allowed: a profile with recipe = NAME")
    path = find_recipe(profile.recipe, f"profile {profile.name}: recipe")
    return load_train_config(path, None), path


def recipe_model(cfg: TrainConfig) -> str:
    """The name of the model a config trains (a preset's name, or its table's)."""
    return cfg.model if isinstance(cfg.model, str) else cfg.model.name


def recipe_plan(profile: ClusterProfile, cfg: TrainConfig | None = None) -> tuple[Plan, TrainConfig, Path]:
    """The plan of the recipe the profile names (`cfg`: its config, already read), as `plan --profile`."""
    from clusterctl.planning.plan import plan_for_run

    cfg2, path = recipe_config(profile)
    plan, resolved = plan_for_run(profile, cfg or cfg2)
    return plan, resolved, path
