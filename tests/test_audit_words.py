"""Issue 25 point 4: audits say what they count. MFU in model FLOPs (recomputation excluded) with HFU
beside it, no percentage rounded to 0, one number format, the GPU count a GPU-hour claim implies, and the
nodes' power besides their GPUs (the profile's figure, else a default per GPU model said as assumed).

Expected figures come from arithmetic written here (6ND, 8ND, the 4/3 recompute factor, the DGX
datasheets' system power less their GPUs), not from the code under test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clusterctl.planning.estimates import Claims, Setup, Work, audit, estimate, percent
from tests.conftest import REPO, run_cli

A100_PEAK, H100_PEAK = 312e12, 989e12
SIX_WEEKS_H = 6 * 7 * 24
DGX_A100_OTHER_W = 6500 - 8 * 400  # DGX A100: 6.5 kW max system power, 8 GPUs at 400 W board power
DGX_H100_OTHER_W = 10200 - 8 * 700  # DGX H100: 10.2 kW max, 8 GPUs at 700 W


def est_json(*args: str) -> dict:
    r = run_cli("estimate", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def finding(d: dict, claim: str) -> dict:
    (f,) = [f for f in d["findings"] if f["claim"] == claim]
    return f


def pct(x: float) -> str:
    """A percentage as the audit should print it (>= 10%: whole; below: two significant digits)."""
    return f"{x * 100:.0f}%" if x >= 0.1 else f"{float(f'{x * 100:.2g}'):g}%"


# --- MFU in model FLOPs, HFU beside it ---------------------------------------------------------------
def test_tokens_mfu_counts_6nd_and_hfu_8nd():
    """22B params x 4.2T tokens on 128 H100s claimed in 3,000 h: MFU is 6ND over GPU-time x peak, HFU 8ND."""
    args = ("--gpus", "128", "--peak-tflops", "989", "--power-w", "700", "--pue", "1.1")
    d = est_json(*args, "--carbon-intensity", "400", "--tokens", "4.2T", "--params", "22B")
    d_ck = est_json(
        *args, "--carbon-intensity", "400", "--tokens", "4.2T", "--params", "22B", "--activation-checkpointing"
    )
    model, hardware = 6 * 22e9 * 4.2e12, 8 * 22e9 * 4.2e12
    # the time counts model FLOPs at the assumed MFU: recomputation shows in HFU, not as a longer run
    hours = model / (128 * H100_PEAK * 0.40) / 3600
    assert d["hours"] == pytest.approx(hours, rel=1e-4) and d_ck["hours"] == pytest.approx(hours, rel=1e-4)
    assert d_ck["model_flops"] == pytest.approx(model) and d_ck["flops"] == pytest.approx(hardware)
    assert d_ck["hfu"] == pytest.approx(0.40 * 4 / 3, rel=1e-4) and d["hfu"] == pytest.approx(0.40, rel=1e-4)

    r = run_cli(
        "estimate",
        *args,
        "--carbon-intensity",
        "400",
        "--tokens",
        "4.2T",
        "--params",
        "22B",
        "--activation-checkpointing",
        "--claimed-duration",
        "3000h",
        "--json",
    )
    f = finding(json.loads(r.stdout), "hours")
    mfu = model / (128 * 3000 * 3600 * H100_PEAK)
    hfu = hardware / (128 * 3000 * 3600 * H100_PEAK)
    assert f["implied_mfu"] == pytest.approx(mfu, rel=1e-3) and f["implied_hfu"] == pytest.approx(hfu, rel=1e-3)
    assert f"implies {pct(mfu)} MFU ({pct(hfu)} HFU with recomputation)" in f["verdict"]


def test_seed_002_six_weeks_is_74_percent_mfu_not_98():
    """The issue's case: 1.8B samples of CrossModal-XL on 64 A100s in 6 weeks with recomputation."""
    from vltrain.model_math import forward_flops_per_sample
    from vltrain.presets import get_preset

    d = est_json(
        "--profile", "a100x64", "--samples", "1.8B", "--model", "crossmodal-xl", "--activation-checkpointing",
        "--claimed-duration", "6w",
    )  # fmt: skip
    fwd = forward_flops_per_sample(get_preset("crossmodal-xl"))
    gpu_seconds = 64 * SIX_WEEKS_H * 3600 * A100_PEAK
    mfu, hfu = 1.8e9 * 3 * fwd / gpu_seconds, 1.8e9 * 4 * fwd / gpu_seconds  # fwd + bwd; + the forward again
    f = finding(d, "hours")
    assert f["implied_mfu"] == pytest.approx(mfu, rel=1e-3) and f["implied_hfu"] / f["implied_mfu"] == pytest.approx(
        4 / 3, rel=1e-3
    )
    assert 0.7 < mfu < 0.78 and 0.95 < hfu < 1.0
    assert f"implies {pct(mfu)} MFU ({pct(hfu)} HFU with recomputation); plausible MFU 10-65%" in f["verdict"]
    assert f["verdict"].startswith("implausible")  # 74% is above the most a whole run sustains (65%)


