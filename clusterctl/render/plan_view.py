"""`plan` and `estimate` answers as aligned plain text and lines (data in, text out: render.text, not
rich, so that `plan` and `estimate` do not pay ~25 ms to import it)."""

from __future__ import annotations

from clusterctl.render.cpu_view import print_cpu_prediction
from clusterctl.render.fold import fold, tell, width
from clusterctl.render.safe import printable
from clusterctl.render.text import say, styled, table_text


def params_words(n: float) -> str:
    """A parameter count people read, three significant digits: 22.0B, 291M, 1.2M, 882K (never 0.00B)."""
    for unit, name in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= unit:
            return f"{n / unit:.3g}{name}"
    return f"{n:.0f}"


def memory_labels(d: dict) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The memory table's title and (label, key) rows, named after the precision and the engine that run."""
    m, fsdp = d["memory"], d.get("strategy") == "fsdp"
    prec = d.get("precision", "bf16")
    engine = f"FSDP zero_stage {d['zero_stage']}" if fsdp else f"ZeRO-{d['zero_stage']}"
    half = prec if prec in ("bf16", "fp16") else "bf16"  # the 16-bit dtype the terms count
    rows: tuple[tuple[str, str], ...]
    if fsdp:  # FSDP2 counts the dtype that runs (param_bytes); its sharded fp32 weights are the master
        master = "fp32 master + Adam m, v" if prec in ("bf16", "fp16") else "fp32 sharded parameters + Adam m, v"
        rows = (
            (f"{prec} parameters (gathered)", "params_gib"),
            ("fp32 gradients (sharded)", "grads_gib"),
            ("unsharded gradients before the reduce-scatter", "grad_accum_gib"),
            (master, "optimizer_gib"),
        )
        precision = f"{prec} + AdamW"
    else:  # DeepSpeed's memory model is 16-bit mixed precision's; an fp32 run is counted as bf16's
        rows = (
            (f"{half} parameters", "params_gib"),
            (f"{half} gradients", "grads_gib"),
            ("fp32 gradient accumulation", "grad_accum_gib"),
            ("fp32 master + Adam m, v", "optimizer_gib"),
        )
        precision = f"{prec} + AdamW" + ("" if prec == half else " (counted as bf16 mixed precision)")
    in_flight = " x in flight" if fsdp else ""
    rows += (
        (f"activations ({d['micro_batch']} x {m['activations_per_sample_gib']:.3f}{in_flight})", "activations_gib"),
        ("CUDA/NCCL context" if fsdp else "CUDA/NCCL context + DeepSpeed buckets", "buffers_gib"),
        ("DeepSpeed fp32 reduction buffers", "comm_buffers_gib"),
        ("fragmentation (10%)", "fragmentation_gib"),
    )
    rows = tuple((lb, k) for lb, k in rows if k != "comm_buffers_gib" or m.get(k))
    par = d.get("parallel") or {}
    rank = f", pipeline rank {par['most_loaded_rank']} (the most loaded)" if d["pipeline_parallel"] > 1 else ""
    ckpt = ", activation checkpointing" if d["activation_checkpointing"] else ""
    return f"memory per GPU, {engine}, {precision}{ckpt}{rank}", rows


def mfu_words(d: dict) -> str:
    """'expected MFU 18% (24% HFU with recomputation)': MFU in model FLOPs, HFU beside it."""
    from clusterctl.planning.estimates import percent

    mfu, hw = d.get("model_mfu_expected", d["mfu_expected"]), d["mfu_expected"]
    return f"expected MFU {percent(mfu)}" + (f" ({percent(hw)} HFU with recomputation)" if hw != mfu else "")


