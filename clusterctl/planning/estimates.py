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
BUSY_POWER_FLOOR = 0.3  # training GPUs draw at least ~30% of board power on average (the energy floor)
# The MFU a claimed time or GPU-hour figure implies must lie in this band to be plausible. Below 10%
# a large run is broken, not slow. Published large dense runs report 30-55% (MT-NLG ~30%, PaLM 46%,
# Llama 3 38-43%); FlashAttention-2 reaches ~70% on single A100 layers, so 65% is the most a whole
# multi-node run can plausibly sustain.
MIN_MFU = 0.10
MAX_MFU = 0.65


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
    value = float(m.group(1)) * _SUFFIX[m.group(2)] if m else 0.0
    if not m or not 0 < value < 1e30:  # '1e400' is inf; no training run counts past 1e30
        raise UserError(
            f"{flag}: {text!r} is not a count; allowed: a positive number, optionally with K, M, B or T (e.g. 22B, 4.2T)"
        )
    return value


@dataclass(frozen=True)
class Setup:
    """The hardware and site an estimate is for (from a profile, overridable by flags). Without a GPU
    count the work still gives GPU-hours, energy and CO2, but no wall time."""

    gpus: int | None
    peak_tflops: float  # bf16 dense, per GPU
    power_w: float  # per GPU
    pue: float
    carbon_intensity_g_per_kwh: float
    intensity_source: str
    nodes: int | None = 1
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
    gpus: int | None
    hours: float | None
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
        if not setup.gpus:
            raise UserError("--gpus: no GPU count to turn wall time into GPU-hours; allowed: --profile P or --gpus N")
        gpu_hours = setup.gpus * work.hours
    elif work.gpu_hours is not None:
        gpu_hours = work.gpu_hours
    elif work.flops is not None:
        if setup.peak_tflops <= 0:
            raise UserError(
                "--peak-tflops: no bf16 peak to turn FLOPs into time; allowed: --profile P or --peak-tflops T"
            )
        gpu_hours = work.flops / (setup.peak_tflops * 1e12 * mfu) / 3600
    else:
        raise UserError(
            "estimate: nothing to estimate; allowed: --duration, --hours, --gpu-hours, --samples with --model, or --tokens with --params"
        )
    hours = work.hours if work.hours is not None else (gpu_hours / setup.gpus if setup.gpus else None)
    if setup.node_power_w and (hours is None or not setup.nodes):
        raise UserError(
            "--node-power-w: a per-node allowance needs the node count and wall time; allowed: --gpus N or --profile P"
        )
    gpu_kwh = gpu_hours * setup.power_w / 1000 * setup.pue
    node_kwh = (setup.nodes or 0) * (hours or 0.0) * setup.node_power_w / 1000 * setup.pue
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


def _mfu_words(x: float) -> str:
    """'implies 98% MFU'; a claim that needs the GPUs to run faster than their peak says so plainly."""
    return f"implies {x:.0%} MFU" if x < 10 else f"needs {x:,.0f}x the GPUs' peak"


def _finding(
    claim: str,
    claimed: float,
    low: float,
    high: float,
    expected: float,
    unit: str,
    why: str,
    implied_mfu: float | None = None,
    tolerance: float = TOLERANCE,
) -> dict:
    """A claim against the band [low, high] the setup allows; the verdict names the MFU it implies."""
    ratio = claimed / expected if expected else float("inf")
    lo, hi = low * (1 - tolerance), high * (1 + tolerance)
    mfu_words = (
        f"{_mfu_words(implied_mfu)}; plausible MFU {MIN_MFU:.0%}-{MAX_MFU:.0%}"
        if implied_mfu is not None
        else "MFU unknown: give the work (--samples with --model, or --tokens) to audit it"
    )
    factor = claimed / high if claimed > hi else low / claimed if claimed > 0 else float("inf")
    if lo <= claimed <= hi:
        verdict = f"consistent ({mfu_words})"
    elif implied_mfu is not None:
        verdict = (
            f"implausible: {factor:,.1f}x {'more' if claimed > hi else 'less'} than the setup allows ({mfu_words})"
        )
    else:
        verdict = f"off by {factor:,.1f}x ({'higher' if claimed > hi else 'lower'} than the setup implies; {mfu_words})"
    return {
        "claim": claim,
        "claimed": claimed,
        "expected": round(expected, 4),
        "low": round(low, 4),
        "high": round(high, 4),
        "unit": unit,
        "ratio": round(ratio, 4),
        "implied_mfu": None if implied_mfu is None else round(implied_mfu, 4),
        "verdict": verdict,
        "why": why,
    }