def test_a_claim_past_the_peak_says_how_far_in_both_counts():
    s = Setup(gpus=8, peak_tflops=100, power_w=500, pue=1.0, carbon_intensity_g_per_kwh=0, intensity_source="x")
    model = 100e12 * 3600 * 30.0  # 30 GPU-hours at 100% MFU
    e = estimate(s, Work(flops=model * 4 / 3, model_flops=model), mfu=0.4)
    (f,) = audit(s, e, Claims(gpu_hours=10))
    assert "needs 4x the GPUs' peak (3x in model FLOPs alone)" in f["verdict"]


# --- no rounding to 0 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mfu", [0.013, 0.0032, 0.0004, 0.000004])
def test_a_small_implied_mfu_is_never_zero(mfu):
    s = Setup(gpus=32, peak_tflops=312, power_w=400, pue=1.2, carbon_intensity_g_per_kwh=56, intensity_source="x")
    flops = 1e21
    claimed = flops / (312e12 * 3600 * mfu)  # GPU-hours that make this MFU
    (f,) = audit(s, estimate(s, Work(flops=flops), mfu=0.4), Claims(gpu_hours=claimed))
    assert f["implied_mfu"] == pytest.approx(mfu, rel=1e-3)  # the JSON keeps it too
    words = "<0.1%" if mfu < 0.001 else pct(mfu)
    assert f"implies {words} MFU" in f["verdict"] and not re.search(r"(?<![\d.])0%", f["verdict"])


def test_percent_words():
    assert [percent(x) for x in (0.738, 0.013, 0.0032, 0.0004, 0.0)] == ["74%", "1.3%", "0.32%", "<0.1%", "0%"]


# --- one number format, and the GPUs a GPU-hour claim implies ------------------------------------------
SEED_AUDITS = [
    ("--profile", "a100x32", "--duration", "6w", "--claimed-gpu-hours", "750000"),
    ("--profile", "a100x32", "--samples", "500M", "--model", "vl-seed000", "--claimed-gpu-hours", "750000",
     "--claimed-duration", "6w"),
    ("--profile", "a100x64", "--samples", "1.8B", "--model", "crossmodal-xl", "--activation-checkpointing",
     "--claimed-duration", "6w"),
    ("--profile", "h100x128", "--model", "vl-22b", "--tokens", "4.2T", "--samples", "850M",
     "--activation-checkpointing", "--claimed-energy-mwh", "2.1"),
    ("--profile", "a100x256", "--duration", "2mo", "--claimed-gpu-hours", "100000"),
]  # fmt: skip


@pytest.mark.parametrize("args", SEED_AUDITS, ids=["000", "000-work", "002", "003", "004"])
def test_every_seed_audit_has_one_number_format(args):
    r = run_cli("estimate", *args)
    assert r.returncode == 0, r.stderr
    claims = [line for line in r.stdout.splitlines() if line.startswith("claim ")]
    assert claims, r.stdout
    for line in claims:
        assert not re.search(r"\d\.\d{4,}", line), line  # "4.9829-32 h" mixed 5 and 2 significant digits
        assert not re.search(r"\d[eE][+-]?\d", line), line
        assert not re.search(r"(?<![\d.<])0%", line), line
        for number in re.findall(r"\d[\d,]*\.\d+", line):  # every decimal has at most 3 significant digits
            assert len(number.replace(",", "").replace(".", "").lstrip("0")) <= 3, (number, line)


def test_seed_000_work_band_in_hours_has_one_format():
    """500M samples of vl-seed000 on 32 A100s: the claimed-duration band is 10-65% MFU in hours."""
    from vltrain.model_math import forward_flops_per_sample
    from vltrain.presets import get_preset

    r = run_cli("estimate", *SEED_AUDITS[1])
    hours_at_full = 500e6 * 3 * forward_flops_per_sample(get_preset("vl-seed000")) / (32 * A100_PEAK) / 3600
    low, high = (float(f"{hours_at_full / m:.3g}") for m in (0.65, 0.10))
    assert f"vs {low:g}-{high:g} h " in r.stdout, r.stdout


@pytest.mark.parametrize(
    "args, gpus, over",
    [
        (SEED_AUDITS[0], 750_000 / SIX_WEEKS_H, "6 weeks, not 32"),  # over the setup's time
        (SEED_AUDITS[1], 750_000 / SIX_WEEKS_H, "6 weeks, not 32"),  # over the claimed time
        (SEED_AUDITS[4], 100_000 / (2 * 730.485), "2 months, not 256"),  # a month is 1/12 of 365.2425 days
    ],
    ids=["000", "000-work", "004"],
)
def test_a_gpu_hour_claim_says_how_many_gpus_it_means(args, gpus, over):
    f = finding(est_json(*args), "gpu_hours")
    assert f"that is ~{float(f'{gpus:.3g}'):,g} GPUs for {over}" in f["verdict"], f["verdict"]


