"""`plan` and `estimate` answers as aligned plain text and lines (data in, text out: render.text, not
rich, so that `plan` and `estimate` do not pay ~25 ms to import it)."""

from __future__ import annotations

from clusterctl.render.safe import printable
from clusterctl.render.text import say, styled, table_text


def print_plan(d: dict) -> None:
    m = d["memory"]
    say(
        f"{styled(printable(d['model']), 'bold')} ({d['params'] / 1e9:.2f}B params) on "
        f"{styled(printable(d['profile']), 'bold')}: {d['world_size']} GPUs = tp {d['tensor_parallel']} x pp "
        f"{d['pipeline_parallel']} x dp {d['data_parallel']}"
    )
    say(
        f"global batch {d['global_batch']} = micro batch {d['micro_batch']} x accumulation {d['accumulation']} "
        f"x {d['data_parallel']} data-parallel ranks ({d['samples_per_gpu_per_step']} samples per GPU per step)"
    )
    fsdp = d.get("strategy") == "fsdp"
    engine = f"FSDP zero_stage {d['zero_stage']}" if fsdp else f"ZeRO-{d['zero_stage']}"
    par = d.get("parallel") or {}
    rank = f", pipeline rank {par['most_loaded_rank']} (the most loaded)" if d["pipeline_parallel"] > 1 else ""
    title = (
        f"memory per GPU, {engine}, bf16 + AdamW"
        + (", activation checkpointing" if d["activation_checkpointing"] else "")
        + rank
    )
    labels: tuple[tuple[str, str], ...] = (
        ("bf16 parameters" + (" (gathered)" if fsdp else ""), "params_gib"),
        ("fp32 gradients (sharded)" if fsdp else "bf16 gradients", "grads_gib"),
        ("unsharded gradients before the reduce-scatter" if fsdp else "fp32 gradient accumulation", "grad_accum_gib"),
        ("fp32 master + Adam m, v", "optimizer_gib"),
        (f"activations ({d['micro_batch']} x {m['activations_per_sample_gib']:.3f} x in flight)", "activations_gib"),
        ("CUDA/NCCL context" if fsdp else "CUDA/NCCL context + DeepSpeed buckets", "buffers_gib"),
        ("DeepSpeed fp32 reduction buffers", "comm_buffers_gib"),
        ("fragmentation (10%)", "fragmentation_gib"),
    )
    labels = tuple((lb, k) for lb, k in labels if k != "comm_buffers_gib" or m.get(k))
    if not fsdp:
        labels = tuple((lb.replace(" x in flight", ""), k) for lb, k in labels)
    terms = [label for label, _ in labels] + ["total"]
    gib = [f"{m[key]:.2f}" for _, key in labels] + [f"{m['total_gib']:.2f} of {m['capacity_gib']:g}"]
    say(table_text(title, [["term"], ["GiB"]], [terms, gib], [False, True]))
    if m["fits"]:
        say(
            f"{styled('fits', 'green')} ({m['total_gib'] / m['capacity_gib']:.0%} of the {m['capacity_gib']:g} GiB "
            f"PyTorch can allocate): largest micro batch that fits is {d['max_micro_batch']}; "
            f"about {d['step_time_s']:.2f} s of compute per optimizer step at {d['mfu_assumed']:.0%} MFU"
        )
    else:
        say(
            f"{styled('does not fit', 'red')}: try a higher --zero-stage, --activation-checkpointing, --tp/--pp "
            "or more GPUs"
        )
    if "step_time" in d:
        print_scale(d)
    from clusterctl.render.recipe_view import print_not_reproduced  # the recipe's [paper] (issue 25)

    print_not_reproduced(d.get("not_reproduced", []), (d.get("estimate") or {}).get("recipe"))
    for line in d.get("warnings", []):
        say(f"{styled('warning', 'yellow')}: {printable(line)}")


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _startup(h: dict) -> str:
    """What a rank puts on the host while its engine is built (clusterctl.planning.host_memory)."""
    if h["deepspeed_staged_gib"]:
        return f"{h['deepspeed_staged_gib']:.1f} GiB a rank: parameter groups flattened on the host"
    if h["startup_model_gib"]:
        return f"{h['startup_model_gib']:.2f} GiB a rank: the model built on the CPU"
    return "parameter groups flattened on the GPU" if h["flattens_on_device"] else "the processes"


