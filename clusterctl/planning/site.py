"""The hardware and site an estimate is for: a profile's figures, with overrides (pure but for
codecarbon's data file). One builder for `estimate` and for the estimate stored with each run, so the
grid intensity is chosen the same way everywhere: an explicit intensity, else a country's (from
codecarbon, the figures the energy tracker uses), else the profile's fixed intensity, else its
country's.
"""

from __future__ import annotations

from clusterctl.planning.carbon import country_intensity
from clusterctl.planning.estimates import Setup
from clusterctl.planning.profiles import ClusterProfile, node_power
from vltrain.common.errors import UserError

GPUS_PER_NODE = 8  # when no profile says otherwise (every seed cluster has 8 per node)


def grid_intensity(
    profile: ClusterProfile | None, country: str | None = None, carbon_intensity: float | None = None
) -> tuple[float, str]:
    """(g CO2eq per kWh, where it came from); a missing source is a one-line error naming the flags."""
    if carbon_intensity is not None and country:
        raise UserError("--carbon-intensity: given together with --country; allowed: one of the two")
    if carbon_intensity is not None:
        return positive(carbon_intensity, "--carbon-intensity"), "--carbon-intensity"
    if country:
        gi = country_intensity(country)
    elif profile is not None and profile.site.carbon_intensity_g_per_kwh is not None:
        return profile.site.carbon_intensity_g_per_kwh, f"profile {profile.name}"
    elif profile is not None:
        gi = country_intensity(profile.site.country_iso)
    else:
        raise UserError("--country: no grid intensity; allowed: --profile P, --country ISO3 or --carbon-intensity G")
    return gi.g_per_kwh, f"{gi.source} ({gi.country_iso})"


def make_setup(
    profile: ClusterProfile | None,
    *,
    gpus: int | None = None,
    peak_tflops: float | None = None,
    power_w: float | None = None,
    node_power_w: float | None = None,
    pue: float | None = None,
    country: str | None = None,
    carbon_intensity: float | None = None,
) -> Setup:
    """Profile figures with overrides; every missing figure is a one-line error naming its flag."""
    if gpus is not None and gpus < 1:
        raise UserError(f"--gpus: {gpus} is not valid; allowed: a positive integer")
    n = gpus or (profile.world_size if profile else None)  # None: no wall time, but GPU-hours and energy
    intensity, source = grid_intensity(profile, country, carbon_intensity)
    pw = power_w if power_w is not None else (profile.gpu.power_w if profile else None)
    if pw is None:
        raise UserError("--power-w: no GPU power; allowed: --profile P or --power-w W")
    peak = peak_tflops if peak_tflops is not None else (profile.gpu.peak_bf16_tflops if profile else 0.0)
    pue_v = pue if pue is not None else (profile.site.pue if profile else 1.0)
    per_node = profile.nodes.gpus_per_node if profile else GPUS_PER_NODE
    if node_power_w is not None:
        node_w, node_source = node_power_w, "--node-power-w"
    elif profile is not None:
        node_w, node_source = node_power(profile.nodes, profile.gpu)  # the profile's, or assumed per GPU model
    else:
        node_w, node_source = 0.0, "not counted: no profile; --node-power-w W counts it"
    return Setup(
        gpus=n,
        peak_tflops=peak,
        power_w=positive(pw, "--power-w"),
        pue=positive(pue_v, "--pue"),
        carbon_intensity_g_per_kwh=intensity,
        intensity_source=source,
        nodes=-(-n // per_node) if n else None,
        node_power_w=node_w,
        node_power_source=node_source,
    )


def positive(v: float, flag: str) -> float:
    if v <= 0:
        raise UserError(f"{flag}: {v:g} is not valid; allowed: a positive number")
    return v


def number(
    value: float | None, flag: str, lo: float = 0.0, hi: float = float("inf"), *, lo_open: bool = True, unit: str = ""
) -> float | None:
    """A number a user gave on the command line: finite and in its range, else one line naming the
    flag. (typer's ranges compare, and NaN compares false with every bound: it would pass them.)"""
    import math

    if value is None:
        return None
    below = value <= lo if lo_open else value < lo
    if not math.isfinite(value) or below or value > hi:

        def words(x: float) -> str:
            return f"{x:,.0f}" if x == int(x) else f"{x:g}"

        low = f"> {words(lo)}" if lo_open else f">= {words(lo)}"
        rng = f"a finite number {low}" + (f" and <= {words(hi)}" if math.isfinite(hi) else "")
        raise UserError(f"{flag}: {value:g} is not valid; allowed: {rng}{unit}")
    return value
