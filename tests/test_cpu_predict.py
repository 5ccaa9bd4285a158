"""The [calibration] table and what plan predicts from it on a CPU cluster (issue 29): the parser's
one-line errors, the prediction's terms as the engines hold state, plan --json's key, and (slow) that
vltrain.calibrate.measure_rank returns every figure on one process."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from clusterctl.planning.calibration import Calibration
from clusterctl.planning.cpu_predict import Run, memory_phases, predict
from clusterctl.planning.profiles import parse_profile, read_profile
from tests.conftest import REPO, run_cli
from vltrain import model_math
from vltrain.common.errors import UserError
from vltrain.common.schema import parse_toml
from vltrain.presets import get_preset

TABLE = {
    "measured_at": "2026-12-07T09:12:00Z",
    "slurm_job": "1234",
    "ranks": 2,
    "threads_per_rank": 1,
    "matmul_gflops": {"64": 20.0, "256": 40.0, "1024": 50.0},
    "op_overhead_us": 10.0,
    "memory_gb_s": 5.0,
    "allreduce_gb_s": 1.0,
    "allreduce_latency_us": 100.0,
    "base_rss_mib": 400.0,
    "block_gflops": {"64x64": 5.0, "64x512": 10.0, "512x64": 15.0, "512x512": 25.0},
    "alloc_gb_s": 0.5,
    "fsdp_imports_mib": 40.0,
    "fsdp_unit_us": 3000.0,
    "fsdp_unit_gb_s": 0.8,
    "gather_us": 3000.0,
    "fsdp_adamw_us": 300.0,
    "adamw_ns": 5.0,
    "grad_accumulate_ns": 1.5,
}


def slurm_local(calibration: dict | None = None, name: str = "slurm-local") -> dict:
    data = parse_toml((REPO / "cluster_profiles" / "slurm-local.toml").read_text(), "slurm-local.toml")
    data["name"] = name
    return data | ({"calibration": calibration} if calibration is not None else {})


def calibration(**changes) -> Calibration:
    return parse_profile(slurm_local(TABLE | changes), "p.toml").calibration


def run(model: str = "tiny", strategy: str = "deepspeed", micro: int = 8, acc: int = 1, ranks: int = 2) -> Run:
    cfg = get_preset(model)
    return Run(cfg, micro, acc, ranks, strategy, model_math.param_count(cfg))


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("matmul_gflops", {"abc": 1.0}, "calibration.matmul_gflops: 'abc' is not a matrix size"),
        ("matmul_gflops", {"64": 0.0}, "calibration.matmul_gflops: '64' = 0.0 is not a rate"),
        ("block_gflops", {"64": 1.0}, "calibration.block_gflops: '64' is not a WIDTHxTOKENS pair"),
        ("memory_gb_s", -1, "calibration.memory_gb_s: -1 is out of range"),
        ("measured_at", "yesterday", "calibration.measured_at: 'yesterday' is not valid; allowed: a UTC time"),
        ("slurm_job", "12;rm", "calibration.slurm_job"),
        ("ranks", 0, "calibration.ranks: 0 is out of range"),
        ("bogus", 1, "calibration.bogus: unknown key; allowed: measured_at"),
    ],
)
def test_a_bad_calibration_is_one_line_naming_the_field(field, value, words):
    with pytest.raises(UserError) as e:
        parse_profile(slurm_local(TABLE | {field: value}), "p.toml")
    assert str(e.value).startswith(f"p.toml: {words}")
    assert "\n" not in str(e.value)


def test_a_missing_figure_is_named():
    table = {k: v for k, v in TABLE.items() if k != "allreduce_gb_s"}
    with pytest.raises(UserError, match=r"^p.toml: calibration.allreduce_gb_s: missing"):
        parse_profile(slurm_local(table), "p.toml")


def test_the_table_round_trips_through_to_dict():
    profile = parse_profile(slurm_local(TABLE), "p.toml")
    assert profile.to_dict()["calibration"] == TABLE
    assert parse_profile(slurm_local(), "p.toml").calibration is None  # optional: shipped profiles have none


def test_rates_interpolate_between_measured_sizes():
    cal = calibration()
    assert cal.matmul_rate(128) == pytest.approx(30.0)  # halfway in log N between 64 and 256
    assert cal.matmul_rate(8) == 20.0 and cal.matmul_rate(4096) == 50.0  # the end values past them
    assert cal.block_rate(64, 64) == 5.0 and cal.block_rate(512, 512) == 25.0
    assert 10.0 < cal.block_rate(181, 181) < 20.0
    assert calibration(block_gflops=None).block_rate(64, 64) is None


def test_zero2_and_fsdp_hold_model_states_differently():
    cal = calibration()
    ds = memory_phases(cal, run("small", "deepspeed"))["backward"]
    fsdp = memory_phases(cal, run("small", "fsdp"))["backward"]
    p = model_math.param_count(get_preset("small"))
    assert ds["weights"] == pytest.approx(2 * 4 * p / 2**20)  # the module's and DeepSpeed's flat copy
    assert fsdp["weights"] == pytest.approx((4 * p / 2 + 4 * p) / 2**20)  # the shard + blocks gathered
    assert ds["optimizer"] > fsdp["optimizer"]  # DeepSpeed keeps an fp32 partition besides AdamW's moments
    assert fsdp["imports"] == 40.0 and ds["imports"] == 0.0
    assert ds["activations"] == fsdp["activations"] > 0


def test_accumulation_changes_activations_not_states():
    cal = calibration()
    one = memory_phases(cal, run("tiny", "deepspeed", micro=32, acc=1))["backward"]
    eight = memory_phases(cal, run("tiny", "deepspeed", micro=4, acc=8))["backward"]
    assert one["activations"] == pytest.approx(8 * eight["activations"])
    assert {k: v for k, v in one.items() if k != "activations"} == {
        k: v for k, v in eight.items() if k != "activations"
    }


def test_more_ranks_shard_more():
    cal = calibration()
    two = memory_phases(cal, run("small", "fsdp", ranks=2))["backward"]
    four = memory_phases(cal, run("small", "fsdp", ranks=4))["backward"]
    assert four["optimizer"] == pytest.approx(two["optimizer"] / 2)


def test_calibrated_rates_scale_the_time():
    slow, fast = (
        calibration(),
        calibration(
            matmul_gflops={k: 2 * v for k, v in TABLE["matmul_gflops"].items()},
            block_gflops={k: 2 * v for k, v in TABLE["block_gflops"].items()},
        ),
    )
    r = run("small", "deepspeed")
    a, b = predict(slow, r).step_terms, predict(fast, r).step_terms
    assert b["blocks"] == pytest.approx(a["blocks"] / 2)
    assert b["communication"] == a["communication"]
    wide = predict(calibration(allreduce_gb_s=2.0), r).step_terms
    assert wide["communication"] < a["communication"]


def test_fsdp_gathers_every_micro_step_deepspeed_reduces_once():
    cal = calibration()
    ds1, ds8 = (predict(cal, run("small", "deepspeed", 1, a)).step_terms["communication"] for a in (1, 8))
    fs1, fs8 = (predict(cal, run("small", "fsdp", 1, a)).step_terms["communication"] for a in (1, 8))
    # coalesced: one reduction per optimizer step; only the ITC loss's two gathers come with each micro step
    assert ds8 - ds1 == pytest.approx(7 * 2 * TABLE["gather_us"] * 1e-6)
    assert fs8 > 4 * fs1  # an all-gather of the model per micro step


def test_fsdp_pays_each_units_calibrated_cost_every_micro_step():
    """fsdp_unit_us x units per micro step (in place of the all-reduce latency); DeepSpeed does not pay it."""
    cfg = get_preset("small")
    units = cfg.vision_layers + cfg.text_layers + cfg.fusion_layers + cfg.decoder_layers + 1
    cheap, dear = calibration(fsdp_unit_us=1000.0), calibration(fsdp_unit_us=5000.0)
    for acc in (1, 8):
        a, b = (predict(c, run("small", "fsdp", 1, acc)).step_terms["communication"] for c in (cheap, dear))
        assert b - a == pytest.approx(acc * units * 4000e-6)
    ds = (predict(c, run("small", "deepspeed", 1, 8)).step_terms for c in (cheap, dear))
    assert next(ds) == next(ds)
    old = {k: v for k, v in TABLE.items() if k != "fsdp_unit_us"}  # a table from before the figure: still parses
    assert parse_profile(slurm_local(old), "p.toml").calibration.fsdp_unit_us is None


def test_fsdps_optimizer_pays_the_calibrated_cost_per_dtensor():
    """fsdp_adamw_us per sharded tensor in FSDP's optimizer term, whatever the accumulation; not DeepSpeed's."""
    cheap, dear = calibration(fsdp_adamw_us=100.0), calibration(fsdp_adamw_us=600.0)
    for acc in (1, 8):
        a, b = (predict(c, run("tiny", "fsdp", 4, acc)).step_terms["optimizer"] for c in (cheap, dear))
        assert b > a + 500e-6 * 50  # tiny has more than 50 parameter tensors
        assert b - a == pytest.approx(predict(dear, run("tiny", "fsdp", 4, 1)).step_terms["optimizer"] - a)
    ds = [predict(c, run("tiny", "deepspeed", 4, 8)).step_terms["optimizer"] for c in (cheap, dear)]
    assert ds[0] == ds[1]


def test_adamw_costs_its_calibrated_time_per_parameter_of_the_ranks_shard():
    """adamw_ns per parameter of the rank's share (DeepSpeed's partition, FSDP's shard) in both engines'
    optimizer term, whatever the accumulation; a table from before the figure still parses and prices
    AdamW's reads and writes at the copy bandwidth instead."""
    cheap, dear = calibration(adamw_ns=2.0), calibration(adamw_ns=12.0)
    for strategy in ("deepspeed", "fsdp"):
        for ranks, acc in ((2, 1), (4, 8)):
            r = run("small", strategy, 4, acc, ranks)
            a, b = (predict(c, r).step_terms["optimizer"] for c in (cheap, dear))
            assert b - a == pytest.approx(10e-9 * r.params / ranks)
    old = {k: v for k, v in TABLE.items() if k != "adamw_ns"}
    before = parse_profile(slurm_local(old), "p.toml").calibration
    assert before.adamw_ns is None
    r = run("small", "deepspeed", 4, 1, 2)
    at_copy_rate = 28 * r.params / 2 / (TABLE["memory_gb_s"] * 1e9)
    no_adamw = predict(calibration(adamw_ns=0.001), r).step_terms["optimizer"]
    assert predict(before, r).step_terms["optimizer"] == pytest.approx(no_adamw + at_copy_rate, rel=1e-3)


