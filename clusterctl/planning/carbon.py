"""Grid carbon intensity per country from codecarbon's own data (the same numbers the tracker uses).

Read straight from the JSON file codecarbon ships (codecarbon/data/private_infra/global_energy_mix.json,
keyed by ISO 3166 alpha-3, "carbon_intensity" in g CO2eq/kWh) without importing codecarbon, which
pulls pandas: `clusterctl estimate` stays fast. Planned and measured figures therefore use one source.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from vltrain.common.errors import UserError


@dataclass(frozen=True)
class GridIntensity:
    g_per_kwh: float
    country_iso: str | None
    source: str  # "codecarbon <year> energy mix" | "profile" | "--carbon-intensity"


@functools.cache
def _energy_mix() -> dict:
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or spec.origin is None:
        raise UserError("--country: codecarbon is not installed; allowed: --carbon-intensity G (g CO2eq/kWh)")
    path = Path(spec.origin).parent / "data" / "private_infra" / "global_energy_mix.json"
    return json.loads(path.read_text(encoding="utf-8"))


def country_intensity(iso3: str) -> GridIntensity:
    """Average grid intensity of a country per codecarbon; one-line error for an unknown code."""
    mix = _energy_mix()
    row = mix.get(iso3.upper())
    if not row or row.get("carbon_intensity") is None:
        raise UserError(
            f"--country: {iso3!r} is not in codecarbon's energy mix; allowed: an ISO 3166 alpha-3 code such as FRA, JPN, SGP, USA"
        )
    return GridIntensity(
        float(row["carbon_intensity"]), iso3.upper(), f"codecarbon {row.get('year', '')} energy mix".replace("  ", " ")
    )


def country_name(iso3: str) -> str:
    return str(_energy_mix().get(iso3.upper(), {}).get("country_name", iso3))