def print_plan(d: dict) -> None:
    m = d["memory"]
    tell(
        f"{styled(printable(d['model']), 'bold')} ({params_words(d['params'])} params) on "
        f"{styled(printable(d['profile']), 'bold')}: {d['world_size']} GPUs = tp {d['tensor_parallel']} x pp "
        f"{d['pipeline_parallel']} x dp {d['data_parallel']}"
    )
    tell(
        f"global batch {d['global_batch']} = micro batch {d['micro_batch']} x accumulation {d['accumulation']} "
        f"x {d['data_parallel']} data-parallel ranks ({d['samples_per_gpu_per_step']} samples per GPU per step)"
    )
    title, labels = memory_labels(d)
    terms = [label for label, _ in labels] + ["total"]
    gib = [f"{m[key]:.2f}" for _, key in labels] + [f"{m['total_gib']:.2f} of {m['capacity_gib']:g}"]
    say(table_text(fold(title), [["term"], ["GiB"]], [terms, gib], [False, True]))
    if m["fits"]:
        tell(
            f"{styled('fits', 'green')} ({m['total_gib'] / m['capacity_gib']:.0%} of the {m['capacity_gib']:g} GiB "
            f"PyTorch can allocate): largest micro batch that fits is {d['max_micro_batch']}; "
            f"about {d['step_time_s']:.2f} s of compute per optimizer step at {d['mfu_assumed']:.0%} of peak"
        )
    else:
        tell(
            f"{styled('does not fit', 'red')}: try a higher --zero-stage, --activation-checkpointing, --tp/--pp "
            "or more GPUs"
        )
    if "step_time" in d:
        print_scale(d)
    print_cpu_prediction(d)  # a CPU profile: what its [calibration] predicts (render.cpu_view)
    if d.get("estimate"):
        print_whole_run(d["estimate"])
    from clusterctl.render.recipe_view import print_not_reproduced  # the recipe's [paper] (issue 25)

    print_not_reproduced(d.get("not_reproduced", []), (d.get("estimate") or {}).get("recipe"))
    for line in d.get("warnings", []):
        tell(f"{styled('warning', 'yellow')}: {printable(line)}")


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _startup(h: dict, fsdp: bool = False) -> str:
    """What a rank puts on the host while its engine is built (clusterctl.planning.host_memory)."""
    if fsdp:  # FSDP2 flattens nothing: rank 0 builds the whole model in fp32 on the CPU, once
        built = h.get("startup_shared_gib") or h["startup_model_gib"]
        return f"rank 0 builds the model on the CPU: {amount(built)} GiB once" if built else "the processes"
    if h["deepspeed_staged_gib"]:
        return f"{h['deepspeed_staged_gib']:.1f} GiB a rank: DeepSpeed flattens parameter groups on the host"
    if h["startup_model_gib"]:
        return f"{h['startup_model_gib']:.2f} GiB a rank: the model built on the CPU"
    return "DeepSpeed flattens parameter groups on the GPU" if h["flattens_on_device"] else "the processes"


def _parallel_words(d: dict) -> tuple[str, list[str]]:
    """What tp and pp add to a step, naming only those that run: ('tensor parallel', ['tp all-reduces 0.16'])."""
    par, tp, pp = d["parallel"], d["tensor_parallel"], d["pipeline_parallel"]
    name = " x ".join(n for n, k in (("tensor", tp), ("pipeline", pp)) if k > 1) + " parallel"
    parts = [f"tp all-reduces {par['tensor_parallel_s']:.2f}"] if tp > 1 else []
    if pp > 1:
        shares = ", ".join(f"{x:.0%}" for x in par["stage_flops_share"])
        parts += [
            f"pipeline sends {par['pipeline_send_s']:.2f}",
            f"bubble {par['bubble_s']:.2f} ({par['bubble_fraction']:.1%} idle, {d.get('pp_schedule')})",
            f"stage imbalance {par['imbalance_s']:.2f} (forward FLOPs per stage {shares})",
        ]
    return name, parts


