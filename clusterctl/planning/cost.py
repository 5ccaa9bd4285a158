"""Cost in money: a profile's optional `[cost]` prices, and what GPU-hours and energy cost at them (pure).

A price is the user's statement about their cluster (a cloud's list price, a centre's internal
rate, an electricity tariff), so nothing here has a default price: with no `[cost]` table, or no
price in it, `money` returns None and every view leaves money out (never a made-up "$0").
`gpu_hour` prices the run's GPU-hours; `kwh` prices its energy as `estimate` counts it (GPUs and,
where known, the rest of the nodes, times the site's PUE): a centre that pays the power bill
itself may set either or both. One function for plan, estimate, submit --budget, report and
compare, so that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clusterctl.planning.iso4217 import CODES
from vltrain.common.schema import field

SIGNIFICANT = 6  # digits kept in JSON: a cent of a 10,000 run, a millionth of a CPU demo's cost


def _check_currency(code: str) -> str | None:
    return None if code in CODES else f"{code!r} is not an ISO 4217 currency code"


@dataclass(frozen=True, kw_only=True)
class Cost:
    """Prices the planner turns GPU-hours and energy into money with (docs/planning.md, Cost)."""

    currency: str = field(
        "ISO 4217 code of the prices' currency",
        default="USD",
        check=_check_currency,
        allowed="an ISO 4217 code such as USD, EUR, JPY",
    )
    gpu_hour: float | None = field("price of one GPU-hour (none: GPU time is not priced)", default=None, min=0, max=1e5)
    kwh: float | None = field(
        "price of one kWh of the run's energy, PUE included (none: energy is not priced)", default=None, min=0, max=1e3
    )

    def problem(self) -> str | None:
        """What is wrong with the table as a whole (each field is checked on its own by the schema)."""
        if self.gpu_hour is None and self.kwh is None:
            return "no price; allowed: gpu_hour = PRICE and/or kwh = PRICE (or no [cost] table)"
        return None


def prices_of(prices: Any) -> Cost | None:
    """The Cost in `prices`: a Cost, a profile (its .cost), a profile's dict or a [cost] dict, or None."""
    if prices is None or isinstance(prices, Cost):
        return prices
    if isinstance(prices, dict):
        table = prices.get("cost", prices)
        if not isinstance(table, dict) or not ({"gpu_hour", "kwh"} & table.keys()):
            return None
        # a stored profile.json read back: a hand-edited price that is no number prices nothing
        gpu_hour, kwh, currency = table.get("gpu_hour"), table.get("kwh"), table.get("currency") or "USD"
        if not all(_price(v) for v in (gpu_hour, kwh)) or currency not in CODES:
            return None
        return Cost(currency=currency, gpu_hour=gpu_hour, kwh=kwh)
    cost = getattr(prices, "cost", None)
    return cost if isinstance(cost, Cost) else None


def _price(v: Any) -> bool:
    """None, or a finite number >= 0 (not a bool)."""
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf"))


def _rounded(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT}g}")


def money(gpu_hours: float | None, kwh: float | None, prices: Any) -> dict[str, Any] | None:
    """What `gpu_hours` and `kwh` (energy incl. PUE) cost at `prices` (a Cost, a profile, a profile's
    dict or None): {"currency", "gpu", "energy", "total"}, a part None when its price or its
    quantity is unknown; None when no price is set or nothing could be priced."""
    cost = prices_of(prices)
    if cost is None:
        return None
    gpu = gpu_hours * cost.gpu_hour if gpu_hours is not None and cost.gpu_hour is not None else None
    energy = kwh * cost.kwh if kwh is not None and cost.kwh is not None else None
    if gpu is None and energy is None:
        return None
    total = (gpu or 0.0) + (energy or 0.0)
    return {
        "currency": cost.currency,
        "gpu": None if gpu is None else _rounded(gpu),
        "energy": None if energy is None else _rounded(energy),
        "total": _rounded(total),
    }


def over_budget(budget: float, m: dict[str, Any] | None) -> bool:
    """True when the priced estimate `m` (money's dict) costs more than `budget`."""
    return m is not None and m["total"] > budget


def amount_text(x: float, currency: str) -> str:
    """'12,480 USD', '0.18 EUR', '5.8e-05 EUR': render.units.quantity's rule (3 significant digits),
    repeated here because planning sits below render and builds --budget's message."""
    if x == 0 or abs(x) >= 100:
        return f"{x:,.0f} {currency}"
    return f"{x:.3g} {currency}" if abs(x) >= 0.001 else f"{x:.1e} {currency}"


def budget_problem(budget: float, estimate: dict[str, Any], prices: Any, where: str) -> str | None:
    """Why `submit --budget` refuses the run whose whole-run estimate (planning.whole_run's dict) is
    `estimate`, priced at `prices` (a profile, a Cost...); None when it fits. A budget with no price
    to compare it with is a usage error (UserError), not a problem of the run."""
    from vltrain.common.errors import UserError

    if not budget > 0 or budget == float("inf"):
        raise UserError(f"--budget: {budget:g} is not valid; allowed: a positive amount in the profile's currency")
    cost = prices_of(prices)
    m = money(estimate.get("gpu_hours"), estimate.get("energy_kwh"), cost)
    if cost is None or m is None:
        raise UserError(
            f"--budget: {where} sets no price; allowed: a [cost] table with gpu_hour = PRICE and/or kwh = PRICE "
            "in the profile (docs/planning.md, Cost)"
        )
    if not over_budget(budget, m):
        return None
    parts = []
    if m["gpu"] is not None:
        parts.append(
            f"{estimate['gpu_hours']:.3g} GPU-hours x {amount_text(cost.gpu_hour or 0, cost.currency)}/GPU-hour"
        )
    if m["energy"] is not None:
        parts.append(f"{estimate['energy_kwh']:.3g} kWh x {amount_text(cost.kwh or 0, cost.currency)}/kWh")
    return (
        f"--budget: the run's estimate {amount_text(m['total'], m['currency'])} ({' + '.join(parts)}) exceeds "
        f"{amount_text(budget, m['currency'])}; allowed: a budget of at least that, or fewer --steps"
    )