def test_each_micro_step_after_the_first_sums_its_gradients_at_the_calibrated_cost():
    """grad_accumulate_ns per parameter for every micro step but the first (that one's gradients are
    new: the optimizer term's), in both engines (autograd sums into the full-size param.grad under
    DeepSpeed's stage 1 and FSDP2 with sync off); 0 at accumulation 1 and in a table without the figure."""
    cal = calibration(grad_accumulate_ns=2.0)
    for strategy in ("deepspeed", "fsdp"):
        terms = {a: predict(cal, run("small", strategy, 1, a)).step_terms["accumulation"] for a in (1, 2, 8)}
        params = run("small").params
        assert terms == pytest.approx({1: 0.0, 2: 2e-9 * params, 8: 7 * 2e-9 * params})
    old = {k: v for k, v in TABLE.items() if k != "grad_accumulate_ns"}
    before = parse_profile(slurm_local(old), "p.toml").calibration
    assert predict(before, run("small", "deepspeed", 1, 8)).step_terms["accumulation"] == 0.0


def test_the_prediction_lists_what_it_cannot_predict():
    d = predict(calibration(), run()).to_dict()
    assert d["step_time_s"] == pytest.approx(sum(d["step_terms_s"].values()), rel=1e-3)
    assert d["peak_rss_gib"] * 1024 == pytest.approx(sum(d["memory_terms_mib"].values()), rel=1e-3)
    assert any("data loading" in line for line in d["not_predicted"])


