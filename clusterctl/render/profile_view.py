"""`profiles list` and `profiles show` as rich tables (data in, console out)."""

from __future__ import annotations

from typing import Any

from clusterctl.planning.profiles import ClusterProfile, fabric
from clusterctl.render import output
from clusterctl.render.safe import cell, printable


def print_profiles(rows: list[dict[str, Any]]) -> None:
    """The profiles found (rows of `profiles list --json`), invalid ones with their error below."""
    from rich.table import Table

    t = Table(title="cluster profiles", title_justify="left", caption="JSON (--json) gives each file's path")
    for col in ("name", "exec", "GPUs", "GPU", "fabric", "site", "seed"):
        t.add_column(col, justify="right" if col == "GPUs" else "left", no_wrap=col in ("name", "GPUs"))
    for r in rows:
        style = "dim" if r["shadowed"] else None
        name = cell(printable(r["name"]) + (" (shadowed)" if r["shadowed"] else ""))
        if not r["valid"]:
            t.add_row(name, cell("invalid", "red"), "", "", "", "", "", style=style)
            continue
        t.add_row(
            name,
            cell(r["executor"]),
            cell(f"{r['nodes']}x{r['gpus_per_node']}"),
            cell(r["gpu"]),
            cell(r["fabric_short"]),
            cell(r["country"]),
            cell(r["seed"] or ""),
            style=style,
        )
    output.console.print(t)
    for r in rows:
        if not r["valid"]:
            line = cell("invalid: ", "red")
            line.append(printable(r["error"]))
            output.console.print(line, soft_wrap=True)


def print_profile(p: ClusterProfile, country_name: str) -> None:
    """One profile with its derived figures (world size, aggregate PFLOP/s, power, memory, NCCL env)."""
    from rich.table import Table

    d = p.derived()
    t = Table(show_header=False, title=cell(p.name), title_justify="left", box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("description", p.description),
        ("executor", p.executor),
        (
            "nodes",
            f"{p.nodes.count} x {p.nodes.gpus_per_node} GPUs, {p.nodes.cpus_per_node} CPUs, {p.nodes.memory_gib} GiB",
        ),
        (
            "GPU",
            f"{p.gpu.model} ({p.gpu.kind}), {p.gpu.memory_gib:g} GiB, {p.gpu.peak_bf16_tflops:g} TFLOP/s bf16, {p.gpu.power_w:g} W",
        ),
        (
            "interconnect",
            fabric(p) + (f" (HCAs {', '.join(p.interconnect.ib_hcas)})" if p.interconnect.ib_hcas else ""),
        ),
        ("world size", f"{d['world_size']} GPUs"),
        ("aggregate bf16", f"{d['peak_bf16_pflops']:g} PFLOP/s"),
        ("GPU power", f"{d['gpu_power_kw']:g} kW"),
        ("GPU memory", f"{d['total_gpu_memory_gib']:g} GiB in total"),
        ("comm backend", d["dist_backend"]),
    ]
    if p.slurm:
        s = p.slurm
        bits = [f"partition={s.partition or '(default)'}", f"time={s.time_limit}"]
        bits += [f"{k}={v}" for k, v in (("account", s.account), ("qos", s.qos), ("constraint", s.constraint)) if v]
        bits += [f"signal=USR2@{s.signal_delay_s}", "exclusive" if s.exclusive else "shared"]
        bits += [f"--{k}={v}" for k, v in s.extra.items()]
        rows.append(("slurm", " ".join(bits)))
    site = f"{country_name} ({p.site.country_iso}), PUE {p.site.pue:g}"
    if p.site.carbon_intensity_g_per_kwh is not None:
        site += f", grid {p.site.carbon_intensity_g_per_kwh:g} gCO2eq/kWh"
    rows.append(("site", site))
    if p.cost:  # planning.cost: the prices plan, estimate, report and submit --budget use
        c = p.cost
        prices = [
            f"{v:g} {c.currency} per {unit}" for v, unit in ((c.gpu_hour, "GPU-hour"), (c.kwh, "kWh")) if v is not None
        ]
        rows.append(("cost", ", ".join(prices)))
    if p.seed:
        rows.append(("seed", p.seed))
    rows += calibration_rows(p)
    rows.append(("comm env", "set for every rank, one a line:" if d["comm_env"] else "-"))
    for k, v in rows:
        t.add_row(k, cell(v))  # every value may hold the profile author's text
    output.console.print(t)
    # One variable a line, whole: in the table's value column a list of HCAs was cut with "…".
    for k, v in d["comm_env"].items():
        output.console.print(cell(f"  {k}={v}"), soft_wrap=True)


def calibration_rows(p: ClusterProfile) -> list[tuple[str, str]]:
    """The [calibration] figures (`profiles calibrate`), four rows; none when the profile has none."""
    c = p.calibration
    if c is None:
        return []
    sizes = sorted(c.matmul_gflops, key=int)
    return [
        (
            "calibration",
            f"measured {c.measured_at} by job {c.slurm_job}, {c.ranks} ranks x {c.threads_per_rank} threads",
        ),
        ("  matmul fp32", ", ".join(f"{n}: {c.matmul_gflops[n]:g}" for n in sizes) + " GFLOP/s per rank"),
        ("  per rank", f"copy {c.memory_gb_s:g} GB/s, op {c.op_overhead_us:g} us, base RSS {c.base_rss_mib:g} MiB"),
        ("  all-reduce", f"{c.allreduce_gb_s:g} GB/s bus, {c.allreduce_latency_us:g} us latency (gloo, between nodes)"),
    ]
