"""What `clusterctl estimate` computes from what a user states about a run: the cluster (a profile and/or
overrides), how long or how much it trains (a wall time, GPU-hours, or the work: samples of a model
and/or tokens x parameters), and the figures someone claims, audited against the estimate.

Every figure a flag gave is checked for range first, one line naming the flag: finite, and below bounds
no run reaches (MAX_HOURS of wall time, MAX_GPU_HOURS, MAX_GPUS), so that no figure the estimate derives
overflows to inf or nan; a work whose GPU-hours still overflow is refused too. The estimate itself is
clusterctl.planning.estimates's (pure); the setup planning.site's. The planner (planning.plan, ~40 ms
to import) is loaded only when samples of a model are counted.
"""

from __future__ import annotations

from math import inf
from typing import Any, NamedTuple

from vltrain.common.errors import UserError

MAX_HOURS = 1e6  # wall time: 114 years
MAX_GPU_HOURS = 1e12  # 100 million GPUs for a year is 8.8e11
MAX_GPUS = 10_000_000
MAX_MWH = 1e12  # claimed energy: 30 years of the world's electricity
MAX_CO2_T = 1e12
# planning.plan.DEFAULT_MFU, copied (tests/test_import_hygiene.py checks they are equal): importing the
# planner costs ~40 ms, more than the rest of `estimate`.
DEFAULT_MFU = 0.40


class EstimateRequest(NamedTuple):
    """The `estimate` flags, by name (None: not given). A NamedTuple: `estimate` starts fast."""

    profile: str | None
    gpus: int | None
    duration: str | None
    hours: float | None
    gpu_hours: float | None
    samples: str | None
    epochs: float
    model: str | None
    tokens: str | None
    params: str | None
    activation_checkpointing: bool
    mfu: float | None  # None: the plan's expected MFU on --profile (its recipe's model), else DEFAULT_MFU
    peak_tflops: float | None
    power_w: float | None
    node_power_w: float | None  # None: the profile's, or the GPU model's default (assumed)
    pue: float | None
    country: str | None
    carbon_intensity: float | None
    claimed_gpu_hours: float | None
    claimed_duration: str | None
    claimed_energy_mwh: float | None
    claimed_co2_t: float | None


def check_ranges(q: EstimateRequest) -> None:
    """Every number given is finite and in its range (planning.site.number), checked before anything."""
    from clusterctl.planning.site import number

    if q.gpus is not None and not 1 <= q.gpus <= MAX_GPUS:  # an int: 400 digits do not fit a float
        raise UserError(f"--gpus: {shorten(str(q.gpus))} is not valid; allowed: an integer >= 1 and <= {MAX_GPUS:,}")
    for value, flag, lo, hi, lo_open in (
        (q.hours, "--hours", 0, MAX_HOURS, True),
        (q.gpu_hours, "--gpu-hours", 0, MAX_GPU_HOURS, True),
        (q.epochs, "--epochs", 0, 1e6, True),
        (q.mfu, "--mfu", 0, 1, True),
        (q.peak_tflops, "--peak-tflops", 0, 1e6, True),
        (q.power_w, "--power-w", 0, 1e5, True),
        (q.node_power_w, "--node-power-w", 0, 1e6, False),
        (q.pue, "--pue", 1, 3, False),
        (q.carbon_intensity, "--carbon-intensity", 0, 2000, False),
        (q.claimed_gpu_hours, "--claimed-gpu-hours", 0, MAX_GPU_HOURS, True),
        (q.claimed_energy_mwh, "--claimed-energy-mwh", 0, MAX_MWH, True),
        (q.claimed_co2_t, "--claimed-co2-t", 0, MAX_CO2_T, True),
    ):
        number(value, flag, lo, hi, lo_open=lo_open)
    for text, flag in ((q.duration, "--duration"), (q.claimed_duration, "--claimed-duration")):
        if text is not None:
            duration_hours(text, flag)


def shorten(text: str) -> str:
    """A flag's value in an error line: 400 digits are said as their count."""
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


def duration_hours(text: str, flag: str = "--duration") -> float:
    """A wall time flag (parse_duration) in hours, at most MAX_HOURS: 400 digits parse to inf."""
    from clusterctl.planning.estimates import parse_duration

    hours = parse_duration(text, flag)
    if not hours <= MAX_HOURS:
        raise UserError(
            f"{flag}: {shorten(text)} is {hours:.3g} h; allowed: a wall time > 0 and <= {MAX_HOURS:,.0f} h (114 years)"
        )
    return hours


