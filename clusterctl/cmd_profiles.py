"""`clusterctl profiles list|show|validate`: what clusters this install knows about."""

from __future__ import annotations

from pathlib import Path

import typer

from clusterctl import output
from clusterctl.output import print_json
from clusterctl.profiles import discover, load_profile, read_profile
from vltrain.errors import UserError

app = typer.Typer(help="List, show and validate cluster profiles.", no_args_is_help=True)


_FABRIC = {"nvlink": "NVLink", "pcie": "PCIe", "infiniband": "InfiniBand", "roce": "RoCE", "ethernet": "Ethernet", "none": "-"}
_SHORT = _FABRIC | {"infiniband": "IB", "ethernet": "Eth"}


def _fabric(p, names: dict[str, str] = _FABRIC) -> str:
    return f"{names[p.interconnect.intra_node]} + {names[p.interconnect.inter_node]}"


@app.command("list")
def list_(json_: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Every profile found, in search order; later ones with the same name are shadowed."""
    rows = []
    for path, shadowed in discover():
        try:
            p = read_profile(path)
            rows.append({"name": p.name, "path": str(path), "shadowed": shadowed, "valid": True,
                         "executor": p.executor, "nodes": p.nodes.count, "gpus_per_node": p.nodes.gpus_per_node,
                         "world_size": p.world_size, "gpu": p.gpu.model, "gpu_memory_gib": p.gpu.memory_gib,
                         "fabric": _fabric(p), "fabric_short": _fabric(p, _SHORT), "country": p.site.country_iso, "seed": p.seed})
        except UserError as e:
            rows.append({"name": path.stem, "path": str(path), "shadowed": shadowed, "valid": False, "error": str(e)})
    if json_:
        print_json(rows)
        return
    from rich.table import Table

    t = Table(title="cluster profiles", title_justify="left", caption="JSON (--json) gives each file's path")
    for col in ("name", "exec", "GPUs", "GPU", "fabric", "site", "seed"):
        t.add_column(col, justify="right" if col == "GPUs" else "left", no_wrap=col in ("name", "GPUs"))
    for r in rows:
        style = "dim" if r["shadowed"] else None
        name = r["name"] + (" (shadowed)" if r["shadowed"] else "")
        if not r["valid"]:
            t.add_row(name, "[red]invalid[/red]", "", "", "", "", "", style=style)
            continue
        t.add_row(name, r["executor"], f"{r['nodes']}x{r['gpus_per_node']}", r["gpu"], r["fabric_short"],
                  r["country"], r["seed"] or "", style=style)
    output.console.print(t)
    bad = [r for r in rows if not r["valid"]]
    for r in bad:
        output.console.print(f"[red]invalid:[/red] {r['error']}", soft_wrap=True)


@app.command()
def show(name: str = typer.Argument(..., help="Profile name or path."),
         json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """One profile with its derived figures (world size, aggregate PFLOP/s, power, memory)."""
    p = load_profile(name, flag="NAME")
    if json_:
        print_json(p.to_dict())
        return
    from rich.table import Table

    d = p.derived()
    t = Table(show_header=False, title=f"{p.name}", title_justify="left", box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("description", p.description),
        ("executor", p.executor),
        ("nodes", f"{p.nodes.count} x {p.nodes.gpus_per_node} GPUs, {p.nodes.cpus_per_node} CPUs, {p.nodes.memory_gib} GiB"),
        ("GPU", f"{p.gpu.model} ({p.gpu.kind}), {p.gpu.memory_gib:g} GiB, {p.gpu.peak_bf16_tflops:g} TFLOP/s bf16, {p.gpu.power_w:g} W"),
        ("interconnect", _fabric(p) + (f" (HCAs {p.interconnect.ib_hcas})" if p.interconnect.ib_hcas else "")),
        ("world size", f"{d['world_size']} GPUs"),
        ("aggregate bf16", f"{d['peak_bf16_pflops']:g} PFLOP/s"),
        ("GPU power", f"{d['gpu_power_kw']:g} kW"),
        ("GPU memory", f"{d['total_gpu_memory_gib']:g} GiB in total"),
        ("comm backend", d["dist_backend"]),
        ("comm env", " ".join(f"{k}={v}" for k, v in d["comm_env"].items()) or "-"),
    ]
    if p.slurm:
        s = p.slurm
        bits = [f"partition={s.partition or '(default)'}", f"time={s.time_limit}"]
        bits += [f"{k}={v}" for k, v in (("account", s.account), ("qos", s.qos), ("constraint", s.constraint)) if v]
        bits += [f"signal=USR2@{s.signal_delay_s}", "exclusive" if s.exclusive else "shared"]
        bits += [f"--{k}={v}" for k, v in s.extra.items()]
        rows.append(("slurm", " ".join(bits)))
    import pycountry

    country = pycountry.countries.get(alpha_3=p.site.country_iso)
    site = f"{country.name if country else p.site.country_iso} ({p.site.country_iso}), PUE {p.site.pue:g}"
    if p.site.carbon_intensity_g_per_kwh is not None:
        site += f", grid {p.site.carbon_intensity_g_per_kwh:g} gCO2eq/kWh"
    rows.append(("site", site))
    if p.seed:
        rows.append(("seed", p.seed))
    for k, v in rows:
        t.add_row(k, v)
    output.console.print(t)


@app.command()
def validate(paths: list[Path] = typer.Argument(None, help="Profile files (default: every profile found).")) -> None:
    """Validate profile files; exit 2 on the first invalid one, with its one-line error."""
    targets = list(paths) if paths else [p for p, _ in discover()]
    for path in targets:
        p = read_profile(path)
        output.console.print(f"ok  {path}  ({p.name}: {p.world_size} x {p.gpu.model})", markup=False, soft_wrap=True)
