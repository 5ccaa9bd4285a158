"""Batch planner, ZeRO memory model and plans for the seed setups (clusterctl.planning / memory)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterctl.planning import memory
from clusterctl.planning.plan import make_plan, plan_for_run, require_fit
from clusterctl.planning.profiles import load_profile
from tests.conftest import dry_run_exit, run_cli
from vltrain.batching import split_batch
from vltrain.common.errors import UserError
from vltrain.config import TrainConfig
from vltrain.model_math import largest_layer_params, param_count
from vltrain.presets import get_preset


# --- the seeds' plans ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "profile, model, gb, kw, micro, accum",
    [
        ("a100x32", "base", 2048, {"accumulation": 8}, 8, 8),  # seed 000
        ("a100x128", "vl-30b", 2048, {"accumulation": 8, "zero_stage": 3}, 2, 8),  # seed 001 (FSDP ~ ZeRO-3)
        ("h100x128", "vl-22b", 2048, {"accumulation": 16, "activation_checkpointing": True}, 1, 16),  # seed 003
    ],
)
def test_seed_plans_with_fixed_accumulation(profile, model, gb, kw, micro, accum):
    p = make_plan(load_profile(profile), get_preset(model), gb, **kw)
    assert (p.split.micro_batch, p.split.accumulation) == (micro, accum)
    assert p.memory.fits, p.memory


def test_seed_004_is_eight_samples_per_gpu():
    p = make_plan(load_profile("a100x256"), get_preset("vl-seed004"), 2048, activation_checkpointing=True)
    assert p.split.per_rank == 8 and p.world_size == 256
    assert p.memory.fits


def test_seed_002_is_128_per_gpu_and_accumulates_when_128_does_not_fit():
    prof, model = load_profile("a100x64"), get_preset("crossmodal-xl")
    p = make_plan(prof, model, 8192, zero_stage=2, activation_checkpointing=True)
    assert p.split.per_rank == 128
    assert p.split.micro_batch * p.split.accumulation * p.split.data_parallel == 8192
    # 128 samples at once would not fit, so the planner accumulates and the chosen micro batch fits
    whole = memory.breakdown(
        p.params, p.memory.activations_per_sample_gib * memory.GIB, 128, zero_stage=2, data_parallel=64, capacity_gib=80
    )
    assert not whole.fits
    assert p.split.accumulation > 1 and p.memory.fits
    # and it is the largest micro batch dividing 128 that fits (fewest accumulation steps)
    assert p.split.micro_batch <= p.max_micro_batch < 2 * p.split.micro_batch or p.split.micro_batch == 128


def test_tp_pp_shrink_the_data_parallel_degree():
    kw = dict(accumulation=16, zero_stage=2, strategy="fsdp")
    p = make_plan(load_profile("h100x128"), get_preset("vl-22b"), 2048, tp=4, pp=2, **kw)
    assert p.split.data_parallel == 16 and p.split.micro_batch == 8
    p1 = make_plan(load_profile("h100x128"), get_preset("vl-22b"), 2048, **kw)
    assert p.memory.params_gib < p1.memory.params_gib


# --- bad requests ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ("a100x32", "base", 2047, {}),
            "global_batch: 2047 is not divisible by the 32 data-parallel ranks; allowed: a multiple of 32, e.g. 1984, 2016, 2048, 2080 (with 2048: micro batch 1, 2, 4, 8, 16, 32, 64 per GPU)",
        ),
        (
            ("a100x64", "crossmodal-xl", 8192, {"tp": 3, "strategy": "fsdp"}),
            "parallel.tp: 3 does not divide model.vision_heads 32 (each tensor-parallel rank computes whole heads); "
            "allowed: 1, 2, 4, 8",
        ),
        (
            ("a100x64", "base", 8192, {"tp": 3, "strategy": "fsdp"}),
            "parallel.tp: 3 does not divide the world size 64; allowed: 1, 2, 4",
        ),
        (
            ("a100x64", "crossmodal-xl", 8192, {"tp": 4, "pp": 32, "strategy": "fsdp"}),
            "parallel.pp: 32 does not divide the 16 ranks left by parallel.tp 4 (world 64); allowed: 1, 2, 4, 8, 16",
        ),
        (
            ("a100x64", "crossmodal-xl", 8192, {"tp": 2}),
            'parallel.tp: 2 needs parallel.strategy = "fsdp" (DeepSpeed runs ZeRO data parallel only here); '
            "allowed: 1, or --set parallel.strategy=fsdp",
        ),
        (
            ("a100x64", "crossmodal-xl", 8192, {"micro_batch": 128, "activation_checkpointing": True}),
            "micro_batch: 128 does not fit in GPU memory (at most 6 per GPU); allowed: 1, 2, 4",
        ),
        (
            ("a100x32", "base", 2048, {"accumulation": 3}),
            "accumulation: 3 does not divide the 64 samples per rank (global batch 2048 / 32 ranks); allowed: 1, 2, 4, 8, 16, 32, 64",
        ),
        (
            ("a100x32", "base", 2048, {"micro_batch": 8, "accumulation": 4}),
            "micro_batch 8 x accumulation 4 x 32 ranks = 1024, not the global batch 2048; allowed: micro x accum = 64 per rank",
        ),
        (("a100x32", "base", 2048, {"zero_stage": 4}), "zero_stage: 4 is not valid; allowed: 0, 1, 2, 3"),
    ],
)
def test_impossible_requests_are_one_line_errors_naming_the_fields(args, expected):
    profile, model, gb, kw = args
    with pytest.raises(UserError) as e:
        make_plan(load_profile(profile), get_preset(model), gb, **kw)
    assert str(e.value) == expected
    assert "\n" not in str(e.value)


def test_a_plan_that_cannot_fit_reports_it_and_submit_refuses_it():
    p = make_plan(load_profile("a100x32"), get_preset("vl-30b"), 2048, zero_stage=0)
    assert p.max_micro_batch == 0 and not p.memory.fits and p.memory.total_gib > 80
    with pytest.raises(UserError, match="needs .* GiB per GPU"):
        require_fit(p)


def test_plan_for_run_fills_in_micro_batch_and_accumulation():
    cfg = TrainConfig(model="tiny", global_batch=32, accumulation=4)
    plan, filled = plan_for_run(load_profile("local"), cfg)
    assert (filled.micro_batch, filled.accumulation) == (8, 4) == (plan.split.micro_batch, plan.split.accumulation)
    assert filled.config_hash() == cfg.config_hash()  # the batch split is not part of what resume checks


# --- properties ------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(dp=st.integers(1, 512), per_rank=st.integers(1, 512), limit=st.one_of(st.none(), st.integers(1, 600)))
def test_every_split_multiplies_out_and_respects_the_memory_limit(dp, per_rank, limit):
    s = split_batch(dp * per_rank, dp, max_micro_batch=limit)
    assert s.micro_batch * s.accumulation * s.data_parallel == dp * per_rank
    if limit is not None:
        assert s.micro_batch <= limit
        # nothing larger would also do: it is the largest divisor under the limit
        assert not any(per_rank % m == 0 for m in range(s.micro_batch + 1, min(limit, per_rank) + 1))


@settings(max_examples=120, deadline=None)
@given(
    profile=st.sampled_from(["a100x32", "a100x64", "a100x128", "h100x128", "a100x256"]),
    model=st.sampled_from(["base", "small", "crossmodal-xl", "vl-30b", "vl-22b", "vl-seed004"]),
    per_gpu=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]),
    stage=st.integers(0, 3),
    ckpt=st.booleans(),
)
def test_a_plan_that_says_it_fits_never_exceeds_capacity(profile, model, per_gpu, stage, ckpt):
    prof = load_profile(profile)
    p = make_plan(prof, get_preset(model), per_gpu * prof.world_size, zero_stage=stage, activation_checkpointing=ckpt)
    s = p.split
    assert s.micro_batch * s.accumulation * s.data_parallel == s.global_batch
    m = p.memory
    parts = (
        m.params_gib
        + m.grads_gib
        + m.grad_accum_gib
        + m.optimizer_gib
        + m.activations_gib
        + m.buffers_gib
        + m.comm_buffers_gib
        + m.fragmentation_gib
    )
    assert m.total_gib == pytest.approx(parts)
    if m.fits:
        assert m.total_gib <= prof.gpu.capacity_gib < prof.gpu.memory_gib
        assert s.micro_batch <= p.max_micro_batch
    else:
        assert p.max_micro_batch == 0


# --- the memory model against DeepSpeed's own estimators ---------------------------------------------
@pytest.mark.parametrize("model", ["base", "vl-22b", "crossmodal-xl"])
@pytest.mark.parametrize("nodes, per_node", [(1, 8), (8, 8), (16, 8)])
def test_model_states_against_deepspeed_estimators(model, nodes, per_node):
    """Our terms vs DeepSpeed's estimators (plain arithmetic, no GPU needed).

    ZeRO-2: DeepSpeed counts 2*Psi + 18*Psi/N (18 = 2 bf16 grads + 4 fp32 grads + 4 fp32 params + 8
    Adam moments); ours is the paper's 2*Psi + (2+12)*Psi/N plus the fp32 gradient partition the
    trainer accumulates in (4*Psi/N): equal, exactly.
    ZeRO-3: DeepSpeed counts 4*largest_layer + 18*Psi/N; ours is (2+2+12+4)*Psi/N: DeepSpeed has no
    bf16 gradient partition (2*Psi/N) and gathers the largest layer whole (bf16 param + grad, 4 bytes
    per parameter). The difference is exact, so we check it exactly.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = get_preset(model)
    psi, n = param_count(cfg), nodes * per_node
    ours2 = memory.model_state_bytes(psi, 2, n)
    _, ds2 = estimate_zero2_model_states_mem_needs(psi, per_node, nodes, cpu_offload=False)
    assert ours2.total == pytest.approx(ds2, abs=2)
    ours3 = memory.model_state_bytes(psi, 3, n)
    largest = largest_layer_params(cfg)
    _, ds3, *_ = estimate_zero3_model_states_mem_needs(
        psi, largest, per_node, nodes, cpu_offload=False, cpu_offload_params=False
    )
    assert ours3.total - 2 * psi / n + 4 * largest == pytest.approx(ds3, abs=2)


