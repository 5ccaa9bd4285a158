"""PNG plots for reports (matplotlib, Agg backend, imported only when a plot is asked for)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from clusterctl.render.safe import printable
from vltrain.common.errors import UserError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display: works over SSH and in CI
    import matplotlib.pyplot as plt

    return plt


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_target(path: Path, flag: str = "--plot") -> Path:
    if path.suffix.lower() != ".png":
        raise UserError(f"{flag}: {str(path)!r} is not a .png file; allowed: a path ending in .png")
    if not path.parent.exists():
        raise UserError(
            f"{flag}: directory {str(path.parent)!r} does not exist; allowed: a path in an existing directory"
        )
    return path


def _save(fig, path: Path) -> None:
    """Written under a temporary name, then renamed: no half-written PNG if the process dies."""
    from vltrain.common.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def energy_plot(series: dict[str, list[tuple[float, float, float]]], path: Path) -> Path:
    """Cumulative kWh and kg CO2eq over time, one line per run; series[run] = [(hours, kwh, co2_kg)]."""
    check_target(path)
    plt = _pyplot()
    fig, (ax_e, ax_c) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for run, pts in sorted(series.items()):
        if not pts:
            continue
        h, e, c = zip(*pts)
        ax_e.plot(h, e, marker=".", label=printable(run))
        ax_c.plot(h, c, marker=".", label=printable(run))
    ax_e.set_ylabel("energy (kWh, cumulative)")
    ax_c.set_ylabel("emissions (kg CO2eq, cumulative)")
    ax_c.set_xlabel("hours since the run was submitted")
    ax_e.set_title("energy and emissions per run (codecarbon, one tracker per node, attempts summed)")
    ax_e.legend(fontsize="small", loc="upper left")
    ax_e.grid(alpha=0.3)
    ax_c.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def loss_plot(run: str, rows: list[dict[str, Any]], path: Path, keys=("loss", "itc", "mlm", "caption")) -> Path:
    """Loss per objective against the optimizer step."""
    check_target(path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if _finite(r.get(k)) and _finite(r.get("step"))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label="total" if k == "loss" else k, linewidth=2 if k == "loss" else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{printable(run)}: loss per objective")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path