def print_scale(d: dict) -> None:
    """Host memory per node, step time with communication, a faster layout, checkpoint time: one line each."""
    h, t, c, k = d["host_memory"], d["step_time"], d["communication"], d["checkpoint"]
    verdict = styled("fits", "green") if h["fits"] else styled("does not fit", "red")
    parts = [f"optimizer shard {h['resume_gib']:.1f}", f"process {h['process_gib']:.1f}"]
    if h["loader_workers"]:
        parts.append(f"{h['loader_workers']} data-loader workers {h['workers_gib']:.1f}")
    if h["loader_index_gib"]:
        parts.append(f"shard index {h['loader_index_gib']:.2f}")
    if h["model_on_host_gib"]:
        parts.append(f"model on the CPU {h['model_on_host_gib']:.1f}")
    shared = f" + {h['shared_gib']:.1f} GiB of 16-bit weights once (checkpoint)" if h["shared_gib"] else ""
    say(
        f"host memory: {verdict} {h['per_node_gib']:,.0f} of {h['capacity_gib']:,g} GiB per node = "
        f"{h['ranks_per_node']} x {h['per_rank_gib']:.1f} GiB per rank ({', '.join(parts)}){shared}; "
        f"start-up {h['startup_per_node_gib']:,.0f} GiB per node ({_startup(h)})"
    )
    say(
        f"step time: {t['compute_s']:.2f} s compute + {t['exposed_communication_s']:.2f} s communication not "
        f"hidden (of {t['communication_s']:.2f} s at {c['bus_gb_s']:g} GB/s, overlap "
        f"{'on' if c['overlap_comm'] else 'off'})"
        + (f" + {t['parallel_s']:.2f} s tensor x pipeline parallel" if t.get("parallel_s") else "")
        + f" = {t['total_s']:.2f} s; expected MFU {d['mfu_expected']:.0%}"
    )
    par = d.get("parallel")
    if par:
        say(
            f"tensor x pipeline parallel: + {par['total_s']:.2f} s per step = tp all-reduces {par['tensor_parallel_s']:.2f} "
            f"+ pipeline sends {par['pipeline_send_s']:.2f} + bubble {par['bubble_s']:.2f} ({par['bubble_fraction']:.1%} "
            f"idle, {d.get('pp_schedule')}) + stage imbalance {par['imbalance_s']:.2f} (forward FLOPs per stage "
            f"{', '.join(f'{x:.0%}' for x in par['stage_flops_share'])})"
        )
    f = d.get("faster_layout")
    if f:
        say(
            f"faster_layout: {_layout(d, f)}"
            + ("" if f.get("trainer_runs", True) else "; the trainer does not run it yet")
        )
    else:
        say("faster_layout: none (no other ZeRO stage or micro batch that fits is 5% faster)")
    alts = d.get("alternatives") or []
    if alts:
        say("alternatives (all fit): " + "; ".join(_layout(d, a, flags=False) for a in alts))
    delay = k["signal_delay_s"]
    if delay is None:
        tail = "no Slurm signal on this profile"
    elif k["ok"]:
        tail = f"slurm.signal_delay_s {delay} s {styled('leaves room', 'green')}"
    else:
        tail = f"slurm.signal_delay_s {delay} s is {styled('too short', 'red')}"
    say(
        f"checkpoint: {_gb(k['bytes'])}, {k['write_s']:.0f} s to write (busiest node {_gb(k['busiest_node_bytes'])} "
        f"at {k['write_gb_s_per_node']:g} GB/s) + one step: needs {k['needed_signal_delay_s']} s of warning; {tail}"
    )
    every = k.get("checkpoint_every")
    if every:
        verdict = styled("over 5%", "red") if k.get("too_costly") else styled("within 5%", "green")
        say(f"checkpoint overhead: one every {every} steps, {k['overhead']:.1%} of the time writing ({verdict})")


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
    """The estimate as a list of figures people read (no exponents), then one line per claim."""
    from clusterctl.planning.estimates import count_words, percent
    from clusterctl.render.units import flops

    rows = [("GPUs", f"{d['gpus']:,}" if d["gpus"] else "- (give --gpus or --profile for the wall time)")]
    if d["hours"] is not None:
        rows.append(("wall time", f"{d['hours']:,.1f} h ({d['hours'] / 24:,.1f} days)"))
    rows.append(("GPU-hours", f"{d['gpu_hours']:,.0f}"))
    rows.append(("GPU energy", f"{d['gpu_energy_kwh']:,.0f} kWh ({d['power_w']:g} W x PUE {d['pue']:g})"))
    node = f"{d['nodes']} nodes x {d['node_power_w']:,.0f} W x PUE {d['pue']:g}; " if d.get("node_power_w") else ""
    rows.append(("node energy", f"{d['node_energy_kwh']:,.0f} kWh besides GPUs ({node}{d['node_power_source']})"))
    rows.append(("energy", f"{d['energy_kwh']:,.0f} kWh = {d['energy_kwh'] / 1000:,.1f} MWh"))
    rows.append(
        ("CO2eq", f"{d['co2_kg']:,.0f} kg at {d['carbon_intensity_g_per_kwh']:g} g/kWh ({d['intensity_source']})")
    )
    if d["flops"]:
        hw = (
            f"; {flops(d['flops'])} run, {percent(d['hfu'])} HFU"
            if d["flops"] != d.get("model_flops", d["flops"])
            else ""
        )
        rows.append(("training FLOPs", f"{flops(d.get('model_flops') or d['flops'])} at {percent(d['mfu'])} MFU{hw}"))
    what, value = (list(col) for col in zip(*rows, strict=True))
    say(table_text(f"estimate: {printable(d['work'])}", [[], []], [what, value], [False, True]))
    for f in d["findings"]:
        colour = "green" if f["verdict"].startswith("consistent") else "red"
        unit = f" {f['unit']}"
        band = count_words(f["low"]) if f["low"] == f["high"] else f"{count_words(f['low'])}-{count_words(f['high'])}"
        say(
            f"claim {f['claim']}: {count_words(f['claimed'])}{unit} vs {band}{unit} "
            f"{styled(f['verdict'], colour)} ({f['why']})"
        )


def print_config(config: dict, source: str) -> None:
    """The resolved config, every field the trainer will use, as the TOML the run directory keeps."""
    import tomli_w

    from vltrain.common.atomic import drop_none

    say(f"{styled('resolved config', 'bold')} (from {printable(source)}; written to the run directory as config.toml):")
    say(tomli_w.dumps(drop_none(config)).rstrip())


def print_checks(problems: list[str], warnings: list[str]) -> None:
    """What submit would refuse, and what it would only warn about."""
    if not problems and not warnings:
        say(f"{styled('checks passed', 'green')}: submit would start this run")
    for line in warnings:
        say(f"warning: {printable(line)}")
    for line in problems:
        say(f"{styled('submit would refuse', 'red')}: {printable(line)}")


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
