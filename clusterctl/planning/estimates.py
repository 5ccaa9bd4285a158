"""Time, GPU-hours, energy and CO2 of a training run before it runs, and audits of published claims (pure).

    GPU-hours  = GPUs x wall hours, or model FLOPs / (peak x MFU) when the work is given
    energy kWh = (GPU-hours x GPU power + node-hours x the node's power besides its GPUs) x PUE, the two
                 shown apart; the node figure is the profile's or a default per GPU model, said as such
    CO2 kg     = kWh x grid intensity (g/kWh) / 1000
The work is either samples of a model (FLOPs per sample from the architecture, clusterctl.planning)
or tokens with a parameter count (6ND). MFU counts model FLOPs (PaLM's definition: no recomputation),
HFU the hardware FLOPs that run (x 4/3 with activation recomputation: 8ND); audits state both.
Figures in sentences have one format (count_words: three significant digits, never an exponent,
never "0%" for what is not zero).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
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
    node_power_w: float = 0.0  # per node besides its GPUs (CPUs, memory, NICs), reported separately
    node_power_source: str = "not counted"  # "profile", "--node-power-w", "default for A100, assumed (...)"


@dataclass(frozen=True)
class Work:
    """What the run computes: `flops` the hardware FLOPs that run (recomputation included), `model_flops`
    the model's (none: no recomputation, the same); None when only time is known."""

    hours: float | None = None  # wall time
    gpu_hours: float | None = None
    flops: float | None = None
    describe: str = ""
    model_flops: float | None = None


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
    mfu: float  # model FLOPs utilisation: what the time assumes
    flops: float | None  # hardware FLOPs (recomputation included)
    work: str
    findings: list[dict] = field(default_factory=list)
    model_flops: float | None = None
    hfu: float | None = None  # hardware FLOPs utilisation at that time (None: no work given)
    nodes: int | None = None
    node_power_w: float = 0.0
    node_power_source: str = "not counted"

    def to_dict(self) -> dict:
        return {k: (_rounded(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _rounded(x: float) -> float:
    """JSON figures: 4 decimals, but 4 significant digits below 1 (0.000139 stays, not 0.0)."""
    return round(x, 4) if abs(x) >= 1 else float(f"{x:.4g}")


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
        gpu_hours = _model_flops(work) / (setup.peak_tflops * 1e12 * mfu) / 3600
    else:
        raise UserError(
            "estimate: nothing to estimate; allowed: --duration, --hours, --gpu-hours, --samples with --model, or --tokens with --params"
        )
    hours = work.hours if work.hours is not None else (gpu_hours / setup.gpus if setup.gpus else None)
    if setup.node_power_w and (hours is None or not setup.nodes):
        raise UserError(
            "--node-power-w: a node's power needs the node count and wall time; allowed: --gpus N or --profile P"
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
        model_flops=_model_flops(work) if work.flops is not None else None,
        hfu=mfu * work.flops / _model_flops(work) if work.flops else None,
        nodes=setup.nodes,
        node_power_w=setup.node_power_w,
        node_power_source=setup.node_power_source,
    )


def _model_flops(work: Work) -> float:
    return work.model_flops if work.model_flops is not None else work.flops or 0.0


def token_flops(tokens: float, params: float, activation_checkpointing: bool = False) -> float:
    """6ND (Kaplan et al. 2020); 8ND with full activation recomputation (hardware FLOPs)."""
    return (8.0 if activation_checkpointing else 6.0) * tokens * params


# ---------------------------------------------------------------- claim audits
@dataclass(frozen=True)
class Claims:
    gpu_hours: float | None = None
    hours: float | None = None
    energy_kwh: float | None = None
    co2_kg: float | None = None


def _mfu_words(mfu: float, hfu: float | None = None) -> str:
    """'implies 74% MFU (98% HFU with recomputation)'; a claim that needs the GPUs to compute faster
    than their peak says so plainly."""
    hfu = mfu if hfu is None else hfu
    recompute = not math.isclose(hfu, mfu, rel_tol=1e-9)
    if hfu > 1:
        return f"needs {times(hfu)} the GPUs' peak" + (f" ({times(mfu)} in model FLOPs alone)" if recompute else "")
    return f"implies {percent(mfu)} MFU" + (f" ({percent(hfu)} HFU with recomputation)" if recompute else "")


def _finding(
    claim: str,
    claimed: float,
    band: tuple[float, float],
    expected: float,
    unit: str,
    why: str,
    implied: tuple[float, float] | None = None,
    tolerance: float = TOLERANCE,
    says: str = "",
) -> dict:
    """A claim against the band [low, high] the setup allows; the verdict names the MFU (and HFU) it
    implies, `implied` = (MFU, HFU), and `says` what else the claim amounts to ('that is ~744 GPUs...')."""
    low, high = band
    ratio = claimed / expected if expected else float("inf")
    lo, hi = low * (1 - tolerance), high * (1 + tolerance)
    mfu_words = (
        f"{_mfu_words(*implied)}; plausible MFU {span(MIN_MFU * 100, MAX_MFU * 100, '%')}"
        if implied is not None
        else "MFU unknown: give the work (--samples with --model, or --tokens) to audit it"
    )
    mfu_words = f"{says}; {mfu_words}" if says else mfu_words
    factor = claimed / high if claimed > hi else low / claimed if claimed > 0 else float("inf")
    if lo <= claimed <= hi:
        verdict = f"consistent ({mfu_words})"
    elif implied is not None:
        verdict = (
            f"implausible: {times(factor)} {'more' if claimed > hi else 'less'} than the setup allows ({mfu_words})"
        )
    else:
        verdict = (
            f"off by {times(factor)} ({'higher' if claimed > hi else 'lower'} than the setup implies; {mfu_words})"
        )
    return {
        "claim": claim,
        "claimed": claimed,
        "expected": _rounded(expected),
        "low": _rounded(low),
        "high": _rounded(high),
        "unit": unit,
        "ratio": _rounded(ratio),
        "implied_mfu": None if implied is None else _rounded(implied[0]),
        "implied_hfu": None if implied is None else _rounded(implied[1]),
        "verdict": verdict,
        "why": why,
    }


def _implied_gpus(claimed_gpu_hours: float, hours: float | None, gpus: int | None) -> str:
    """'that is ~744 GPUs for 6 weeks, not 32': a GPU-hour claim over the stated (or the setup's) time."""
    if not hours:
        return ""
    n = claimed_gpu_hours / hours
    stated = f", not {gpus:,}" if gpus and not math.isclose(n, gpus, rel_tol=TOLERANCE) else ""
    return f"that is ~{count_words(n)} GPUs for {duration_words(hours)}{stated}"


def audit(setup: Setup, est: Estimate, claims: Claims) -> list[dict]:
    """Compare claimed figures with what the setup implies; each verdict states the MFU the claim implies.

    With the work known (FLOPs), a claimed time or GPU-hour figure implies an MFU (model FLOPs, no
    recomputation), which must lie in [MIN_MFU, MAX_MFU], and an HFU (the FLOPs that run), at most 1;
    without it, GPU-hours must agree with GPUs x time (within TOLERANCE). A GPU-hour claim also says
    how many GPUs it means over the claimed (else the setup's) wall time. Energy lies between a floor
    and a ceiling, both at the site's PUE: the ceiling is every GPU at full board power for the most
    GPU-hours the band allows, plus the nodes' power besides the GPUs for as long; the floor is the
    larger of BUSY_POWER_FLOOR of board power for the fewest, and the hardware FLOPs at 100% HFU at
    full power (GPUs only: a paper may count only them). CO2 follows from the energy band.
    """
    out: list[dict] = []
    peak = setup.peak_tflops * 1e12
    model_gpu_h = est.model_flops / peak / 3600 if est.model_flops else None  # GPU-hours at 100% MFU
    hw_gpu_h = est.flops / peak / 3600 if est.flops else None  # at 100% HFU

    def implied(gpu_h: float) -> tuple[float, float] | None:
        return (model_gpu_h / gpu_h, (hw_gpu_h or 0.0) / gpu_h) if model_gpu_h and gpu_h > 0 else None

    if model_gpu_h and hw_gpu_h:
        band = (max(model_gpu_h / MAX_MFU, hw_gpu_h), model_gpu_h / MIN_MFU)
        recompute = (
            f" ({count_words(hw_gpu_h)} at 100% HFU, recomputation included)"
            if not math.isclose(hw_gpu_h, model_gpu_h)
            else ""
        )
        why = (
            f"{est.work}: {count_words(model_gpu_h)} GPU-h at 100% MFU{recompute}; {count_words(band[0])} at "
            f"{percent(model_gpu_h / band[0])}, {count_words(est.gpu_hours)} at {percent(est.mfu)}, "
            f"{count_words(band[1])} at {percent(MIN_MFU)}"
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
        over = claims.hours if claims.hours is not None else est.hours
        says = _implied_gpus(claims.gpu_hours, over, setup.gpus)
        out.append(
            _finding(
                "gpu_hours",
                claims.gpu_hours,
                band,
                est.gpu_hours,
                "GPU-h",
                why,
                implied(claims.gpu_hours),
                tolerance,
                says,
            )
        )
    if claims.hours is not None:
        if not setup.gpus or est.hours is None:
            raise UserError(
                "--claimed-duration: auditing a wall time needs the GPU count; allowed: --gpus N or --profile P"
            )
        hours_band = (band[0] / setup.gpus, band[1] / setup.gpus)
        out.append(
            _finding(
                "hours", claims.hours, hours_band, est.hours, "h", why, implied(claims.hours * setup.gpus), tolerance
            )
        )
    out.extend(_energy_findings(setup, est, claims, band, hw_gpu_h, implied, tolerance))
    return out


def _energy_findings(
    setup: Setup,
    est: Estimate,
    claims: Claims,
    band: tuple[float, float],
    hw_gpu_h: float | None,
    implied: Callable[[float], tuple[float, float] | None],
    tolerance: float,
) -> list[dict]:
    """Claimed energy and CO2 against the band's floor and ceiling (audit's docstring)."""
    out: list[dict] = []
    kw = setup.power_w / 1000
    hours_hi = band[1] / setup.gpus if setup.gpus else 0.0
    node_kwh_hi = (setup.nodes or 0) * hours_hi * setup.node_power_w / 1000 * setup.pue
    ceiling = band[1] * kw * setup.pue + node_kwh_hi
    floor = max(BUSY_POWER_FLOOR * band[0], hw_gpu_h or 0.0) * kw * setup.pue
    nodes = (
        f" + {setup.nodes} nodes x {count_words(hours_hi)} h x {count_words(setup.node_power_w)} W besides "
        f"the GPUs ({setup.node_power_source})"
        if node_kwh_hi
        else f" (nodes besides their GPUs {setup.node_power_source})"
    )
    e_why = (
        f"ceiling: {count_words(band[1])} GPU-h x {setup.power_w:g} W{nodes}, x PUE {setup.pue:g}; floor: the "
        f"larger of {percent(BUSY_POWER_FLOOR)} of board power for {count_words(band[0])} GPU-h"
        + (f" and the FLOPs at 100% HFU ({count_words(hw_gpu_h)} GPU-h) at full power" if hw_gpu_h else "")
        + f", GPUs only, also x PUE {setup.pue:g}"
    )

    def energy_implied(kwh: float) -> tuple[float, float] | None:  # the least MFU that energy allows: all on GPUs
        return implied(kwh / (kw * setup.pue)) if kwh > 0 else None

    if claims.energy_kwh is not None:
        out.append(
            _finding(
                "energy_kwh",
                claims.energy_kwh,
                (floor, ceiling),
                est.energy_kwh,
                "kWh",
                e_why,
                energy_implied(claims.energy_kwh),
                tolerance,
            )
        )
    if claims.co2_kg is not None:
        g = setup.carbon_intensity_g_per_kwh / 1000
        out.append(
            _finding(
                "co2_kg",
                claims.co2_kg,
                (floor * g, ceiling * g),
                est.co2_kg,
                "kg CO2eq",
                f"energy band x {setup.carbon_intensity_g_per_kwh:g} g/kWh ({setup.intensity_source})",
                energy_implied(claims.co2_kg / g) if g else None,
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
            f"the two disagree by {times(max(ratio, 1 / ratio))}: {count_words(tokens)} tokens over "
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
            f"as FLOPs, 6ND over all parameters counts {times(token_flops_ / sample_flops)} the model's own "
            "count, in which each token passes only its tower; estimates use the model's count"
        ),
        "token_flops": token_flops_,
        "sample_flops": sample_flops,
    }


def count_words(x: float | None) -> str:
    """A figure for a sentence, the one format audits use: three significant digits, thousands
    separated (12,480), M/B/T above a million (1.8B, 4.2T), trailing zeros dropped (4.98, 32), never
    an exponent (0.00139)."""
    if x is None:
        return "-"
    for unit, name in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if abs(x) >= unit:
            return _significant(x / unit) + name
    return _significant(x)


def _significant(x: float, digits: int = 3) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:,.0f}"
    text = f"{x:,.{digits - 1 - math.floor(math.log10(abs(x)))}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def percent(x: float) -> str:
    """A fraction as a percentage that is never '0%' unless it is 0: 74%, 1.3%, 0.35%, <0.1%."""
    p = x * 100
    if p == 0:
        return "0%"
    if abs(p) < 0.1:
        return "<0.1%"
    return (f"{p:,.0f}" if abs(p) >= 10 else _significant(p, 2)) + "%"


def times(x: float) -> str:
    """A ratio: 23.3x, 724x, 1.51x."""
    return count_words(x) + "x"


def span(low: float, high: float, unit: str = "") -> str:
    """A band in one format: '4.98-32 h', '10-65%'; one figure when both ends are equal."""
    sep = "" if unit in ("", "%") else " "
    if count_words(low) == count_words(high):
        return f"{count_words(low)}{sep}{unit}"
    return f"{count_words(low)}-{count_words(high)}{sep}{unit}"


def duration_words(hours: float) -> str:
    """A wall time as people say it: 8.1 h, 5 days, 6 weeks, 2 months (a month: MONTH_DOC)."""
    for below, size, name in ((72, 1.0, "h"), (24 * 14, 24.0, "days"), (168 * 8, 168.0, "weeks")):
        if hours < below:
            return f"{count_words(hours / size)} {name}"
    return f"{count_words(hours / HOURS['mo'])} months"