def check_outcome(gpu_hours: float, hours: float | None) -> None:
    """The estimate's GPU-hours and wall time finite and at most their bounds (a vast work at a tiny --mfu
    overflows): one line, with what to change."""
    if not gpu_hours <= MAX_GPU_HOURS or (hours is not None and not hours < inf):
        raise UserError(
            f"estimate: the work comes to {gpu_hours:.3g} GPU-hours; allowed: at most {MAX_GPU_HOURS:.0e} "
            "(less work: --samples, --epochs, --tokens; or a higher --mfu)"
        )


def estimate_run(q: EstimateRequest) -> dict[str, Any]:
    """The estimate (time, GPU-hours, energy, CO2) and its findings (the work's two statements, the
    claims) as `estimate --json` prints them."""
    from clusterctl.planning.estimates import Claims, audit, estimate
    from clusterctl.planning.site import make_setup

    check_ranges(q)
    time_given = [
        n for n, v in (("--duration", q.duration), ("--hours", q.hours), ("--gpu-hours", q.gpu_hours)) if v is not None
    ]
    work_given = [n for n, v in (("--samples", q.samples), ("--tokens", q.tokens)) if v is not None]
    if len(time_given) > 1 or (time_given and work_given):
        first, second = (time_given + work_given)[:2]
        raise UserError(
            f"{second}: given together with {first}; allowed: one of --duration, --hours, --gpu-hours, or the work "
            "(--samples and/or --tokens)"
        )
    prof = None
    if q.profile:
        from clusterctl.planning.profiles import load_profile

        prof = load_profile(q.profile, flag="--profile")
    if (q.duration is not None or q.hours is not None) and not (q.gpus or prof):
        raise UserError("--gpus: no GPU count; allowed: --profile P or --gpus N")
    setup = make_setup(
        prof,
        gpus=q.gpus,
        peak_tflops=q.peak_tflops,
        power_w=q.power_w,
        node_power_w=q.node_power_w,
        pue=q.pue,
        country=q.country,
        carbon_intensity=q.carbon_intensity,
    )
    recipe = recipe_run(q, prof)
    work, agreement = (recipe.work, None) if recipe else stated_work(q)
    mfu, mfu_source = run_mfu(q, prof, work, recipe)
    est = estimate(setup, work, mfu)
    check_outcome(est.gpu_hours, est.hours)
    claims = Claims(
        gpu_hours=q.claimed_gpu_hours,
        hours=duration_hours(q.claimed_duration, "--claimed-duration") if q.claimed_duration else None,
        energy_kwh=q.claimed_energy_mwh * 1000 if q.claimed_energy_mwh is not None else None,
        co2_kg=q.claimed_co2_t * 1000 if q.claimed_co2_t is not None else None,
    )
    from clusterctl.planning.cost import money

    est.findings = ([agreement] if agreement else []) + audit(setup, est, claims)
    return (
        est.to_dict()
        | {
            "profile": q.profile,
            "country": q.country.upper() if q.country else prof.site.country_iso if prof else None,
            "mfu_source": mfu_source,
            "money": money(est.gpu_hours, est.energy_kwh, prof),  # planning.cost: None without a price
        }
        | (recipe.paper(est.to_dict()) if recipe else {})
    )


class RecipeRun(NamedTuple):
    """`estimate --profile P` with no time or work: the whole run of P's recipe, as `plan` states it."""

    plan: Any  # planning.plan.Plan
    work: Any  # planning.estimates.Work: steps x global batch x the plan's FLOPs per sample
    path: Any  # the recipe's file (its [paper] table)
    steps: int

    def paper(self, est: dict[str, Any]) -> dict[str, Any]:
        """The paper's run beside the estimate, and the plan's warning when far from it (planning.whole_run)."""
        from clusterctl.planning.whole_run import paper_run, paper_warnings, recipe_facts

        d = est | {"recipe": self.path.stem, "steps": self.steps}
        paper = paper_run(recipe_facts(self.path), d)
        d["paper"] = paper.to_dict() if paper else None
        return {"recipe": d["recipe"], "steps": self.steps, "paper": d["paper"], "warnings": paper_warnings(d)}


def recipe_run(q: EstimateRequest, prof: Any) -> RecipeRun | None:
    """The profile's recipe as its whole run when --profile is the only statement of the run (no time,
    no work); None otherwise."""
    given = (q.duration, q.hours, q.gpu_hours, q.samples, q.tokens)
    if prof is None or not prof.recipe or any(v is not None for v in given):
        return None
    from clusterctl.planning.whole_run import recipe_plan, run_work

    plan, cfg, path = recipe_plan(prof)
    return RecipeRun(plan, run_work(plan, cfg.steps), path, cfg.steps)