def print_scale(d: dict) -> None:
    """Host memory per node, step time with communication, a faster layout, checkpoint time: one line each."""
    h, t, c, k = d["host_memory"], d["step_time"], d["communication"], d["checkpoint"]
    fsdp = d.get("strategy") == "fsdp"
    verdict = styled("fits", "green") if h["fits"] else styled("does not fit", "red")
    parts = [f"optimizer shard {h['resume_gib']:.1f}", f"process {h['process_gib']:.1f}"]
    if h["loader_workers"]:
        parts.append(f"{h['loader_workers']} data-loader workers {h['workers_gib']:.1f}")
    if h["loader_index_gib"]:
        parts.append(f"shard index {h['loader_index_gib']:.2f}")
    if h["model_on_host_gib"]:
        parts.append(f"model on the CPU {h['model_on_host_gib']:.1f}")
    shared = f" + {h['shared_gib']:.1f} GiB of 16-bit weights once (checkpoint)" if h["shared_gib"] else ""
    tell(
        f"host memory: {verdict} {h['per_node_gib']:,.0f} of {h['capacity_gib']:,g} GiB per node = "
        f"{h['ranks_per_node']} x {h['per_rank_gib']:.1f} GiB per rank ({', '.join(parts)}){shared}; "
        f"start-up {h['startup_per_node_gib']:,.0f} GiB per node ({_startup(h, fsdp)})"
    )
    model_parallel = d["tensor_parallel"] * d["pipeline_parallel"] > 1 and d.get("parallel")
    name, par_parts = _parallel_words(d) if model_parallel else ("", [])
    tell(
        f"step time: {t['compute_s']:.2f} s compute + {t['exposed_communication_s']:.2f} s communication not "
        f"hidden (of {t['communication_s']:.2f} s at {c['bus_gb_s']:g} GB/s, overlap "
        f"{'on' if c['overlap_comm'] else 'off'})"
        + (f" + {t['parallel_s']:.2f} s {name}" if model_parallel else "")
        + f" = {t['total_s']:.2f} s; {mfu_words(d)}"
    )
    if model_parallel:
        tell(f"{name}: + {d['parallel']['total_s']:.2f} s per step = {' + '.join(par_parts)}")
    f = d.get("faster_layout")
    if f:
        tell(
            f"faster_layout: {_layout(d, f)}"
            + ("" if f.get("trainer_runs", True) else "; the trainer does not run it yet")
        )
    else:
        tell("faster_layout: none (no other ZeRO stage or micro batch that fits is 5% faster)")
    alts = d.get("alternatives") or []
    if alts:
        say(_alternatives(d, alts).rstrip("\n"))
    delay = k["signal_delay_s"]
    if delay is None:
        tail = "no Slurm signal on this profile"
    elif k["ok"]:
        tail = f"slurm.signal_delay_s {delay} s {styled('leaves room', 'green')}"
    else:
        tail = f"slurm.signal_delay_s {delay} s is {styled('too short', 'red')}"
    tell(
        f"checkpoint: {_gb(k['bytes'])}, {k['write_s']:.0f} s to write (busiest node {_gb(k['busiest_node_bytes'])} "
        f"at {k['write_gb_s_per_node']:g} GB/s) + one step: needs {k['needed_signal_delay_s']} s of warning; {tail}"
    )
    every = k.get("checkpoint_every")
    if every:
        verdict = styled("over 5%", "red") if k.get("too_costly") else styled("within 5%", "green")
        tell(f"checkpoint overhead: one every {every} steps, {k['overhead']:.1%} of the time writing ({verdict})")


def print_whole_run(e: dict) -> None:
    """The whole run (planning.whole_run) as `estimate --profile` prints it, and the paper's run beside it."""
    from clusterctl.planning.estimates import percent

    hfu = f", {percent(e['hfu'])} HFU" if e.get("hfu") and e["hfu"] != e["mfu"] else ""
    rows = run_rows(e)
    paper = e.get("paper")
    if paper:
        rows.append(("paper", paper_words(paper)))
    say(rows_text(f"whole run: {printable(e['work'])} at the expected {percent(e['mfu'])} MFU{hfu}", rows))


def paper_words(p: dict) -> str:
    """'1,008 h (6.0 weeks) on 32 GPUs: this run is 83x shorter' (in GPU-hours)."""
    from clusterctl.planning.estimates import count_words
    from clusterctl.planning.whole_run import duration_words

    if p["duration_h"] and p["gpus"]:
        stated = f"{duration_words(p['duration_h'])} on {p['gpus']} GPUs"
    else:
        stated = f"{count_words(p['gpu_hours'])} GPU-hours"
    r = p["ratio"]  # the paper's GPU-hours over this run's
    times = max(r, 1 / r) if r > 0 else float("inf")
    words = f"{times:,.0f}x" if times >= 10 else f"{times:.2g}x"
    return f"{stated}: this run is {words} {'shorter' if r >= 1 else 'longer'}"