def test_each_stage_shards_what_the_paper_says():
    psi, n = 10**9, 8
    s0, s1, s2, s3 = (memory.model_state_bytes(psi, z, n) for z in range(4))
    assert (s0.params, s0.grads, s0.optimizer) == (2 * psi, 2 * psi, 12 * psi)
    assert (s1.params, s1.grads, s1.optimizer) == (2 * psi, 2 * psi, 12 * psi / n)
    assert (s2.params, s2.grads, s2.optimizer) == (2 * psi, 2 * psi / n, 12 * psi / n)
    assert (s3.params, s3.grads, s3.optimizer) == (2 * psi / n, 2 * psi / n, 12 * psi / n)
    # the fp32 accumulation buffer: none at stage 0 (DeepSpeed accumulates in bf16 there), whole at 1
    assert (s0.grad_accum, s1.grad_accum, s2.grad_accum, s3.grad_accum) == (0, 4 * psi, 4 * psi / n, 4 * psi / n)


def test_activation_checkpointing_lets_bigger_micro_batches_fit():
    prof, model = load_profile("a100x64"), get_preset("crossmodal-xl")
    off = make_plan(prof, model, 8192, activation_checkpointing=False)
    on = make_plan(prof, model, 8192, activation_checkpointing=True)
    assert on.memory.activations_per_sample_gib < off.memory.activations_per_sample_gib / 5
    assert on.max_micro_batch > off.max_micro_batch
    assert on.flops_per_sample == pytest.approx(off.flops_per_sample * 4 / 3)


