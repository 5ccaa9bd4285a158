"""Issue 23 (3, 4, 7), planner side: usable GPU capacity, DeepSpeed's fp32 reduction buffers, the FSDP
zero_stage 2 and hybrid-sharding memory and communication, alternatives that fit with their memory, the
objectives' FLOPs, checkpoint overhead, and `plan --json`'s warnings (also printed by plan and submit)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from clusterctl.planning import advice, fsdp, memory
from clusterctl.planning.checkpoint import OVERHEAD_WARNING
from clusterctl.planning.plan import make_plan, plan_for_run
from clusterctl.planning.profiles import load_profile
from clusterctl.planning.stages import rank_shares
from tests.conftest import dry_run_exit, run_cli
from vltrain.config import LossConfig, ParallelConfig, TrainConfig, load_train_config
from vltrain.dsconfig import bucket_elements
from vltrain.model_math import forward_flops_per_sample, param_count
from vltrain.presets import get_preset

CONFIGS = Path(__file__).resolve().parents[1] / "clusterctl" / "configs"
SEEDS = {
    "a100x32": "seed-000",
    "a100x128": "seed-001",
    "a100x64": "seed-002",
    "h100x128": "seed-003",
    "a100x256": "seed-004",
}


def _plan(profile: str, **changes):
    cfg = load_train_config(CONFIGS / f"{SEEDS[profile]}.toml", None)
    return plan_for_run(load_profile(profile), dataclasses.replace(cfg, **changes))[0]


def _fsdp_cfg(zero_stage: int, sharding: str = "full", accumulation: int = 8) -> TrainConfig:
    return TrainConfig(
        zero_stage=zero_stage,
        accumulation=accumulation,
        parallel=ParallelConfig(strategy="fsdp", sharding=sharding),
        loss=LossConfig(mlm=0.0, caption=0.0),
    )


# --- (3) capacity is what PyTorch can allocate ---------------------------------------------------------
def test_capacity_is_what_pytorch_allocates_per_gpu_model_and_a_profile_overrides_it():
    a100 = load_profile("a100x64").gpu
    assert a100.memory_gib == 80 and a100.capacity_gib == 79.15
    assert load_profile("h100x128").gpu.capacity_gib < 80
    assert dataclasses.replace(a100, usable_memory_gib=78.5).capacity_gib == 78.5
    unknown = dataclasses.replace(a100, model="X9000-96GB", memory_gib=96)
    assert 94 < unknown.capacity_gib < 96
    assert load_profile("local").gpu.capacity_gib == load_profile("local").gpu.memory_gib  # CPU: all of it
    p = _plan("a100x64")
    assert p.memory.capacity_gib == 79.15 and p.memory.total_gib <= 79.15


def test_deepspeed_fp32_reduction_buffers_are_counted():
    """Seed 002 (ZeRO-2, bf16, communication_data_type fp32): the reduced bucket's 16-bit flat copy and its
    fp32 cast, 6 bytes per element of the 5e8-element bucket = 2.79 GiB; none when nothing is cast."""
    p = _plan("a100x64")
    bucket = bucket_elements(p.params)
    assert p.memory.comm_buffers_gib == pytest.approx(bucket * 6 / memory.GIB) and 2.7 < p.memory.comm_buffers_gib < 2.9
    fp32 = _plan("a100x64", precision="fp32", micro_batch=1, accumulation=128)
    assert fp32.memory.comm_buffers_gib == 0.0


def test_memory_at_95_percent_warns_in_json_and_human_output():
    p = _plan("a100x64")  # seed 002: no split leaves 5% under ZeRO-2
    assert p.memory.fits and p.memory.share >= memory.NEAR_CAPACITY
    d = p.to_dict()
    assert any(w.startswith("memory:") and "95%" in w for w in d["warnings"])
    roomy = _plan("a100x32")
    assert not any(w.startswith("memory:") for w in roomy.to_dict()["warnings"])
    r = run_cli("plan", "--profile", "a100x64")
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("warning: memory:") for line in r.stdout.splitlines())


@pytest.mark.parametrize("profile", ["a100x128", "h100x128", "a100x256", "a100x32"])
def test_recipes_whose_split_is_open_leave_five_percent(profile):
    m = _plan(profile).memory
    assert m.fits and m.share < memory.NEAR_CAPACITY, m


# --- (4) FSDP zero_stage 2, hybrid sharding, alternatives ---------------------------------------------
def test_fsdp_zero_stage_2_keeps_the_whole_unsharded_fp32_gradients_while_accumulating():
    """The trainer turns gradient sync off before the last micro step under zero_stage 2, and FSDP2 then
    accumulates unsharded fp32 gradients: 4 bytes per parameter of the share (114 GiB for vl-30b)."""
    model = get_preset("vl-30b")
    share = rank_shares(model, 1, 1, "1f1b", False)[0]
    lay = fsdp.ParallelLayout(1, 1, 128, 2)
    kept = fsdp.memory(model, lay, 2, 8, 80)[0]
    assert kept.grad_accum_gib * memory.GIB == pytest.approx(4 * share.params)
    assert kept.grad_accum_gib > 110 and not kept.fits
    one = fsdp.memory(model, lay, 16, 1, 80)[0]  # one micro step: every unit reduced at once
    assert one.grad_accum_gib < 5
    z3 = fsdp.memory(model, dataclasses.replace(lay, zero_stage=3), 2, 8, 80)[0]  # reduced every micro step
    assert z3.grad_accum_gib < 5


def test_fsdp_zero_stage_2_reduces_once_per_step():
    model = get_preset("vl-30b")
    p = make_plan(load_profile("a100x128"), model, 2048, accumulation=8, zero_stage=2, tp=4, train_config=_fsdp_cfg(2))
    rs = [c for c in p.comm.collectives if c.op == "reduce_scatter"]
    assert rs and not any(c.every_micro_step for c in rs)
    p3 = make_plan(load_profile("a100x128"), model, 2048, accumulation=8, zero_stage=3, tp=4, train_config=_fsdp_cfg(3))
    assert all(c.every_micro_step for c in p3.comm.collectives if c.op == "reduce_scatter")


def test_hybrid_sharding_shards_within_a_node_and_all_reduces_across():
    model = get_preset("vl-22b")
    prof = load_profile("h100x128")
    full = make_plan(prof, model, 2048, zero_stage=3, tp=2, train_config=_fsdp_cfg(3, "full", 1))
    hybrid = make_plan(prof, model, 2048, zero_stage=3, tp=2, train_config=_fsdp_cfg(3, "hybrid", 1))
    assert full.split.data_parallel == 64
    # 12 bytes of fp32 master + Adam per parameter of the tp share, over 4 ranks (8 GPUs / tp 2) instead of 64
    assert hybrid.memory.optimizer_gib == pytest.approx(full.memory.optimizer_gib * 64 / 4, rel=1e-6)
    across = [c for c in hybrid.comm.collectives if c.op == "all_reduce"]
    assert len(across) == 1 and "across nodes" in across[0].what
    assert not any(c.op == "all_reduce" for c in full.comm.collectives)
    gather_full = next(c for c in full.comm.collectives if c.op == "all_gather").seconds
    gather_hybrid = next(c for c in hybrid.comm.collectives if c.op == "all_gather").seconds
    assert gather_hybrid < gather_full  # within the node, over NVLink
    assert hybrid.to_dict()["sharding"] == "hybrid"


def _seed001_old_layout():
    """Seed 001's recipe as it was: FSDP zero_stage 3 without tp, accumulation 8."""
    return _plan("a100x128", zero_stage=3, parallel=ParallelConfig(strategy="fsdp", tp=1))


