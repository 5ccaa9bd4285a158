"""Time, GPU-hours, energy and CO2 of a training run before it runs, and audits of published claims (pure).

    GPU-hours  = GPUs x wall hours, or work / (GPUs x peak x MFU) when the work is given
    energy kWh = GPU-hours x GPU power (kW) x PUE, plus an optional per-node CPU/RAM allowance shown apart
    CO2 kg     = kWh x grid intensity (g/kWh) / 1000
The work is either samples of a model (FLOPs per sample from the architecture, clusterctl.planning)
or tokens with a parameter count (6ND; 8ND with activation recomputation).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from vltrain.common.errors import UserError

HOURS = {"h": 1.0, "d": 24.0, "w": 168.0, "mo": 730.485, "y": 8765.82}
MONTH_DOC = "a month is 1/12 of a Gregorian year, 30.44 days = 730.485 h"
DURATION_DOC = f"a number with h, d, w or mo, e.g. 1008h, 42d, 6w, 2mo ({MONTH_DOC})"
TOLERANCE = 0.15  # a claim within 15% of what the setup implies counts as consistent (papers round)
BUSY_POWER_FLOOR = 0.3
MIN_MFU = 0.1  # below 10% MFU a large run is broken, not slow: the upper end of a work-based band  # training GPUs draw at least ~30% of board power on average (lower bound of energy)


def parse_duration(text: str, flag: str = "--duration") -> float:
    """'6w', '42d', '1008h', '2mo' (also '1.5d') to hours."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(h|d|w|mo|y)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"{flag}: {text!r} is not a duration; allowed: {DURATION_DOC}")
    return float(m.group(1)) * HOURS[m.group(2)]