def rows_text(title: str, rows: list[tuple[str, str]]) -> str:
    """Names and values as two aligned columns, each value folded to the terminal's width."""
    import textwrap

    key_w = max(len(k) for k, _ in rows)
    cols = width()
    room = max(20, cols - key_w - 4) if cols else None
    out = [fold(title), ""]
    for key, value in rows:
        lines = textwrap.wrap(value, room, break_long_words=False, break_on_hyphens=False) if room else [value]
        out.append(f" {key:<{key_w}}   {lines[0]}".rstrip())
        out.extend(f" {'':<{key_w}}   {more}" for more in lines[1:])
    return "\n".join(out) + "\n"


def amount(x: float) -> str:
    """A figure in a row: whole with separators from 100 (35,371), else three significant digits
    (12.2, 0.0123: a twin's GPU-hours are not 0)."""
    from clusterctl.planning.estimates import count_words

    return f"{x:,.0f}" if abs(x) >= 100 else count_words(x)


def money_text(x: float, currency: str) -> str:
    """An amount of money: three significant digits, separators from 100 ('12,480 USD', '0.0123 EUR')."""
    from clusterctl.render.units import quantity

    return f"{quantity(x)} {currency}"


def money_words(m: dict) -> str:
    """planning.cost.money's dict as a row: the total, and its parts when both are priced."""
    total = money_text(m["total"], m["currency"])
    if m.get("gpu") is not None and m.get("energy") is not None:
        return f"{total} ({money_text(m['gpu'], m['currency'])} GPU-hours + {money_text(m['energy'], m['currency'])} energy)"
    return f"{total} ({'GPU-hours' if m.get('gpu') is not None else 'energy'})"


def run_rows(d: dict) -> list[tuple[str, str]]:
    """Wall time, GPU-hours, energy and CO2 of an estimate (planning.estimates' dict): the rows `estimate`
    and the plan's whole run share, so that the two read alike."""
    from clusterctl.planning.whole_run import duration_words

    rows = []
    if d.get("hours") is not None:
        gpus = f"{d['gpus']:,} GPU" + ("s" if d["gpus"] != 1 else "")
        rows.append(("wall time", f"{duration_words(d['hours'])} on {gpus}"))
    rows.append(("GPU-hours", amount(d["gpu_hours"])))
    if d.get("money"):  # planning.cost: only where the profile sets a price (never a made-up 0)
        rows.append(("cost", money_words(d["money"])))
    rows.append(("GPU energy", f"{amount(d['gpu_energy_kwh'])} kWh ({d['power_w']:g} W x PUE {d['pue']:g})"))
    if d.get("node_energy_kwh") or d.get("node_power_source"):
        node = f"{d['nodes']} nodes x {d['node_power_w']:,.0f} W; " if d.get("node_power_w") else ""
        source = d.get("node_power_source", "")
        rows.append(("non-GPU energy", f"{amount(d['node_energy_kwh'])} kWh ({node}{source})"))
    mwh = f" = {d['energy_kwh'] / 1000:,.1f} MWh" if d["energy_kwh"] >= 1000 else ""
    rows.append(("energy", f"{amount(d['energy_kwh'])} kWh{mwh}"))
    intensity = f"{d['carbon_intensity_g_per_kwh']:g} g/kWh ({d['intensity_source']})"
    rows.append(("CO2eq", f"{amount(d['co2_kg'])} kg at {intensity}"))
    return rows


def _alternatives(d: dict, alts: list[dict]) -> str:
    """The other layouts that fit, fastest first, as a table (each row: the flags of _layout)."""
    fsdp = d.get("strategy") == "fsdp"
    names = [
        (f"FSDP zero_stage {a['zero_stage']}" + (f" {a['sharding']}" if a.get("sharding") else ""))
        if fsdp
        else f"ZeRO-{a['zero_stage']}"
        for a in alts
    ]
    cols = [
        names,
        [f"{a['micro_batch']} x {a['accumulation']}" for a in alts],
        [f"{a['total_s']:.2f}" for a in alts],
        [f"{a['speedup']:.2f}x" for a in alts],
        [f"{a.get('memory_gib', 0):.1f}" for a in alts],
    ]
    heads = [["layout"], ["micro x", "accum"], ["s per", "step"], ["speed-", "up"], ["GiB per", "GPU"]]
    return table_text("alternatives (all fit):", heads, cols, [False, True, True, True, True])