def test_alternatives_fit_and_show_their_memory():
    p = _seed001_old_layout()
    assert p.alternatives
    for a in p.alternatives:
        assert 0 < a.memory_gib <= p.memory.capacity_gib and a.sharding in ("full", "hybrid")
    # zero_stage 2 without tp keeps the running units' whole fp32 gradients (vision + decoder when
    # captioning, the second stage): never offered
    assert not any(a.zero_stage == 2 and a.sharding == "full" for a in p.alternatives)
    d = p.to_dict()
    assert all("memory_gib" in a for a in d["alternatives"]) and d["faster_layout"]["memory_gib"] > 0
    ds = _plan("a100x64").to_dict()
    assert all(0 < a["memory_gib"] <= ds["memory"]["capacity_gib"] for a in ds["alternatives"])


def test_low_mfu_and_a_much_faster_layout_warn():
    p = _seed001_old_layout()
    w = p.to_dict()["warnings"]
    assert p.mfu_expected() < advice.MFU_WARNING and any(x.startswith("mfu:") for x in w)
    fastest = max(p.alternatives, key=lambda a: a.speedup)
    assert fastest.speedup >= advice.FASTER_WARNING
    assert any(x.startswith("layout:") and f"--accum {fastest.accumulation}" in x for x in w)
    good = _plan("a100x256").to_dict()["warnings"]
    assert not any(x.startswith(("mfu:", "layout:")) for x in good)