# --- node power besides the GPUs ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "profile, nodes, gpu_w, other_w, pue",
    [("a100x32", 4, 400, DGX_A100_OTHER_W, 1.2), ("h100x128", 16, 700, DGX_H100_OTHER_W, 1.3)],
)
def test_node_power_defaults_per_gpu_model_and_says_assumed(profile, nodes, gpu_w, other_w, pue):
    d = est_json("--profile", profile, "--duration", "6w")
    assert d["node_power_w"] == pytest.approx(other_w) and d["nodes"] == nodes
    assert "default" in d["node_power_source"] and "assumed" in d["node_power_source"]
    assert d["gpu_energy_kwh"] == pytest.approx(nodes * 8 * SIX_WEEKS_H * gpu_w / 1000 * pue, rel=1e-6)
    assert d["node_energy_kwh"] == pytest.approx(nodes * SIX_WEEKS_H * other_w / 1000 * pue, rel=1e-6)
    assert d["energy_kwh"] == pytest.approx(d["gpu_energy_kwh"] + d["node_energy_kwh"], rel=1e-6)
    human = run_cli("estimate", "--profile", profile, "--duration", "6w").stdout
    (line,) = [x for x in human.splitlines() if "non-GPU energy" in x]
    assert f"{d['node_energy_kwh']:,.0f} kWh" in line and "assumed" in line and f"{other_w:,} W" in line


def test_node_power_from_the_profile_and_the_flag(tmp_path: Path):
    text = (REPO / "cluster_profiles" / "a100x32.toml").read_text()
    mine = tmp_path / "a100x32.toml"
    mine.write_text(text.replace("memory_gib = 1000\n", "memory_gib = 1000\nnon_gpu_power_w = 1500\n", 1))
    d = est_json("--profile", str(mine), "--duration", "100h")
    assert d["node_power_source"] == "profile" and d["node_energy_kwh"] == pytest.approx(4 * 100 * 1.5 * 1.2)
    d = est_json("--profile", str(mine), "--duration", "100h", "--node-power-w", "0")
    assert d["node_power_source"] == "--node-power-w" and d["node_energy_kwh"] == 0
    assert d["energy_kwh"] == pytest.approx(32 * 100 * 0.4 * 1.2)
    mine.write_text(text.replace("memory_gib = 1000\n", "memory_gib = 1000\nnon_gpu_power_w = -5\n", 1))
    r = run_cli("estimate", "--profile", str(mine), "--duration", "100h")
    assert r.returncode == 2 and "nodes.non_gpu_power_w: " in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("profile, words", [("local", "not counted"), ("slurm-local", "not counted")])
def test_cpu_profiles_count_no_node_power_and_say_so(profile, words):
    d = est_json("--profile", profile, "--duration", "10h")
    assert d["node_energy_kwh"] == 0 and d["node_power_source"].startswith(words)


def test_an_unknown_gpu_model_has_no_default_and_says_what_to_set():
    from clusterctl.planning.profiles import Gpu, Nodes, node_power

    nodes = Nodes(count=2, gpus_per_node=4, cpus_per_node=64, memory_gib=512)
    assert node_power(nodes, Gpu(model="MI300X", memory_gib=192, peak_bf16_tflops=1307, power_w=750)) == (
        0.0,
        "not counted: no default for MI300X; set nodes.non_gpu_power_w",
    )
    w, source = node_power(nodes, Gpu(model="A100-SXM4-40GB", memory_gib=40, peak_bf16_tflops=312, power_w=400))
    assert w == pytest.approx(4 * DGX_A100_OTHER_W / 8) and "assumed" in source  # per GPU, on a 4-GPU node


def test_the_energy_ceiling_counts_the_nodes_besides_their_gpus():
    kw = dict(gpus=16, peak_tflops=100, power_w=500, pue=1.5, carbon_intensity_g_per_kwh=0, intensity_source="x")
    flops = 100e12 * 3600 * 1000.0  # 1,000 GPU-h at 100% MFU -> at most 10,000 GPU-h (10% MFU), 625 h on 16
    ceilings = []
    for node_w in (0.0, 2000.0):
        s = Setup(**kw, nodes=2, node_power_w=node_w)
        (f,) = audit(s, estimate(s, Work(flops=flops), mfu=0.4), Claims(energy_kwh=1.0))
        ceilings.append(f["high"])
    assert ceilings[0] == pytest.approx(10_000 * 0.5 * 1.5)
    assert ceilings[1] - ceilings[0] == pytest.approx(2 * 625 * 2.0 * 1.5)
