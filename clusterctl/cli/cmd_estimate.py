"""`clusterctl estimate`: time, GPU-hours, energy and CO2 of a run, and audits of claimed figures
(clusterctl.planning.estimate_request).

The flag names and JSON keys are a public interface (scripts depend on them).
"""

from __future__ import annotations

from typing import Optional

import typer

from clusterctl.cli.options import JSON
from clusterctl.planning.estimate_request import DEFAULT_MFU  # planning.plan's, copied (light to import)
from clusterctl.render.output import print_json


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
    mfu: Optional[float] = typer.Option(
        None,
        "--mfu",
        help=f"MFU for work-based estimates (default: the plan's expected MFU of --profile's recipe, else {DEFAULT_MFU:.0%}).",
    ),
    peak_tflops: Optional[float] = typer.Option(
        None, "--peak-tflops", help="bf16 dense peak per GPU (overrides the profile)."
    ),
    power_w: Optional[float] = typer.Option(None, "--power-w", help="Power per GPU in W (overrides the profile)."),
    node_power_w: Optional[float] = typer.Option(
        None, "--node-power-w", help="Power per node besides its GPUs in W (default: the profile's, else assumed)."
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
    flags = dict(locals())  # the parameters by name, before any other local: EstimateRequest's fields and --json
    json_ = flags.pop("json_")
    from clusterctl.planning.estimate_request import EstimateRequest, estimate_run

    d = estimate_run(EstimateRequest(**flags))
    if json_:
        print_json(d)
        return
    from clusterctl.render.plan_view import print_estimate

    print_estimate(d)