def _write_calibrated(tmp_path: Path) -> Path:
    import tomli_w

    path = tmp_path / "slurm-local-cal.toml"
    path.write_text(tomli_w.dumps(slurm_local(TABLE, name="slurm-local-cal")))
    assert read_profile(path).calibration is not None
    return path


def test_plan_json_has_the_prediction_for_a_calibrated_cpu_profile_only(tmp_path):
    cal = run_cli("plan", "--profile", str(_write_calibrated(tmp_path)), "--set", "accumulation=8", "--json")
    assert cal.returncode == 0, cal.stderr
    d = json.loads(cal.stdout)
    assert d["cpu_prediction"]["step_time_s"] > 0 and d["cpu_prediction"]["peak_rss_gib"] > 0
    assert d["accumulation"] == 8
    gpu = run_cli("plan", "--profile", "a100x64", "--config", "configs/seed-000.toml", "--json")
    assert gpu.returncode == 0, gpu.stderr
    assert "cpu_prediction" not in json.loads(gpu.stdout)
    bare = run_cli("plan", "--profile", "slurm-local", "--json")
    assert json.loads(bare.stdout)["cpu_prediction"] is None


def test_plan_text_shows_the_terms_or_how_to_calibrate(tmp_path):
    text = run_cli("plan", "--profile", str(_write_calibrated(tmp_path))).stdout
    assert "predicted on this calibrated CPU cluster" in text
    assert "communication" in text and "activations" in text
    bare = run_cli("plan", "--profile", "slurm-local").stdout
    assert "run clusterctl profiles calibrate slurm-local" in bare


@pytest.mark.slow
def test_measure_rank_on_one_process_returns_every_figure():
    """One process, no group initialised: measure_rank makes its own and ends it."""
    import torch.distributed as dist

    from vltrain.calibrate import measure_rank

    got = measure_rank(sizes=(64, 128))
    assert not dist.is_initialized()
    contract = {k for k in TABLE if k not in ("measured_at", "slurm_job", "ranks")}
    assert set(got) == contract
    for key in contract - {"fsdp_imports_mib"}:  # 0 when FSDP's stack was imported before
        value = got[key]
        assert all(v > 0 for v in value.values()) if isinstance(value, dict) else value > 0, key
    table = TABLE | {k: got[k] for k in contract}
    assert dataclasses.asdict(calibration(**table)) == table | {}  # what it returns parses as a table
