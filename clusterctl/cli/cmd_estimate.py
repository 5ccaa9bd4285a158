"""`clusterctl estimate`: time, GPU-hours, energy and CO2 of a run, and audits of claimed figures.

The flag names and JSON keys are a public interface (scripts depend on them).
"""

from __future__ import annotations

from math import inf
from typing import Optional

import typer

from clusterctl.cli.options import JSON
from clusterctl.planning.estimates import count_words, parse_count
from clusterctl.planning.site import positive
from clusterctl.render.output import print_json
from vltrain.common.errors import UserError

# planning.plan.DEFAULT_MFU, copied (tests/test_import_hygiene.py checks they are equal): importing the
# planner costs ~40 ms, more than the rest of `estimate`.
DEFAULT_MFU = 0.40


def estimate(
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Cluster profile (GPUs, power, PUE, country)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPU count (overrides the profile)."),
    duration: Optional[str] = typer.Option(
        None, "--duration", help="Wall time: 6w, 42d, 1008h, 2mo (month = 30.44 d)."
    ),
    hours: Optional[float] = typer.Option(None, "--hours", help="Wall time in hours."),
    gpu_hours: Optional[float] = typer.Option(None, "--gpu-hours", help="GPU-hours."),
    samples: Optional[str] = typer.Option(None, "--samples", help="Samples to train on (with --model), e.g. 1.8B."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over --samples."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model preset for --samples."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Tokens to train on (with --params), e.g. 4.2T."),
    params: Optional[str] = typer.Option(None, "--params", help="Parameter count for --tokens, e.g. 22B."),
    activation_checkpointing: bool = typer.Option(
        False, "--activation-checkpointing", help="Count recomputation (8ND)."
    ),
    mfu: float = typer.Option(DEFAULT_MFU, "--mfu", help="Model FLOPs utilisation assumed for work-based estimates."),
    peak_tflops: Optional[float] = typer.Option(
        None, "--peak-tflops", help="bf16 dense peak per GPU (overrides the profile)."
    ),
    power_w: Optional[float] = typer.Option(None, "--power-w", help="Power per GPU in W (overrides the profile)."),
    node_power_w: float = typer.Option(
        0.0, "--node-power-w", help="CPU/RAM allowance per node in W, shown separately."
    ),
    pue: Optional[float] = typer.Option(None, "--pue", help="Data-centre PUE (overrides the profile)."),
    country: Optional[str] = typer.Option(None, "--country", help="ISO 3166 alpha-3 for codecarbon's grid intensity."),
    carbon_intensity: Optional[float] = typer.Option(None, "--carbon-intensity", help="Grid intensity in g CO2eq/kWh."),
    claimed_gpu_hours: Optional[float] = typer.Option(None, "--claimed-gpu-hours", help="Audit: claimed GPU-hours."),
    claimed_duration: Optional[str] = typer.Option(
        None, "--claimed-duration", help="Audit: claimed wall time (6w, 42d...)."
    ),
    claimed_energy_mwh: Optional[float] = typer.Option(
        None, "--claimed-energy-mwh", help="Audit: claimed energy in MWh."
    ),
    claimed_co2_t: Optional[float] = typer.Option(None, "--claimed-co2-t", help="Audit: claimed emissions in t CO2eq."),
    json_: bool = JSON,
) -> None:
    """Time, GPU-hours, energy and CO2 for a run, and an audit of claimed figures against them."""
    from clusterctl.planning.site import number

    for value, flag, lo, hi, lo_open in (
        (hours, "--hours", 0, inf, True),
        (gpu_hours, "--gpu-hours", 0, inf, True),
        (epochs, "--epochs", 0, 1e6, True),
        (mfu, "--mfu", 0, 1, True),
        (peak_tflops, "--peak-tflops", 0, 1e6, True),
        (power_w, "--power-w", 0, 1e5, True),
        (node_power_w, "--node-power-w", 0, 1e6, False),
        (pue, "--pue", 1, 3, False),
        (carbon_intensity, "--carbon-intensity", 0, 2000, False),
        (claimed_gpu_hours, "--claimed-gpu-hours", 0, inf, True),
        (claimed_energy_mwh, "--claimed-energy-mwh", 0, inf, True),
        (claimed_co2_t, "--claimed-co2-t", 0, inf, True),
    ):
        number(value, flag, lo, hi, lo_open=lo_open)
    from clusterctl.planning.estimates import Claims, Work, audit, parse_duration
    from clusterctl.planning.estimates import estimate as run_estimate
    from clusterctl.planning.site import make_setup

    time_given = [
        n for n, v in (("--duration", duration), ("--hours", hours), ("--gpu-hours", gpu_hours)) if v is not None
    ]
    work_given = [n for n, v in (("--samples", samples), ("--tokens", tokens)) if v is not None]
    if len(time_given) > 1 or (time_given and work_given):
        first, second = (time_given + work_given)[:2]
        raise UserError(
            f"{second}: given together with {first}; allowed: one of --duration, --hours, --gpu-hours, or the work "
            "(--samples and/or --tokens)"
        )
    prof = None
    if profile:
        from clusterctl.planning.profiles import load_profile

        prof = load_profile(profile, flag="--profile")
    if (duration is not None or hours is not None) and not (gpus or prof):
        raise UserError("--gpus: no GPU count; allowed: --profile P or --gpus N")
    setup = make_setup(
        prof,
        gpus=gpus,
        peak_tflops=peak_tflops,
        power_w=power_w,
        node_power_w=node_power_w,
        pue=pue,
        country=country,
        carbon_intensity=carbon_intensity,
    )
    agreement = None
    if duration is not None:
        work = Work(hours=parse_duration(duration), describe=f"{duration} wall time")
    elif hours is not None:
        work = Work(hours=positive(hours, "--hours"), describe=f"{hours:g} h wall time")
    elif gpu_hours is not None:
        work = Work(gpu_hours=positive(gpu_hours, "--gpu-hours"), describe=f"{count_words(gpu_hours)} GPU-h")
    elif work_given:
        work, agreement = stated_work(samples, epochs, model, tokens, params, activation_checkpointing)
    else:
        raise UserError(
            "estimate: nothing to estimate; allowed: --duration, --hours, --gpu-hours, --samples with --model, or --tokens with --params"
        )
    est = run_estimate(setup, work, mfu)
    claims = Claims(
        gpu_hours=claimed_gpu_hours,
        hours=parse_duration(claimed_duration, "--claimed-duration") if claimed_duration else None,
        energy_kwh=claimed_energy_mwh * 1000 if claimed_energy_mwh is not None else None,
        co2_kg=claimed_co2_t * 1000 if claimed_co2_t is not None else None,
    )
    est.findings = ([agreement] if agreement else []) + audit(setup, est, claims)
    d = est.to_dict() | {
        "profile": profile,
        "country": country.upper() if country else prof.site.country_iso if prof else None,
    }
    if json_:
        print_json(d)
        return
    from clusterctl.render.plan_view import print_estimate

    print_estimate(d)


def stated_work(samples, epochs, model, tokens, params, activation_checkpointing):
    """The run's FLOPs from samples of a model and/or tokens x parameters; with both, the samples
    count (the model's own FLOPs) and a finding says whether the two statements of the work agree."""
    from clusterctl.planning.estimates import Work, token_flops, work_agreement
    from clusterctl.planning.plan import train_flops_per_sample
    from vltrain.model_math import param_count
    from vltrain.presets import get_preset

    preset = get_preset(model, "--model") if model else None
    if samples is not None and preset is None:
        raise UserError(
            "--samples: needs --model PRESET to count FLOPs per sample; allowed: --model with one of the presets"
        )
    if tokens is not None and params is None and preset is None:
        raise UserError("--tokens: needs --params N (e.g. 22B) or --model PRESET; allowed: --tokens with --params")
    n = parse_count(samples, "--samples") * positive(epochs, "--epochs") if samples is not None else None
    t = parse_count(tokens, "--tokens") if tokens is not None else None
    n_params = parse_count(params, "--params") if params is not None else (param_count(preset) if preset else None)
    sample_flops = n * train_flops_per_sample(preset, activation_checkpointing) if n is not None else None
    tok_flops = token_flops(t, n_params, activation_checkpointing) if t is not None else None
    if sample_flops is not None:
        work = Work(flops=sample_flops, describe=f"{count_words(n)} samples of {model}")
    else:
        work = Work(flops=tok_flops, describe=f"{count_words(t)} tokens x {count_words(n_params)} params")
    if sample_flops is None or tok_flops is None:
        return work, None
    per_sample = preset.num_patches + 1 + preset.max_text_len
    return work, work_agreement(tok_flops, sample_flops, t, n, per_sample, model)
