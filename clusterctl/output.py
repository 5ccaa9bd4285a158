"""Where the CLI prints: one rich console for humans, plain JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    console: Console
    err_console: Console


def __getattr__(name: str):
    """The consoles are made on first use: importing rich.console costs ~25 ms that `status --json`
    and other plain-text paths never need (module __getattr__, PEP 562)."""
    if name in ("console", "err_console"):
        from rich.console import Console

        value = Console(highlight=False, stderr=name == "err_console")
        globals()[name] = value
        return value
    raise AttributeError(name)


def quantity(v: float | None) -> str:
    """A measured figure as people read it: 3 significant digits, thousands separators from 100 on,
    no exponent for everyday sizes (0.0123, 4.2, 412, 12,480); '-' when unknown."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) >= 0.001 else f"{v:.1e}"


ENERGY_UNITS = ((1e-3, "MWh"), (1.0, "kWh"), (1e3, "Wh"))  # (factor from kWh, name), largest first
CO2_UNITS = ((1e-3, "t"), (1.0, "kg"), (1e3, "g"))  # from kg


def pick_unit(values: list[float | None], units: tuple[tuple[float, str], ...]) -> tuple[float, str]:
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


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no colour, stable key order."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