_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str, flag: str) -> float:
    """'22B', '4.2T', '1.8e9', '850M' -> a number (K/M/B/T suffixes, case-insensitive)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise UserError(
            f"{flag}: {text!r} is not a count; allowed: a positive number, optionally with K, M, B or T (e.g. 22B, 4.2T)"
        )
    return float(m.group(1)) * _SUFFIX[m.group(2)]


@dataclass(frozen=True)
class Setup:
    """The hardware and site an estimate is for (from a profile, overridable by flags)."""

    gpus: int
    peak_tflops: float  # bf16 dense, per GPU
    power_w: float  # per GPU
    pue: float
    carbon_intensity_g_per_kwh: float
    intensity_source: str
    nodes: int = 1
    node_power_w: float = 0.0  # CPU/RAM allowance per node, reported separately


@dataclass(frozen=True)
class Work:
    """What the run computes; flops is total training FLOPs (None when only time is known)."""

    hours: float | None = None  # wall time
    gpu_hours: float | None = None
    flops: float | None = None
    describe: str = ""


@dataclass
class Estimate:
    gpus: int
    hours: float
    gpu_hours: float
    gpu_energy_kwh: float
    node_energy_kwh: float
    energy_kwh: float
    co2_kg: float
    carbon_intensity_g_per_kwh: float
    intensity_source: str
    pue: float
    power_w: float
    mfu: float
    flops: float | None
    work: str
    findings: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def estimate(setup: Setup, work: Work, mfu: float) -> Estimate:
    """Fill in hours, GPU-hours, energy and CO2 from whichever of wall time, GPU-hours or FLOPs is given."""
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu: {mfu:g} is not valid; allowed: 0 < MFU <= 1 (e.g. 0.4)")
    if work.hours is not None:
        hours = work.hours
    elif work.gpu_hours is not None:
        hours = work.gpu_hours / setup.gpus
    elif work.flops is not None:
        if setup.peak_tflops <= 0:
            raise UserError(
                "--peak-tflops: no bf16 peak to turn FLOPs into time; allowed: --profile P or --peak-tflops T"
            )
        hours = work.flops / (setup.gpus * setup.peak_tflops * 1e12 * mfu) / 3600
    else:
        raise UserError(
            "estimate: nothing to estimate; allowed: --duration, --hours, --gpu-hours, --samples with --model, or --tokens with --params"
        )
    gpu_hours = setup.gpus * hours
    gpu_kwh = gpu_hours * setup.power_w / 1000 * setup.pue
    node_kwh = setup.nodes * hours * setup.node_power_w / 1000 * setup.pue
    kwh = gpu_kwh + node_kwh
    return Estimate(
        gpus=setup.gpus,
        hours=hours,
        gpu_hours=gpu_hours,
        gpu_energy_kwh=gpu_kwh,
        node_energy_kwh=node_kwh,
        energy_kwh=kwh,
        co2_kg=kwh * setup.carbon_intensity_g_per_kwh / 1000,
        carbon_intensity_g_per_kwh=setup.carbon_intensity_g_per_kwh,
        intensity_source=setup.intensity_source,
        pue=setup.pue,
        power_w=setup.power_w,
        mfu=mfu,
        flops=work.flops,
        work=work.describe,
    )


def token_flops(tokens: float, params: float, activation_checkpointing: bool = False) -> float:
    """6ND (Kaplan et al. 2020); 8ND with full activation recomputation."""
    return (8.0 if activation_checkpointing else 6.0) * tokens * params


# ---------------------------------------------------------------- claim audits
@dataclass(frozen=True)
class Claims:
    gpu_hours: float | None = None
    hours: float | None = None
    energy_kwh: float | None = None
    co2_kg: float | None = None


def _finding(claim: str, claimed: float, low: float, high: float, expected: float, unit: str, why: str) -> dict:
    ratio = claimed / expected if expected else float("inf")
    lo, hi = low * (1 - TOLERANCE), high * (1 + TOLERANCE)
    if lo <= claimed <= hi:
        verdict = "consistent"
    else:
        factor = claimed / high if claimed > hi else low / claimed
        verdict = f"off by {factor:.1f}x ({'higher' if claimed > hi else 'lower'} than the setup implies)"
    return {
        "claim": claim,
        "claimed": claimed,
        "expected": round(expected, 4),
        "low": round(low, 4),
        "high": round(high, 4),
        "unit": unit,
        "ratio": round(ratio, 4),
        "verdict": verdict,
        "why": why,
    }


def audit(setup: Setup, est: Estimate, claims: Claims) -> list[dict]:
    """Compare claimed figures with what the setup implies, each consistent or off by a stated factor.

    GPU-hours and wall time must agree with GPUs x time, or, when the work is known, lie between
    the work at 100% MFU and at MIN_MFU. Energy must lie between a floor and a ceiling: the ceiling is every GPU at
    full board power for the GPU-hours (times PUE, plus the node allowance); the floor is the larger
    of BUSY_POWER_FLOOR of that and the energy the FLOPs need even at 100% MFU. CO2 follows from
    the energy band and the grid intensity.
    """
    out: list[dict] = []
    kw = setup.power_w / 1000
    # GPU-hours band: fixed by GPUs x time, or by the work between 100% MFU and MIN_MFU
    if est.flops:
        floor_gpu_h = est.flops / (setup.peak_tflops * 1e12) / 3600
        band = (floor_gpu_h, floor_gpu_h / MIN_MFU)
        why = f"{est.work}: {floor_gpu_h:,.0f} GPU-h at 100% MFU, {est.gpu_hours:,.0f} at {est.mfu:g}, {band[1]:,.0f} at {MIN_MFU:g}"
    else:
        floor_gpu_h = 0.0
        band = (est.gpu_hours, est.gpu_hours)
        why = f"{setup.gpus} GPUs x {est.hours:,.1f} h"
    if claims.gpu_hours is not None:
        out.append(_finding("gpu_hours", claims.gpu_hours, band[0], band[1], est.gpu_hours, "GPU-h", why))
    if claims.hours is not None:
        out.append(_finding("hours", claims.hours, band[0] / setup.gpus, band[1] / setup.gpus, est.hours, "h", why))
    ceiling = band[1] * kw * setup.pue + est.node_energy_kwh
    floor = max(BUSY_POWER_FLOOR * band[0] * kw * setup.pue, floor_gpu_h * kw)
    if claims.energy_kwh is not None:
        why = (
            f"ceiling: {band[1]:,.0f} GPU-h x {setup.power_w:g} W x PUE {setup.pue:g}; floor: {BUSY_POWER_FLOOR:.0%} of board power"
            + (f", or the FLOPs at 100% MFU ({floor_gpu_h:,.0f} GPU-h) at full power" if est.flops else "")
        )
        out.append(_finding("energy_kwh", claims.energy_kwh, floor, ceiling, est.energy_kwh, "kWh", why))
    if claims.co2_kg is not None:
        g = setup.carbon_intensity_g_per_kwh / 1000
        out.append(
            _finding(
                "co2_kg",
                claims.co2_kg,
                floor * g,
                ceiling * g,
                est.co2_kg,
                "kg CO2eq",
                f"energy band x {setup.carbon_intensity_g_per_kwh:g} g/kWh ({setup.intensity_source})",
            )
        )
    return out