# --- CLI -------------------------------------------------------------------------------------------
def test_cli_plan_json_keys_and_seed_000():
    r = run_cli("plan", "--profile", "a100x32", "--model", "base", "--global-batch", "2048", "--accum", "8", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for k in ("world_size", "data_parallel", "micro_batch", "accumulation", "global_batch", "params", "memory"):
        assert k in d
    for k in ("params_gib", "grads_gib", "optimizer_gib", "activations_gib", "total_gib", "capacity_gib", "fits"):
        assert k in d["memory"]
    assert (d["world_size"], d["data_parallel"], d["micro_batch"], d["accumulation"]) == (32, 32, 8, 8)


def test_cli_plan_prints_breakdown_and_verdict():
    r = run_cli(
        "plan",
        "--profile",
        "a100x64",
        "--model",
        "crossmodal-xl",
        "--global-batch",
        "8192",
        "--zero-stage",
        "2",
        "--activation-checkpointing",
    )
    assert r.returncode == 0, r.stderr
    for text in ("bf16 parameters", "fp32 master + Adam m, v", "activations", "total", "fits", "accumulation"):
        assert text in r.stdout


def test_cli_plan_bad_input_is_one_line_exit_2():
    r = run_cli("plan", "--profile", "a100x32", "--model", "base", "--global-batch", "2047")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --global-batch: 2047")
    r = run_cli("plan", "--profile", "a100x32", "--model", "nope", "--global-batch", "2048")
    assert r.returncode == 2 and "'nope'" in r.stderr and "crossmodal-xl" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            (
                "plan",
                "--profile",
                "a100x32",
                "--model",
                "base",
                "--global-batch",
                "2048",
                "--micro-batch",
                "8",
                "--accum",
                "4",
            ),
            "error: --micro-batch 8 x --accum 4 x 32 ranks = 1024, not the global batch 2048",
        ),
        (
            (
                "plan",
                "--profile",
                "a100x64",
                "--model",
                "base",
                "--global-batch",
                "8192",
                "--tp",
                "3",
                "--set",
                "parallel.strategy=fsdp",
            ),
            "error: --tp: 3 does not divide the world size 64",
        ),
        # submit took global_batch as a flag: the flag is named; accumulation came from --set: the field is
        (
            ("submit", "--profile", "a100x64", "--model", "base", "--global-batch", "100", "--dry-run"),
            "error: --global-batch: 100 is not divisible by the 64 data-parallel ranks",
        ),
        (
            (
                "submit",
                "--profile",
                "a100x64",
                "--model",
                "base",
                "--global-batch",
                "8192",
                "--set",
                "accumulation=3",
                "--dry-run",
            ),
            "error: accumulation: 3 does not divide the 128 samples per rank",
        ),
    ],
)
def test_cli_names_the_flags_it_took_and_the_fields_it_did_not(args, expected):
    """Planning errors name config fields; a command renames those it took as flags (cli.options)."""
    r = run_cli(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(expected), r.stderr


def test_cli_plan_that_does_not_fit_exits_1_with_the_breakdown():
    r = run_cli(
        "plan", "--profile", "a100x32", "--model", "vl-30b", "--global-batch", "2048", "--zero-stage", "0", "--json"
    )
    assert r.returncode == 1
    assert json.loads(r.stdout)["memory"]["fits"] is False


# --- tensor x pipeline parallel layouts (vltrain.parallel.layout), through the real CLI ----------------------
LAYOUT_ERRORS = [
    (("--profile", "h100x128", "--tp", "3"), "error: --tp: 3 does not divide model.vision_heads 32"),
    # a 12-block model: 9 vision + 1 text + 1 fusion + 1 decoder blocks
    (
        ("--profile", "h100x128", "--model", "tiny", "--set", "model.vision_layers=9", "--pp", "64"),
        "error: --pp: 64 stages is more than the model's 12 pipeline blocks",
    ),
    (("--profile", "a100x128", "--tp", "16"), "error: --tp: 16 does not divide a node's 8 GPUs"),
    (("--profile", "a100x64", "--tp", "2"), 'error: --tp: 2 needs parallel.strategy = "fsdp"'),
    (("--profile", "h100x128", "--set", "parallel.tp=3"), "error: parallel.tp: 3 does not divide model.vision_heads"),
    (("--profile", "h100x128", "--accum", "1"), "error: --accum: 1 microbatch is fewer than the --pp 2"[:40]),
    (("--profile", "h100x128", "--zero-stage", "1"), "error: --zero-stage: 1 is not an FSDP layout"),
]


@pytest.mark.parametrize("command", ["plan", "submit"])
@pytest.mark.parametrize("args, expected", LAYOUT_ERRORS)
def test_layouts_the_model_cannot_take_are_one_line_exit_2(command, args, expected, tmp_path):
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
    r = run_cli(command, *args, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(expected), r.stderr
    assert "allowed:" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_seed_003_layout_in_submit_dry_run_json(tmp_path):
    """The issue's check: `submit --dry-run --json` shows the layout for seed 003 on h100x128 (whatever
    strategy the recipe says, fsdp is what takes tp x pp)."""
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
    r = run_cli("submit", "--profile", "h100x128", "--set", "parallel.strategy=fsdp", "--dry-run", "--json", env=env)
    dry_run_exit(r)
    d = json.loads(r.stdout)
    p, c = d["plan"], d["config"]["parallel"]
    assert (p["tensor_parallel"], p["pipeline_parallel"], p["data_parallel"]) == (c["tp"], c["pp"], 32) == (2, 2, 32)
    assert p["world_size"] == p["tensor_parallel"] * p["pipeline_parallel"] * p["data_parallel"]
    assert (c["strategy"], p["strategy"], c["pp_schedule"], p["pp_schedule"]) == ("fsdp", "fsdp", "1f1b", "1f1b")
    assert p["accumulation"] >= p["pipeline_parallel"]  # torch's Schedule1F1B: a microbatch per stage at least
    par = p["parallel"]
    assert par["bubble_fraction"] == pytest.approx(1 / (p["accumulation"] + 1), abs=1e-4)
    assert p["step_time"]["total_s"] == pytest.approx(
        p["step_time"]["compute_s"] + p["step_time"]["exposed_communication_s"] + par["total_s"], abs=1e-3
    )
    assert not [x for x in d["checks"]["problems"] if x.startswith(("parallel", "zero_stage", "precision"))]
    r = run_cli("plan", "--profile", "h100x128", "--set", "parallel.strategy=fsdp", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["parallel"] == par


def test_fsdp_plan_against_an_independent_count_of_the_most_loaded_gpu():
    """Seed 003's plan, its memory redone from the model's own parameters on the meta device
    (tests/test_layout.py's count): gathered bf16 share + fp32 no-sync gradients + fp32 shards of
    weights, gradients and Adam m, v over dp, then activations, context and fragmentation."""
    from tests.test_layout import _meta_counts

    p = make_plan(
        load_profile("h100x128"),
        get_preset("vl-22b"),
        2048,
        accumulation=16,
        zero_stage=2,
        activation_checkpointing=True,
        tp=4,
        pp=2,
        strategy="fsdp",
    )
    rank = p.parallel.most_loaded_rank
    L = _meta_counts("vl-22b", 4, 2, "1f1b")[rank]
    states = (2 + 4 + (4 + 12) / 16) * L
    m = p.memory
    assert (m.params_gib + m.grads_gib + m.grad_accum_gib + m.optimizer_gib) * memory.GIB == pytest.approx(states)
    assert m.fits and m.total_gib < 80
    assert m.total_gib == pytest.approx(1.1 * (states / memory.GIB + m.activations_gib) + 1.5)
