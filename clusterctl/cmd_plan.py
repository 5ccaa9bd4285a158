"""`clusterctl plan` and `clusterctl estimate`: what a run will need and cost, before it is submitted.

Thin CLI edges over the pure planners (clusterctl.planning, clusterctl.memory, clusterctl.estimates);
the flag names and JSON keys are a public interface (scripts depend on them).
"""

from __future__ import annotations

import re
from typing import Optional

import typer

from clusterctl import output
from clusterctl.output import print_json
from vltrain.errors import UserError

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str, flag: str) -> float:
    """'22B', '4.2T', '1.8e9', '850M' -> a number (K/M/B/T suffixes, case-insensitive)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"{flag}: {text!r} is not a count; allowed: a positive number, optionally with K, M, B or T (e.g. 22B, 4.2T)")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def plan(
    profile: str = typer.Option(..., "--profile", "-p", help="Cluster profile name or path."),
    model: str = typer.Option(..., "--model", "-m", help="Model preset (vltrain.presets)."),
    global_batch: int = typer.Option(..., "--global-batch", "-b", help="Samples per optimizer step."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Fix the per-GPU micro batch."),
    accum: Optional[int] = typer.Option(None, "--accum", help="Fix the gradient accumulation steps."),
    zero_stage: int = typer.Option(2, "--zero-stage", help="DeepSpeed ZeRO stage 0-3."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing", help="Recompute activations in backward."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel degree."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Split the global batch over the profile's GPUs and check it fits in GPU memory under ZeRO."""
    from clusterctl.planning import make_plan
    from clusterctl.profiles import load_profile
    from vltrain.presets import get_preset

    prof = load_profile(profile, flag="--profile")
    p = make_plan(prof, get_preset(model, "--model"), global_batch, micro_batch=micro_batch, accumulation=accum,
                  zero_stage=zero_stage, activation_checkpointing=activation_checkpointing, tp=tp, pp=pp)
    d = p.to_dict()
    if json_:
        print_json(d)
    else:
        print_plan(d)
    if not p.memory.fits:
        raise typer.Exit(1)


def print_plan(d: dict) -> None:
    from rich.table import Table

    m = d["memory"]
    output.console.print(
        f"[bold]{d['model']}[/bold] ({d['params'] / 1e9:.2f}B params) on [bold]{d['profile']}[/bold]: "
        f"{d['world_size']} GPUs = tp {d['tensor_parallel']} x pp {d['pipeline_parallel']} x dp {d['data_parallel']}"
    )
    output.console.print(
        f"global batch {d['global_batch']} = micro batch {d['micro_batch']} x accumulation {d['accumulation']} "
        f"x {d['data_parallel']} data-parallel ranks ({d['samples_per_gpu_per_step']} samples per GPU per step)"
    )
    t = Table(title=f"memory per GPU, ZeRO-{d['zero_stage']}, bf16 + AdamW"
              + (", activation checkpointing" if d["activation_checkpointing"] else ""), title_justify="left")
    t.add_column("term")
    t.add_column("GiB", justify="right")
    for label, key in (("bf16 parameters", "params_gib"), ("bf16 gradients", "grads_gib"),
                       ("fp32 master + Adam m, v", "optimizer_gib"),
                       (f"activations ({d['micro_batch']} x {m['activations_per_sample_gib']:.3f})", "activations_gib"),
                       ("CUDA/NCCL context + DeepSpeed buckets", "buffers_gib"), ("fragmentation (10%)", "fragmentation_gib")):
        t.add_row(label, f"{m[key]:.2f}")
    t.add_row("[bold]total[/bold]", f"[bold]{m['total_gib']:.2f}[/bold] of {m['capacity_gib']:g}")
    output.console.print(t)
    if m["fits"]:
        output.console.print(f"[green]fits[/green]: largest micro batch that fits is {d['max_micro_batch']}; "
                      f"about {d['step_time_s']:.2f} s per optimizer step at {d['mfu_assumed']:.0%} MFU")
    else:
        output.console.print("[red]does not fit[/red]: try a higher --zero-stage, --activation-checkpointing, --tp/--pp or more GPUs")


