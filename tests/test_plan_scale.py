"""The planner at 64-256 GPUs: host memory per node, communication per step, other layouts, checkpoint time.

Each figure is checked against an independent source: DeepSpeed's own estimators called directly, ring
volumes worked out by hand, or the arithmetic of the docstrings redone here.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path

import pytest

from clusterctl.planning import comm, host_memory, memory
from clusterctl.planning.checkpoint import CHECKPOINT_MARGIN, checkpoint_bytes
from clusterctl.planning.memory import GIB
from clusterctl.planning.plan import DEFAULT_MFU, make_plan, plan_for_run
from clusterctl.planning.profiles import builtin_dir, load_profile, parse_profile
from clusterctl.runs import preflight
from clusterctl.runs.submit import run_estimate
from tests.conftest import dry_run_exit, run_cli
from vltrain.config import ParallelConfig, TrainConfig
from vltrain.model_math import param_count
from vltrain.presets import get_preset
from vltrain.support import not_run_yet


def _profile(name: str, **changes: dict) -> object:
    """A shipped profile with some tables changed (table -> {key: value}; None deletes the key)."""
    data = tomllib.loads((builtin_dir() / f"{name}.toml").read_text())
    for table, values in changes.items():
        t = data.setdefault(table, {})
        for k, v in values.items():
            if v is None:
                t.pop(k, None)
            else:
                t[k] = v
    return parse_profile(data, f"{name} (changed)")


def _write_profile(tmp_path: Path, base: str, name: str, **changes: dict) -> Path:
    import tomli_w

    data = tomllib.loads((builtin_dir() / f"{base}.toml").read_text())
    data["name"] = name
    for table, values in changes.items():
        data.setdefault(table, {}).update(values)
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def _seed002():
    """Seed 002 as its recipe plans it: crossmodal-xl, global batch 8192, ZeRO-2, activation checkpointing."""
    return load_profile("a100x64"), get_preset("crossmodal-xl")


# --- A. host memory per node -------------------------------------------------------------------------
def _deepspeed_estimators():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


@pytest.mark.parametrize(
    "profile, model, kw",
    [
        ("a100x64", "crossmodal-xl", {"zero_stage": 2, "activation_checkpointing": True}),  # seed 002
        ("a100x128", "vl-30b", {"zero_stage": 3, "accumulation": 8}),  # seed 001
    ],
)
def test_host_memory_per_node_by_hand(profile, model, kw):
    """Steady, per rank: the process, its data-loader workers (128 CPUs / 8 GPUs = 16 per task: 8), its
    shards' index (one pass of the default 1000 steps) and the optimizer shard a resume loads (12
    bytes/param / N); per node, once, the 16-bit weights of the checkpoint under ZeRO-2 (mapped by every
    rank on resume). Start-up: the processes alone, the parameter groups flattening on the GPU
    (tests/test_host_memory.py has the start-up's other paths)."""
    from vltrain.data.index_math import index_host_bytes

    prof, cfg = load_profile(profile), get_preset(model)
    psi, g = param_count(cfg), prof.nodes.gpus_per_node
    gb = 8192 if model == "crossmodal-xl" else 2048
    p = make_plan(prof, cfg, gb, **kw)
    h = p.host
    shard = 12 * psi / prof.world_size
    shared = 2 * psi if kw["zero_stage"] == 2 else 0
    allowance = (host_memory.PROCESS_HOST_GIB + 8 * host_memory.WORKER_HOST_GIB) * GIB
    index = index_host_bytes(TrainConfig().steps * gb, prof.world_size)
    assert h.loader_workers == 8
    assert h.per_node_gib * GIB == pytest.approx(g * (allowance + index + shard) + shared, rel=1e-9)
    assert h.startup_per_node_gib == pytest.approx(g * host_memory.PROCESS_HOST_GIB) and h.deepspeed_staged_gib == 0
    assert h.capacity_gib == prof.nodes.memory_gib == 1000 and h.fits
    d = p.to_dict()["host_memory"]
    assert {"per_node_gib", "startup_per_node_gib", "capacity_gib", "fits"} <= d.keys() and d["fits"] is True


def test_building_on_the_cpu_would_not_fit_seed_002():
    """Why the trainer builds on the GPU: 8 ranks x 30.5B fp32 x 1.5 is more than a 1000 GiB node."""
    est2, _ = _deepspeed_estimators()
    prof, cfg = _seed002()
    cpu_build, _ = est2(param_count(cfg), 8, 8, cpu_offload=False)
    assert cpu_build / GIB > prof.nodes.memory_gib
    p = make_plan(prof, cfg, 8192, activation_checkpointing=True)
    assert p.host.fits and p.host.per_node_gib < prof.nodes.memory_gib


def test_host_memory_that_does_not_fit_is_a_problem_naming_the_figures():
    prof = _profile("a100x64", nodes={"memory_gib": 128})
    p = make_plan(prof, get_preset("crossmodal-xl"), 8192, activation_checkpointing=True)
    assert not p.host.fits and p.host.per_node_gib > 128
    (line,) = preflight.host_memory(p.to_dict())
    assert line.startswith(f"nodes.memory_gib: crossmodal-xl needs {p.host.per_node_gib:.0f} GiB of host memory")
    assert "a node has 128 GiB; allowed:" in line and "data.workers" in line and "\n" not in line


def test_submit_refuses_a_plan_whose_host_memory_does_not_fit(tmp_path):
    path = _write_profile(tmp_path, "a100x64", "smallmem", nodes={"memory_gib": 128})
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "000000.tar").write_bytes(b"")  # readable: the data check passes, host memory is the problem
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
    args = ("submit", "--profile", str(path), "--set", f"data.shards={shards}")
    r = run_cli(*args, env=env)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if not x.startswith("warning: ")]  # warnings come first
    assert len(errors) == 1 and errors[0].startswith("error: nodes.memory_gib: crossmodal-xl needs "), r.stderr
    assert "GiB of host memory per node" in errors[0] and "a node has 128 GiB" in errors[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    r = run_cli(*args, "--dry-run", "--json", env=env)
    dry_run_exit(r)
    d = json.loads(r.stdout)
    assert d["plan"]["host_memory"]["fits"] is False
    assert [p for p in d["checks"]["problems"] if p.startswith("nodes.memory_gib:")]


def test_cpu_profiles_count_the_model_in_host_memory():
    for name in ("local", "slurm-local"):
        prof = load_profile(name)
        p, _ = plan_for_run(prof, TrainConfig(model="tiny", global_batch=32))
        assert p.host.fits, (name, p.host)  # the shipped CPU profiles keep running
        assert p.host.model_on_host_gib > 0 and p.host.loader_workers == 0 and p.host.deepspeed_staged_gib == 0


# --- B. communication ---------------------------------------------------------------------------------
ONE_NODE_A100 = comm.Fabric(300.0, 200.0, "test", "test", nodes=1, gpus_per_node=8)


def test_ring_volumes_by_hand():
    """1e9 parameters on 8 GPUs of one A100 node (bus 0.75 x 300 = 225 GB/s), bf16 on the wire, 4 micro steps."""
    psi, n, acc = 1e9, 8, 4
    ds = comm.DeepSpeedComm(overlap_comm=False, grad_bytes=2, param_bytes=2, reduce_bucket_elements=5e8)
    assert ONE_NODE_A100.bus_gb_s() == pytest.approx(225.0)
    s, g = 2e9, 2e9  # bytes of 16-bit weights, of 16-bit gradients
    expected = {
        0: 2 * 7 / 8 * g,  # one all-reduce per step
        1: 2 * 7 / 8 * g + 7 / 8 * s,  # all-reduce at the boundary + weights all-gather
        2: acc * 2 * 7 / 8 * g + 7 / 8 * s,  # bucket all-reduce every micro step + weights all-gather
        3: acc * (7 / 8 * s + 7 / 8 * s + 7 / 8 * g),  # gather forward, gather backward, reduce-scatter
    }
    for stage, volume in expected.items():
        c = comm.step_comm(psi, stage, n, acc, 1.0, ONE_NODE_A100, ds)
        assert c.bytes_per_gpu == pytest.approx(volume), stage
        assert c.communication_s == pytest.approx(volume / 225e9), stage
        assert c.exposed_s == pytest.approx(c.communication_s), stage  # overlap_comm off: nothing hides
    # with overlap (ZeRO-2): each micro step's all-reduce hides behind 80% of its backward (2/3 of 0.25 s)
    # except its last bucket (5e8 of 1e9 gradients); the weights' all-gather after the step never hides
    on = comm.DeepSpeedComm(overlap_comm=True, grad_bytes=2, param_bytes=2, reduce_bucket_elements=5e8)
    c = comm.step_comm(psi, 2, n, acc, 1.0, ONE_NODE_A100, on)
    per_micro = 2 * 7 / 8 * g / 225e9
    assert c.exposed_s == pytest.approx(acc * per_micro * 0.5 + 7 / 8 * s / 225e9)
    assert comm.ring_factor("all_reduce", 1) == 0.0 and comm.ring_factor("all_gather", 2) == 0.5


def test_fp32_reduction_doubles_the_gradient_traffic():
    ds16 = comm.DeepSpeedComm(grad_bytes=2)
    ds32 = comm.DeepSpeedComm(grad_bytes=4)
    a = comm.step_comm(1e9, 2, 8, 1, 1.0, ONE_NODE_A100, ds16)
    b = comm.step_comm(1e9, 2, 8, 1, 1.0, ONE_NODE_A100, ds32)
    assert b.bytes_per_gpu - a.bytes_per_gpu == pytest.approx(2 * 7 / 8 * 2e9)
    cfg = comm.from_deepspeed_config({"bf16": {"enabled": True}, "communication_data_type": "fp32"})
    assert (cfg.grad_bytes, cfg.param_bytes) == (4, 2)
    assert comm.from_deepspeed_config({"bf16": {"enabled": True}}).grad_bytes == 2  # DeepSpeed's default: bf16
    assert comm.from_deepspeed_config({"bf16": {"enabled": False}}).grad_bytes == 4


def test_zero2_communication_grows_with_accumulation_and_zero1_does_not():
    prof, cfg = _seed002()
    z2 = [
        make_plan(prof, cfg, 8192, micro_batch=m, activation_checkpointing=True, zero_stage=2).comm
        for m in (4, 2, 1)  # accumulation 32, 64, 128
    ]
    assert [c.accumulation for c in z2] == [32, 64, 128]
    assert z2[0].communication_s < z2[1].communication_s < z2[2].communication_s
    gather = 63 / 64 * 2 * param_count(cfg) / (z2[0].bus_gb_s * 1e9)  # once per step whatever the accumulation
    assert (z2[1].communication_s - gather) == pytest.approx(2 * (z2[0].communication_s - gather))
    vl = get_preset("vl-seed000")
    z1 = [make_plan(prof, vl, 8192, accumulation=a, zero_stage=1).comm.communication_s for a in (1, 2, 4)]
    assert z1[0] == pytest.approx(z1[1]) == pytest.approx(z1[2])


def test_ethernet_is_slower_than_infiniband():
    prof, cfg = _seed002()
    eth = _profile("a100x64", interconnect={"inter_node": "ethernet", "ib_hcas": None})
    ib = make_plan(prof, cfg, 8192, activation_checkpointing=True)
    et = make_plan(eth, cfg, 8192, activation_checkpointing=True)
    assert et.fabric.inter_node_gb_s == comm.ETHERNET_NODE_GB_S < ib.fabric.inter_node_gb_s
    assert et.comm.communication_s > 10 * ib.comm.communication_s
    assert et.total_step_s() > ib.total_step_s() and et.mfu_expected() < ib.mfu_expected()
    assert et.step_time_s() == ib.step_time_s()  # compute does not depend on the fabric


def test_fabric_defaults_and_overrides():
    a100, h100 = load_profile("a100x64"), load_profile("h100x128")
    fa, fh = comm.fabric(a100), comm.fabric(h100)
    assert (fa.intra_node_gb_s, fa.inter_node_gb_s) == (300.0, 200.0)  # NVLink3 600 bidir; 8 x HDR 200 Gb/s
    assert (fh.intra_node_gb_s, fh.inter_node_gb_s) == (450.0, 400.0)  # NVLink4 900 bidir; 8 x NDR 400 Gb/s
    assert fa.bus_gb_s() == pytest.approx(comm.NCCL_EFFICIENCY * 200)  # the NICs are the slower link
    own = comm.fabric(_profile("a100x64", interconnect={"inter_node_gb_s": 50.0, "intra_node_gb_s": 250.0}))
    assert (own.intra_node_gb_s, own.inter_node_gb_s, own.inter_source) == (250.0, 50.0, "profile")
    pcie = comm.fabric(_profile("a100x64", interconnect={"intra_node": "pcie"}))
    assert pcie.intra_node_gb_s == 32.0
    assert [comm.generation(m) for m in ("A100-SXM4-80GB", "H100-SXM5-80GB", "NVIDIA H200", "B200", "V100")] == [
        "ampere",
        "hopper",
        "hopper",
        "blackwell",
        "volta",
    ]


def test_cli_plan_json_step_time_and_the_new_keys():
    """`clusterctl plan --profile a100x64 --json` plans the profile's recipe (configs/seed-002.toml)."""
    r = run_cli("plan", "--profile", "a100x64", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["model"], d["global_batch"], d["zero_stage"]) == ("crossmodal-xl", 8192, 2)
    for k in ("step_time_s", "mfu_assumed", "memory", "micro_batch", "accumulation"):  # kept for scripts
        assert k in d
    t = d["step_time"]
    assert set(t) == {"compute_s", "communication_s", "exposed_communication_s", "parallel_s", "total_s"}
    assert t["compute_s"] == d["step_time_s"]
    assert t["parallel_s"] == 0 and d["parallel"] is None  # DeepSpeed data parallel: no tp x pp
    assert t["total_s"] == pytest.approx(t["compute_s"] + t["exposed_communication_s"], abs=2e-4)
    assert 0 <= t["exposed_communication_s"] <= t["communication_s"]
    assert d["mfu_expected"] == pytest.approx(d["mfu_assumed"] * t["compute_s"] / t["total_s"], abs=1e-4)
    assert set(d["host_memory"]) >= {"per_node_gib", "capacity_gib", "fits"}
    assert set(d["checkpoint"]) >= {"bytes", "write_s", "needed_signal_delay_s", "signal_delay_s", "ok"}
    for a in d["alternatives"]:
        assert set(a) >= {"zero_stage", "micro_batch", "accumulation", "total_s", "speedup"}
    assert "faster_layout" in d


# --- B. other layouts -----------------------------------------------------------------------------------
def test_alternatives_fit_and_compare_at_the_same_global_batch():
    prof, cfg = _seed002()
    p = make_plan(prof, cfg, 8192, activation_checkpointing=True)
    stages = {a.zero_stage for a in p.alternatives}
    assert 3 in stages and not {0, 1} & stages  # crossmodal-xl does not fit in 80 GB under ZeRO 0-1
    z3 = next(a for a in p.alternatives if a.zero_stage == 3)
    assert (z3.micro_batch, z3.accumulation) == (128, 1)  # fully sharded: the whole 128 per GPU at once
    for a in p.alternatives:
        assert a.micro_batch * a.accumulation * 64 == 8192
        m = memory.breakdown(
            p.params,
            p.memory.activations_per_sample_gib * GIB,
            a.micro_batch,
            zero_stage=a.zero_stage,
            data_parallel=64,
            capacity_gib=80,
        )
        assert m.fits
        assert a.speedup == pytest.approx(p.total_step_s() / a.total_s)
        assert a.total_s == pytest.approx(a.compute_s + a.exposed_communication_s)


def test_zero3_without_accumulation_is_faster_for_seed_002_over_ethernet():
    """ZeRO-2 with 8 micro steps reduces 30.5B gradients 8 times per step; ZeRO-3 without accumulation
    moves weights twice and gradients once, and hides it behind a whole step of compute."""
    eth = _profile("a100x64", interconnect={"inter_node": "ethernet", "ib_hcas": None})
    p = make_plan(eth, get_preset("crossmodal-xl"), 8192, activation_checkpointing=True)
    f = p.faster_layout()
    assert f is not None and (f.zero_stage, f.micro_batch, f.accumulation) == (3, 128, 1)
    assert f.speedup > 2
    assert p.to_dict()["faster_layout"]["zero_stage"] == 3


def test_seed_001_faster_layout_in_json_and_human_output():
    """Seed 001 as FSDP zero_stage 3, accumulation 8 on 128 GPUs without tp gathers 30.5B weights twice per
    microbatch; zero_stage 2 would keep the whole model's unsharded fp32 gradients while it accumulates
    (114 GiB), so it is not offered: the faster layout is zero_stage 3 without accumulation, memory shown."""
    flags = ("--profile", "a100x128", "--zero-stage", "3", "--tp", "1")
    r = run_cli("plan", *flags, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    f = d["faster_layout"]
    assert (d["strategy"], d["zero_stage"], d["accumulation"]) == ("fsdp", 3, 8)
    assert (f["zero_stage"], f["accumulation"]) == (3, 1) and f["speedup"] > 2 and f["trainer_runs"] is True
    assert all(a["memory_gib"] <= d["memory"]["capacity_gib"] for a in d["alternatives"])
    assert not any(a["zero_stage"] == 2 and a["sharding"] == "full" for a in d["alternatives"])
    assert d["memory"]["params_gib"] < 5  # zero_stage 3: two units gathered, not the model
    r = run_cli("plan", *flags)
    assert r.returncode == 0, r.stderr
    unfolded = r.stdout.replace("\n  ", " ")  # long lines fold to COLUMNS, the next ones indented
    line = next(x for x in unfolded.splitlines() if x.startswith("faster_layout:"))
    assert "FSDP zero_stage 3" in line and f"--accum {f['accumulation']}" in line and "GiB per GPU" in line
    refused = not_run_yet(TrainConfig(zero_stage=3))  # ZeRO-3 under DeepSpeed is still refused
    assert refused and not not_run_yet(TrainConfig(zero_stage=3, parallel=ParallelConfig(strategy="fsdp")))


def test_no_faster_layout_is_named_within_five_percent():
    p = make_plan(load_profile("a100x256"), get_preset("vl-seed004"), 2048, activation_checkpointing=True)
    for a in p.alternatives:
        if a.speedup < 1.05:
            assert p.faster_layout() is not a


def test_run_estimate_uses_the_expected_mfu():
    prof = load_profile("a100x128")
    p, _ = plan_for_run(prof, TrainConfig(model="vl-30b", global_batch=2048, accumulation=8, zero_stage=3))
    e = run_estimate(prof, p, 1000)
    assert e["hfu"] == pytest.approx(p.mfu_expected(), rel=1e-3) and e["mfu"] < DEFAULT_MFU / 2  # JSON: 4 digits
    assert e["hours"] == pytest.approx(1000 * p.total_step_s() / 3600, rel=1e-4)


# --- C. checkpoint time vs the Slurm signal ------------------------------------------------------------
def test_checkpoint_bytes_by_hand():
    psi = 1e9
    # ZeRO-2: rank 0 writes the 16-bit weights; every rank its shard of fp32 master + Adam m, v
    assert checkpoint_bytes(psi, 2, 64, 8) == pytest.approx((2e9 + 12e9, 2e9 + 8 * 12e9 / 64))
    assert checkpoint_bytes(psi, 1, 64, 8) == checkpoint_bytes(psi, 2, 64, 8)
    assert checkpoint_bytes(psi, 3, 64, 8) == pytest.approx((12e9, 8 * 12e9 / 64))  # weights live in the shards
    assert checkpoint_bytes(psi, 0, 64, 8) == pytest.approx((14e9, 14e9))  # all in rank 0's model-states file


def test_seed_002_checkpoint_time_against_signal_delay():
    prof, cfg = _seed002()
    p = make_plan(prof, cfg, 8192, activation_checkpointing=True)
    k = p.checkpoint
    psi = p.params
    assert k.bytes == pytest.approx(14 * psi)
    assert k.busiest_node_bytes == pytest.approx(2 * psi + 8 * 12 * psi / 64)
    assert k.write_s == pytest.approx(k.busiest_node_bytes / 2e9)  # default 2 GB/s per node
    assert k.step_s == pytest.approx(p.total_step_s())
    assert k.needed_signal_delay_s == math.ceil((k.write_s + k.step_s) * CHECKPOINT_MARGIN / 10) * 10
    assert k.signal_delay_s == 180 and k.ok is (k.needed_signal_delay_s <= 180)
    assert set(p.to_dict()["checkpoint"]) >= {"bytes", "write_s", "needed_signal_delay_s", "signal_delay_s", "ok"}


def test_slow_storage_warns_naming_the_delay_to_use():
    slow = _profile("a100x64", storage={"write_gb_s_per_node": 0.5})
    p = make_plan(slow, get_preset("crossmodal-xl"), 8192, activation_checkpointing=True)
    assert p.checkpoint.ok is False and p.checkpoint.needed_signal_delay_s > 180
    d = p.to_dict()
    (line,) = preflight.checkpoint(d)
    assert line.startswith("slurm.signal_delay_s: 180 s may not leave time to checkpoint")
    assert f"allowed: signal_delay_s = {p.checkpoint.needed_signal_delay_s} in the profile's [slurm] table" in line
    cfg = TrainConfig(model="crossmodal-xl", global_batch=8192, activation_checkpointing=True)
    checks = preflight.check(cfg, d)
    assert line in checks.warnings and line not in checks.problems  # a warning: see preflight.checkpoint
    # beyond what Slurm's signal_delay_s may be, the fix is the filesystem
    crawl = _profile("a100x64", storage={"write_gb_s_per_node": 0.01})
    p = make_plan(crawl, get_preset("crossmodal-xl"), 8192, activation_checkpointing=True)
    (line,) = preflight.checkpoint(p.to_dict())
    assert "a faster checkpoint filesystem: signal_delay_s is at most 3600" in line


def test_aggregate_bandwidth_limits_the_write():
    lim = _profile("a100x64", storage={"write_gb_s_total": 1.0})
    p = make_plan(lim, get_preset("crossmodal-xl"), 8192, activation_checkpointing=True)
    assert p.checkpoint.write_s == pytest.approx(p.checkpoint.bytes / 1e9)


def test_no_slurm_no_signal():
    p, _ = plan_for_run(load_profile("local"), TrainConfig(model="tiny", global_batch=32))
    assert p.checkpoint.signal_delay_s is None and p.checkpoint.ok is None
    assert preflight.checkpoint(p.to_dict()) == []
