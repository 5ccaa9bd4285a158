"""Figures as people read them: significant digits, one unit per column, durations (pure)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

EXACT_MAX = 1e15  # below this, whole numbers are printed digit by digit; above, with an exponent


def step_text(v: Any, grouped: bool = False) -> str:
    """A logged step: a whole number below EXACT_MAX in full (with thousands separators if
    `grouped`), a larger one as 1.798e+308 (a damaged metrics.jsonl can say step 1e308: one short
    cell, not 309 digits); '-' when there is none or it is not a finite number."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-"
    try:
        f = float(v)
    except OverflowError:  # an int beyond a float's range
        return "-"
    if not math.isfinite(f):
        return "-"
    if abs(f) < EXACT_MAX:
        return f"{int(v):,}" if grouped else str(int(v))
    return f"{f:.4g}"


def quantity(v: float | None) -> str:
    """A measured figure as people read it: 3 significant digits, thousands separators from 100 on,
    no exponent for everyday sizes (0.0123, 4.2, 412, 12,480); '-' when unknown."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= EXACT_MAX:
        return f"{v:.3g}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) >= 0.001 else f"{v:.1e}"


ENERGY_UNITS = ((1e-3, "MWh"), (1.0, "kWh"), (1e3, "Wh"))  # (factor from kWh, name), largest first
CO2_UNITS = ((1e-3, "t"), (1.0, "kg"), (1e3, "g"))  # from kg


def pick_unit(values: Iterable[float | None], units: tuple[tuple[float, str], ...]) -> tuple[float, str]:
    """The largest unit in which the biggest value is at least 1 (a 20-step demo reads 2.1 Wh, a
    pre-training run 13.2 MWh), so a column or a line has one unit and short numbers."""
    top = max((abs(v) for v in values if isinstance(v, (int, float))), default=0.0)
    for factor, name in units:
        if top * factor >= 1:
            return factor, name
    return units[-1]


def energy(kwh: float) -> str:
    factor, unit = pick_unit([kwh], ENERGY_UNITS)
    return f"{quantity(kwh * factor)} {unit}"


def co2(kg: float) -> str:
    factor, unit = pick_unit([kg], CO2_UNITS)
    return f"{quantity(kg * factor)} {unit} CO2eq"


def duration(s: float | None, style: str = "units") -> str:
    """Seconds for a person: '-' when unknown.

    style "units" (tables: status's ELAPSED and ETA): '45s', '12m03s', '3h05m', '2d04h';
    style "clock" (the live view's ETA and summary): '0:45', '12:03', '3:05:00', '2d04h'.
    """
    if s is None:
        return "-"
    s = int(s)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if style == "clock":
        return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def flops(n: float) -> str:
    """Training FLOPs with an SI prefix: 1.45e22 -> '14.5 ZFLOP' (no exponent in human output)."""
    for factor, prefix in ((1e27, "R"), (1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G")):
        if n >= factor:
            return f"{quantity(n / factor)} {prefix}FLOP"
    return f"{quantity(n)} FLOP"