def estimate(
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Cluster profile (GPUs, power, PUE, country)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPU count (overrides the profile)."),
    duration: Optional[str] = typer.Option(None, "--duration", help="Wall time: 6w, 42d, 1008h, 2mo (month = 30.44 d)."),
    hours: Optional[float] = typer.Option(None, "--hours", help="Wall time in hours."),
    gpu_hours: Optional[float] = typer.Option(None, "--gpu-hours", help="GPU-hours."),
    samples: Optional[str] = typer.Option(None, "--samples", help="Samples to train on (with --model), e.g. 1.8B."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over --samples."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model preset for --samples."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Tokens to train on (with --params), e.g. 4.2T."),
    params: Optional[str] = typer.Option(None, "--params", help="Parameter count for --tokens, e.g. 22B."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing", help="Count recomputation (8ND)."),
    mfu: float = typer.Option(0.40, "--mfu", help="Model FLOPs utilisation assumed for work-based estimates."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="bf16 dense peak per GPU (overrides the profile)."),
    power_w: Optional[float] = typer.Option(None, "--power-w", help="Power per GPU in W (overrides the profile)."),
    node_power_w: float = typer.Option(0.0, "--node-power-w", help="CPU/RAM allowance per node in W, shown separately."),
    pue: Optional[float] = typer.Option(None, "--pue", help="Data-centre PUE (overrides the profile)."),
    country: Optional[str] = typer.Option(None, "--country", help="ISO 3166 alpha-3 for codecarbon's grid intensity."),
    carbon_intensity: Optional[float] = typer.Option(None, "--carbon-intensity", help="Grid intensity in g CO2eq/kWh."),
    claimed_gpu_hours: Optional[float] = typer.Option(None, "--claimed-gpu-hours", help="Audit: claimed GPU-hours."),
    claimed_duration: Optional[str] = typer.Option(None, "--claimed-duration", help="Audit: claimed wall time (6w, 42d...)."),
    claimed_energy_mwh: Optional[float] = typer.Option(None, "--claimed-energy-mwh", help="Audit: claimed energy in MWh."),
    claimed_co2_t: Optional[float] = typer.Option(None, "--claimed-co2-t", help="Audit: claimed emissions in t CO2eq."),
    json_: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Time, GPU-hours, energy and CO2 for a run, and an audit of claimed figures against them."""
    from clusterctl.estimates import Claims, Setup, Work, audit, estimate as run_estimate, parse_duration, token_flops

    given = [n for n, v in (("--duration", duration), ("--hours", hours), ("--gpu-hours", gpu_hours),
                            ("--samples", samples), ("--tokens", tokens)) if v is not None]
    if len(given) > 1:
        raise UserError(f"{given[1]}: given together with {given[0]}; allowed: one of --duration, --hours, --gpu-hours, --samples, --tokens")
    setup = _setup(profile, gpus, peak_tflops, power_w, node_power_w, pue, country, carbon_intensity)
    if duration is not None:
        work = Work(hours=parse_duration(duration), describe=f"{duration} wall time")
    elif hours is not None:
        work = Work(hours=_positive(hours, "--hours"), describe=f"{hours:g} h wall time")
    elif gpu_hours is not None:
        work = Work(gpu_hours=_positive(gpu_hours, "--gpu-hours"), describe=f"{gpu_hours:,.0f} GPU-h")
    elif samples is not None:
        if model is None:
            raise UserError("--samples: needs --model PRESET to count FLOPs per sample; allowed: --model with one of the presets")
        from clusterctl.planning import train_flops_per_sample
        from vltrain.presets import get_preset

        n = parse_count(samples, "--samples") * _positive(epochs, "--epochs")
        work = Work(flops=n * train_flops_per_sample(get_preset(model, "--model"), activation_checkpointing),
                    describe=f"{n:.3g} samples of {model}")
    elif tokens is not None:
        if params is None:
            raise UserError("--tokens: needs --params N (e.g. 22B); allowed: --tokens with --params")
        t, n = parse_count(tokens, "--tokens"), parse_count(params, "--params")
        work = Work(flops=token_flops(t, n, activation_checkpointing), describe=f"{t:.3g} tokens x {n:.3g} params")
    else:
        raise UserError("estimate: nothing to estimate; allowed: --duration, --hours, --gpu-hours, --samples with --model, or --tokens with --params")
    est = run_estimate(setup, work, mfu)
    claims = Claims(
        gpu_hours=claimed_gpu_hours,
        hours=parse_duration(claimed_duration, "--claimed-duration") if claimed_duration else None,
        energy_kwh=claimed_energy_mwh * 1000 if claimed_energy_mwh is not None else None,
        co2_kg=claimed_co2_t * 1000 if claimed_co2_t is not None else None,
    )
    est.findings = audit(setup, est, claims)
    d = est.to_dict() | {"profile": profile, "country": setup_country(profile, country)}
    if json_:
        print_json(d)
        return
    _print_estimate(d)


def _positive(v: float, flag: str) -> float:
    if v <= 0:
        raise UserError(f"{flag}: {v:g} is not valid; allowed: a positive number")
    return v


def setup_country(profile: Optional[str], country: Optional[str]) -> Optional[str]:
    if country:
        return country.upper()
    if profile:
        from clusterctl.profiles import load_profile

        return load_profile(profile, flag="--profile").site.country_iso
    return None


def _setup(profile, gpus, peak_tflops, power_w, node_power_w, pue, country, carbon_intensity):
    """Profile figures with flag overrides; every missing figure is a one-line error naming its flag."""
    from clusterctl.carbon import country_intensity
    from clusterctl.estimates import Setup

    prof = None
    if profile:
        from clusterctl.profiles import load_profile

        prof = load_profile(profile, flag="--profile")
    if gpus is not None and gpus < 1:
        raise UserError(f"--gpus: {gpus} is not valid; allowed: a positive integer")
    n = gpus or (prof.world_size if prof else None)
    if n is None:
        raise UserError("--gpus: no GPU count; allowed: --profile P or --gpus N")
    if carbon_intensity is not None and country:
        raise UserError("--carbon-intensity: given together with --country; allowed: one of the two")
    if carbon_intensity is not None:
        intensity, source = _positive(carbon_intensity, "--carbon-intensity"), "--carbon-intensity"
    elif country:
        gi = country_intensity(country)
        intensity, source = gi.g_per_kwh, f"{gi.source} ({gi.country_iso})"
    elif prof and prof.site.carbon_intensity_g_per_kwh is not None:
        intensity, source = prof.site.carbon_intensity_g_per_kwh, f"profile {prof.name}"
    elif prof:
        gi = country_intensity(prof.site.country_iso)
        intensity, source = gi.g_per_kwh, f"{gi.source} ({gi.country_iso})"
    else:
        raise UserError("--country: no grid intensity; allowed: --profile P, --country ISO3 or --carbon-intensity G")
    pw = power_w if power_w is not None else (prof.gpu.power_w if prof else None)
    if pw is None:
        raise UserError("--power-w: no GPU power; allowed: --profile P or --power-w W")
    peak = peak_tflops if peak_tflops is not None else (prof.gpu.peak_bf16_tflops if prof else 0.0)
    pue_v = pue if pue is not None else (prof.site.pue if prof else 1.0)
    per_node = prof.nodes.gpus_per_node if prof else 8  # 8 GPUs per node when no profile says otherwise
    nodes = -(-n // per_node)
    return Setup(gpus=n, peak_tflops=peak, power_w=_positive(pw, "--power-w"), pue=_positive(pue_v, "--pue"),
                 carbon_intensity_g_per_kwh=intensity, intensity_source=source, nodes=nodes, node_power_w=node_power_w)


def _print_estimate(d: dict) -> None:
    from rich.table import Table

    t = Table(title=f"estimate: {d['work']}", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("GPUs", f"{d['gpus']}")
    t.add_row("wall time", f"{d['hours']:,.1f} h ({d['hours'] / 24:,.1f} days)")
    t.add_row("GPU-hours", f"{d['gpu_hours']:,.0f}")
    t.add_row("GPU energy", f"{d['gpu_energy_kwh']:,.0f} kWh ({d['power_w']:g} W x PUE {d['pue']:g})")
    if d["node_energy_kwh"]:
        t.add_row("node CPU/RAM allowance", f"{d['node_energy_kwh']:,.0f} kWh")
    t.add_row("energy", f"{d['energy_kwh']:,.0f} kWh = {d['energy_kwh'] / 1000:,.1f} MWh")
    t.add_row("CO2eq", f"{d['co2_kg']:,.0f} kg at {d['carbon_intensity_g_per_kwh']:g} g/kWh ({d['intensity_source']})")
    if d["flops"]:
        t.add_row("training FLOPs", f"{d['flops']:.3g} at MFU {d['mfu']:g}")
    output.console.print(t)
    for f in d["findings"]:
        colour = "green" if f["verdict"] == "consistent" else "red"
        output.console.print(f"claim {f['claim']}: {f['claimed']:,.6g} {f['unit']} vs {f['low']:,.6g}-{f['high']:,.6g} "
                      f"[{colour}]{f['verdict']}[/{colour}] ({f['why']})", soft_wrap=True)