def audit(setup: Setup, est: Estimate, claims: Claims) -> list[dict]:
    """Compare claimed figures with what the setup implies; each verdict states the MFU the claim implies.

    With the work known (FLOPs), a claimed time or GPU-hour figure implies an MFU, which must lie in
    [MIN_MFU, MAX_MFU]; without it, GPU-hours must agree with GPUs x time (within TOLERANCE). Energy
    lies between a floor and a ceiling, both at the site's PUE: the ceiling is every GPU at full
    board power for the most GPU-hours the band allows (plus the node allowance); the floor is the
    larger of BUSY_POWER_FLOOR of board power for the fewest, and the FLOPs at 100% MFU at full
    power. CO2 follows from the energy band and the grid intensity.
    """
    out: list[dict] = []
    kw = setup.power_w / 1000
    peak = setup.peak_tflops * 1e12
    work_gpu_h = est.flops / peak / 3600 if est.flops else None  # GPU-hours at 100% MFU

    def mfu_of(gpu_h: float) -> float | None:
        return work_gpu_h / gpu_h if work_gpu_h and gpu_h > 0 else None

    if work_gpu_h:
        band = (work_gpu_h / MAX_MFU, work_gpu_h / MIN_MFU)
        why = (
            f"{est.work}: {count_words(work_gpu_h)} GPU-h at 100% MFU; {count_words(band[0])} at {MAX_MFU:.0%}, "
            f"{count_words(est.gpu_hours)} at {est.mfu:.0%}, {count_words(band[1])} at {MIN_MFU:.0%}"
        )
        tolerance = 0.0  # the MFU band is the tolerance
    else:
        band = (est.gpu_hours, est.gpu_hours)
        why = (
            f"{setup.gpus} GPUs x {count_words(est.hours)} h"
            if est.hours is not None
            else f"{count_words(est.gpu_hours)} GPU-h"
        )
        tolerance = TOLERANCE
    if claims.gpu_hours is not None:
        out.append(
            _finding(
                "gpu_hours",
                claims.gpu_hours,
                band[0],
                band[1],
                est.gpu_hours,
                "GPU-h",
                why,
                mfu_of(claims.gpu_hours),
                tolerance,
            )
        )
    if claims.hours is not None:
        if not setup.gpus or est.hours is None:
            raise UserError(
                "--claimed-duration: auditing a wall time needs the GPU count; allowed: --gpus N or --profile P"
            )
        out.append(
            _finding(
                "hours",
                claims.hours,
                band[0] / setup.gpus,
                band[1] / setup.gpus,
                est.hours,
                "h",
                why,
                mfu_of(claims.hours * setup.gpus),
                tolerance,
            )
        )
    hours_hi = band[1] / setup.gpus if setup.gpus else 0.0
    node_kwh_hi = (setup.nodes or 0) * hours_hi * setup.node_power_w / 1000 * setup.pue
    ceiling = band[1] * kw * setup.pue + node_kwh_hi
    floor = max(BUSY_POWER_FLOOR * band[0], work_gpu_h or 0.0) * kw * setup.pue
    e_why = (
        f"ceiling: {count_words(band[1])} GPU-h x {setup.power_w:g} W x PUE {setup.pue:g}; floor: the larger of "
        f"{BUSY_POWER_FLOOR:.0%} of board power for {count_words(band[0])} GPU-h"
        + (f" and the FLOPs at 100% MFU ({count_words(work_gpu_h)} GPU-h) at full power" if work_gpu_h else "")
        + f", also x PUE {setup.pue:g}"
    )

    def energy_mfu(kwh: float) -> float | None:  # the least MFU that energy allows: every GPU at full power
        return mfu_of(kwh / (kw * setup.pue)) if kwh > 0 else None

    if claims.energy_kwh is not None:
        out.append(
            _finding(
                "energy_kwh",
                claims.energy_kwh,
                floor,
                ceiling,
                est.energy_kwh,
                "kWh",
                e_why,
                energy_mfu(claims.energy_kwh),
                tolerance,
            )
        )
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
                energy_mfu(claims.co2_kg / g) if g else None,
                tolerance,
            )
        )
    return out


def work_agreement(
    token_flops_: float, sample_flops: float, tokens: float, samples: float, tokens_per_sample: int, model: str
) -> dict:
    """Does the work stated as tokens agree with the same work stated as samples of a model? A paper
    that gives both (seed 003: 4.2T tokens and 850M images) should describe one run: compared as
    tokens per sample. As FLOPs the two differ even when they agree, and the finding says why: 6ND
    sends every token through all N parameters, while in a vision-language model an image patch
    passes only the vision tower and a caption token only the text side; estimates use the model's count."""
    per_sample = tokens / samples
    ratio = per_sample / tokens_per_sample
    if abs(ratio - 1) <= TOLERANCE:
        verdict = f"consistent: {per_sample:,.0f} tokens per sample, as {model} sees"
    else:
        verdict = (
            f"the two disagree by {max(ratio, 1 / ratio):,.1f}x: {count_words(tokens)} tokens over "
            f"{count_words(samples)} samples is {per_sample:,.0f} tokens per sample, while {model} sees "
            f"{tokens_per_sample:,} (image patches + text)"
        )
    return {
        "claim": "work",
        "claimed": per_sample,
        "expected": tokens_per_sample,
        "low": tokens_per_sample,
        "high": tokens_per_sample,
        "unit": "tokens per sample",
        "ratio": round(ratio, 4),
        "implied_mfu": None,
        "verdict": verdict,
        "why": (
            f"as FLOPs, 6ND over all parameters counts {token_flops_ / sample_flops:,.1f}x the model's own "
            "count, in which each token passes only its tower; estimates use the model's count"
        ),
        "token_flops": token_flops_,
        "sample_flops": sample_flops,
    }


def count_words(x: float | None) -> str:
    """A count for a sentence: 12,480; 1.8B; 4.2T; never an exponent."""
    if x is None:
        return "-"
    for unit, name in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if abs(x) >= unit:
            v = x / unit
            return (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}") + name
    return f"{x:,.0f}" if abs(x) >= 10 else f"{x:.4f}".rstrip("0").rstrip(".")