def run_mfu(q: EstimateRequest, prof: Any, work: Any, recipe: RecipeRun | None) -> tuple[float, str]:
    """The MFU the estimate assumes, and where it comes from: --mfu; else, for a work in FLOPs on
    --profile, the expected MFU of the plan of its recipe (when the work's model is the recipe's:
    what `plan` states for the whole run); else DEFAULT_MFU."""
    if q.mfu is not None:
        return q.mfu, "--mfu"
    if work.flops is None or prof is None or not prof.recipe:
        return DEFAULT_MFU, "assumed"
    if recipe is None:
        from clusterctl.planning.whole_run import recipe_config, recipe_model, recipe_plan

        cfg, _ = recipe_config(prof)
        if q.model is not None and q.model != recipe_model(cfg):  # no plan of it: the planner is not loaded
            return DEFAULT_MFU, f"assumed ({prof.recipe} trains {recipe_model(cfg)}, not {q.model})"
        plan = recipe_plan(prof, cfg)[0]
    else:
        plan = recipe.plan
    return plan.model_mfu_expected(), f"the plan's expected MFU for {prof.recipe} on {prof.name}"


def stated_work(q: EstimateRequest) -> tuple[Any, dict[str, Any] | None]:
    """The run's Work from the one time flag given, or from the work (work_flops), and the finding
    that compares the work's two statements (None unless both were given)."""
    from clusterctl.planning.estimates import Work, count_words
    from clusterctl.planning.site import positive

    if q.duration is not None:
        return Work(hours=duration_hours(q.duration), describe=f"{q.duration} wall time"), None
    if q.hours is not None:
        return Work(hours=positive(q.hours, "--hours"), describe=f"{q.hours:g} h wall time"), None
    if q.gpu_hours is not None:
        return Work(gpu_hours=positive(q.gpu_hours, "--gpu-hours"), describe=f"{count_words(q.gpu_hours)} GPU-h"), None
    if q.samples is not None or q.tokens is not None:
        return work_flops(q)
    raise UserError(
        "estimate: nothing to estimate; allowed: --duration, --hours, --gpu-hours, --samples with --model, "
        "--tokens with --params, or --profile P alone (its recipe's whole run)"
    )


def work_flops(q: EstimateRequest) -> tuple[Any, dict[str, Any] | None]:
    """The run's FLOPs from samples of a model and/or tokens x parameters; with both, the samples
    count (the model's own FLOPs) and a finding says whether the two statements of the work agree."""
    from clusterctl.planning.estimates import Work, count_words, parse_count, token_flops, work_agreement
    from clusterctl.planning.plan import train_flops_per_sample
    from clusterctl.planning.site import positive
    from vltrain.model_math import param_count
    from vltrain.presets import get_preset

    preset = get_preset(q.model, "--model") if q.model else None
    if q.samples is not None and preset is None:
        raise UserError(
            "--samples: needs --model PRESET to count FLOPs per sample; allowed: --model with one of the presets"
        )
    if q.tokens is not None and q.params is None and preset is None:
        raise UserError("--tokens: needs --params N (e.g. 22B) or --model PRESET; allowed: --tokens with --params")
    n = parse_count(q.samples, "--samples") * positive(q.epochs, "--epochs") if q.samples is not None else None
    t = parse_count(q.tokens, "--tokens") if q.tokens is not None else None
    n_params = parse_count(q.params, "--params") if q.params is not None else (param_count(preset) if preset else None)
    ckpt = q.activation_checkpointing
    sample_flops = n * train_flops_per_sample(preset, ckpt) if n is not None and preset is not None else None
    tok_flops = token_flops(t, n_params, ckpt) if t is not None and n_params is not None else None
    if sample_flops is not None:  # model FLOPs (MFU's): the same work without recomputation
        model = n * train_flops_per_sample(preset, False) if n is not None and preset is not None else None
        work = Work(flops=sample_flops, describe=f"{count_words(n)} samples of {q.model}", model_flops=model)
    else:
        model = token_flops(t, n_params) if t is not None and n_params is not None else None
        work = Work(
            flops=tok_flops, describe=f"{count_words(t)} tokens x {count_words(n_params)} params", model_flops=model
        )
    if sample_flops is None or tok_flops is None or preset is None or t is None or n is None or q.model is None:
        return work, None  # one statement of the work (both given: preset, counts and model are all known)
    per_sample = preset.num_patches + 1 + preset.max_text_len
    return work, work_agreement(tok_flops, sample_flops, t, n, per_sample, q.model)