def _layout(d: dict, a: dict, flags: bool = True) -> str:
    """One alternative layout: engine, split, time, speed-up, memory per GPU (and the flags that pick it)."""
    if d.get("strategy") == "fsdp":
        engine = f"FSDP zero_stage {a['zero_stage']}" + (f" {a['sharding']} sharding" if a.get("sharding") else "")
    else:
        engine = f"ZeRO-{a['zero_stage']}"
    text = (
        f"{engine} with micro batch {a['micro_batch']} x accumulation {a['accumulation']}: {a['total_s']:.2f} s per "
        f"step, {a['speedup']:.2f}x, {a.get('memory_gib', 0):.1f} GiB per GPU"
    )
    if flags:
        shard = f" --set parallel.sharding={a['sharding']}" if a.get("sharding") else ""
        text += f" (--zero-stage {a['zero_stage']} --micro-batch {a['micro_batch']} --accum {a['accumulation']}{shard})"
    return text


def print_estimate(d: dict) -> None:
    """The estimate as a list of figures people read (no exponents; the rows the plan's whole run
    prints), then the paper's run when the profile's recipe is estimated, one line per claim."""
    from clusterctl.planning.estimates import count_words, percent
    from clusterctl.render.units import flops

    rows = [] if d["gpus"] else [("GPUs", "- (give --gpus or --profile for the wall time)")]
    rows += run_rows(d)
    if d["flops"]:
        hw = f"; {flops(d['flops'])} run" if d["flops"] != d.get("model_flops", d["flops"]) else ""
        rows.append(("training FLOPs", f"{flops(d.get('model_flops') or d['flops'])}{hw}"))
        hfu = f", {percent(d['hfu'])} HFU" if d.get("hfu") and d["hfu"] != d["mfu"] else ""
        source = f" ({d['mfu_source']})" if d.get("mfu_source") else ""
        rows.append(("MFU", f"{percent(d['mfu'])}{hfu}{source}"))
    if d.get("paper"):
        rows.append(("paper", paper_words(d["paper"])))
    recipe = f" (recipe {d['recipe']})" if d.get("recipe") else ""
    say(rows_text(f"estimate: {printable(d['work'])}{recipe}", rows))
    for f in d["findings"]:
        colour = "green" if f["verdict"].startswith("consistent") else "red"
        unit = f" {f['unit']}"
        band = count_words(f["low"]) if f["low"] == f["high"] else f"{count_words(f['low'])}-{count_words(f['high'])}"
        tell(
            f"claim {f['claim']}: {count_words(f['claimed'])}{unit} vs {band}{unit} "
            f"{styled(f['verdict'], colour)} ({f['why']})"
        )
    for line in d.get("warnings", []):
        tell(f"{styled('warning', 'yellow')}: {printable(line)}")


def print_config(config: dict, source: str) -> None:
    """The resolved config, every field the trainer will use, as the TOML the run directory keeps."""
    import tomli_w

    from vltrain.common.atomic import drop_none

    tell(
        f"{styled('resolved config', 'bold')} (from {printable(source)}; written to the run directory as config.toml):"
    )
    say(tomli_w.dumps(drop_none(config)).rstrip())


def print_checks(problems: list[str], warnings: list[str]) -> None:
    """What submit would refuse, and what it would only warn about."""
    if not problems and not warnings:
        say(f"{styled('checks passed', 'green')}: submit would start this run")
    for line in warnings:
        tell(f"warning: {printable(line)}")
    for line in problems:
        tell(f"{styled('submit would refuse', 'red')}: {printable(line)}")


def print_dry_run(profile: str, profile_source: str, plan: dict, d: dict, text: str) -> None:
    """`submit --dry-run`: the profile, the plan, the resolved config (runs.submit.dry_run's `d`), the
    backend's rendering of the job (`text`: for Slurm the sbatch script) and what the checks found."""
    say(f"profile {printable(profile)} from {printable(profile_source)}")
    print_plan(plan | {"warnings": []})  # the checks below list the plan's warnings with submit's own
    print_config(d["config"], d["source"])
    if d["sbatch"] is not None:
        say(f"{styled('sbatch script', 'bold')} (submitit would submit this):")
    say(text)
    print_checks(d["checks"]["problems"], d["checks"]["warnings"])
