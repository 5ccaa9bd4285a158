"""PNG plots for reports (matplotlib, Agg backend, imported only when a plot is asked for)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

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
    """Cumulative kWh and kg CO2eq over time, one line per run; series[run] = [(hours, kwh, co2_kg)],
    the run's total at each flush of any node (usage.merge_timelines: monotone). Drawn as steps: the
    total changes at a flush and holds until the next."""
    check_target(path)
    plt = _pyplot()
    fig, (ax_e, ax_c) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for run, pts in sorted(series.items()):
        if not pts:
            continue
        h, e, c = zip(*pts)
        line = ax_e.plot(h, e, marker=".", drawstyle="steps-post", label=printable(run))[0]
        ax_c.plot(h, c, marker=".", drawstyle="steps-post", color=line.get_color(), label=printable(run))
    ax_e.set_ylabel("energy (kWh, cumulative)")
    ax_c.set_ylabel("emissions (kg CO2eq, cumulative)")
    ax_c.set_xlabel("hours since the run was submitted")
    ax_e.set_title("energy and emissions per run (all nodes and attempts summed)")
    if any(series.values()):
        ax_e.legend(fontsize="small", loc="upper left")
    ax_e.grid(alpha=0.3)
    ax_c.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


class LossLine(NamedTuple):
    """One drawn segment of `report loss --plot`: an objective ("loss": the total) over one stage."""

    key: str
    stage: str
    steps: tuple[float, ...]
    values: tuple[float, ...]


def loss_lines(parts: list[tuple[Any, list[dict[str, Any]]]], keys: list[str]) -> tuple[list[LossLine], list[float]]:
    """What loss_plot draws (pure): for each stage (`parts`: reports.in_stages) each objective the stage
    weights (> 0: a stage that does not train one logs 0 or a value nothing minimises) and the total
    as a segment of its own (the total is another weighted sum in each stage, so one line across a
    boundary would read as a jump); and the x of each boundary (half a step before a stage's first)."""
    staged = len(parts) > 1
    lines = []
    for stage, rows in parts:
        for k in keys:
            if staged and k != "loss" and stage.weights.get(k, 0.0) <= 0:
                continue
            pts = [(r["step"], r[k]) for r in rows if _finite(r.get(k)) and _finite(r.get("step"))]
            if pts:
                xs, ys = zip(*pts)
                lines.append(LossLine(k, stage.name, xs, ys))
    bounds = [stage.first - 0.5 for stage, _ in parts[1:]] if staged else []
    return lines, bounds


def loss_plot(run: str, parts: list[tuple[Any, list[dict[str, Any]]]], keys: list[str], path: Path) -> Path:
    """Loss per objective against the optimizer step, stage by stage (loss_lines), a dashed line and
    the stage's name at each boundary."""
    check_target(path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors: dict[str, Any] = {}
    lines, bounds = loss_lines(parts, keys)
    for ln in lines:
        label = None if ln.key in colors else ("total" if ln.key == "loss" else ln.key)
        drawn = ax.plot(
            ln.steps, ln.values, label=label, color=colors.get(ln.key), linewidth=2 if ln.key == "loss" else 1
        )
        colors.setdefault(ln.key, drawn[0].get_color())
    for x in bounds:
        ax.axvline(x, color="0.4", linestyle="--", linewidth=1)
    if bounds:
        for x, (stage, _) in zip([parts[0][0].first - 0.5, *bounds], parts):
            ax.text(x, 1.01, f" {printable(stage.name)}", transform=ax.get_xaxis_transform(),
                    va="bottom", ha="left", fontsize="small", color="0.3")  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (unweighted per objective; total = weighted sum)")
    ax.set_title(f"{printable(run)}: loss per objective" + (", stage by stage" if bounds else ""), pad=16)
    if colors:
        ax.legend(loc="best")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path