def test_flops_count_only_the_objectives_that_run():
    cfg = load_train_config(CONFIGS / "seed-001.toml", None)
    p = plan_for_run(load_profile("a100x128"), cfg)[0]
    assert p.objectives == ("itc", "mim")
    model = get_preset("vl-30b")
    fwd = forward_flops_per_sample(model, mim_mask_ratio=0.75, objectives=("itc", "mim"))
    assert p.flops_per_sample == pytest.approx(3 * fwd)
    assert p.flops_per_sample < 0.5 * 3 * forward_flops_per_sample(model, mim_mask_ratio=0.75)
    assert p.params == param_count(model, mim=True)  # every parameter is still held


def test_units_of_objectives_weighted_0_are_neither_gathered_nor_reduced_but_memory_covers_every_stage():
    """Seed 001's first stage (ITC + MIM) runs the vision and text towers; the 26.6B-parameter caption
    decoder runs in the second: the traffic is the first stage's running units, the memory the worst stage's."""
    model = get_preset("vl-30b")
    p = _seed001_old_layout()
    share = rank_shares(model, 1, 1, "1f1b", False)[0]
    gather = next(c for c in p.comm.collectives if c.op == "all_gather")
    decoder = sum(b.params(1) for b in fsdp.blocks(model) if b.kind == "decoder")
    assert gather.tensor_bytes == pytest.approx(2 * (share.params - decoder - fsdp_fusion(model)))
    lay = fsdp.ParallelLayout(1, 1, 128, 2)
    first, both = fsdp.idle_kinds(("itc", "mim")), fsdp.idle_kinds(("caption",))
    assert first == {"decoder", "fusion"} and both == {"text", "fusion"}
    one = fsdp.memory(model, dataclasses.replace(lay, stage_idle=(first,)), 2, 8, 80)[0]
    worst = fsdp.memory(model, dataclasses.replace(lay, stage_idle=(first, both)), 2, 8, 80)[0]
    assert one.fits and not worst.fits  # the captioning stage gathers and accumulates the decoder
    assert one.optimizer_gib == worst.optimizer_gib  # every parameter keeps its optimizer state


def fsdp_fusion(model) -> float:
    return sum(b.params(1) for b in fsdp.blocks(model) if b.kind == "fusion")


# --- (7) checkpoint overhead ---------------------------------------------------------------------------
def test_checkpoint_overhead_is_shown_and_warns_above_five_percent():
    p = _plan("h100x128", checkpoint_every=10)
    k = p.checkpoint
    assert k.overhead == pytest.approx(k.write_s / (10 * k.step_s + k.write_s))
    assert k.overhead > OVERHEAD_WARNING
    w = [x for x in p.to_dict()["warnings"] if x.startswith("checkpoint:")]
    assert len(w) == 1 and f"checkpoint_every >= {k.cadence_within()}" in w[0]
    within = _plan("h100x128", checkpoint_every=k.cadence_within()).checkpoint
    assert within.overhead <= OVERHEAD_WARNING
    assert _plan("h100x128", checkpoint_every=0).checkpoint.overhead == 0.0


@pytest.mark.parametrize("profile", sorted(SEEDS))
def test_recipe_cadences_are_within_five_percent(profile):
    d = _plan(profile).to_dict()
    assert d["checkpoint"]["checkpoint_every"] > 0
    assert d["checkpoint"]["overhead"] <= OVERHEAD_WARNING
    assert not any(w.startswith("checkpoint:") for w in d["warnings"])


def test_cli_plan_json_has_warnings_and_submit_dry_run_prints_them(tmp_path, monkeypatch):
    r = run_cli("plan", "--profile", "a100x128", "--zero-stage", "3", "--tp", "1", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert isinstance(d["warnings"], list) and any(w.startswith("mfu:") for w in d["warnings"])
    assert 0 <= d["checkpoint"]["overhead"] < 1 and d["checkpoint"]["too_costly"] is False
    r = run_cli("plan", "--profile", "a100x128", "--zero-stage", "3", "--tp", "1")
    assert "warning: mfu:" in r.stdout and "checkpoint overhead:" in r.stdout
    assert "alternatives (all fit):" in r.stdout
    r = run_cli("submit", "--profile", "a100x128", "--zero-stage", "3", "--tp", "1", "--dry-run", "--json")
    dry_run_exit(r)
    warned = json.loads(r.stdout)["checks"]["warnings"]
    assert any(w.startswith("mfu:") for w in warned) and any(w.startswith("layout:") for w in warned)
    r = run_cli("submit", "--profile", "a100x128", "--zero-stage", "3", "--tp", "1", "--dry-run")
    dry_run_exit(r)
    assert r.stdout.count("warning: mfu:") == 1, r.stdout  # printed once, with the checks
    r = run_cli("submit", "--profile", "a100x64", "--dry-run", "--json")  # memory said once, by preflight or the plan
    dry_run_exit(r)
    assert sum("GiB per GPU" in w for w in json.loads(r.stdout)["checks"]["warnings"]) == 1
