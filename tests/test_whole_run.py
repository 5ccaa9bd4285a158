"""The whole run (issue 25 point 3): `plan`, `submit --dry-run` and `estimate` state one duration, GPU-hours,
energy and CO2 for a recipe, at the plan's expected MFU, and warn when it is far from the paper's.

The figures are checked against arithmetic redone here (steps x the plan's step time; the paper's weeks
x its GPUs), and the three commands against each other for every seed profile.
"""

from __future__ import annotations

import json

import pytest

from clusterctl.planning.recipes import PaperFacts
from clusterctl.planning.whole_run import PAPER_FAR, paper_run, paper_warning
from tests.conftest import run_cli

SEED_PROFILES = {"a100x32": "000", "a100x128": "001", "a100x64": "002", "h100x128": "003", "a100x256": "004"}
FIGURES = ("hours", "gpu_hours", "energy_kwh", "co2_kg", "mfu")


def _json(*args: str) -> dict:
    r = run_cli(*args, "--json")
    # a dry run without data exits 2 (submit would refuse: no shards), and still states the plan
    assert r.returncode == 0 or ("--dry-run" in args and r.returncode == 2), r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("profile", list(SEED_PROFILES))
def test_plan_dry_run_and_estimate_state_the_same_whole_run(profile):
    plan = _json("plan", "--profile", profile)
    run = plan["estimate"]
    # the whole run is the recipe's steps at the plan's step time (communication and tp x pp included)
    hours = plan["steps"] * plan["step_time"]["total_s"] / 3600
    assert run["hours"] == pytest.approx(hours, rel=2e-3)
    assert run["gpu_hours"] == pytest.approx(hours * plan["world_size"], rel=2e-3)
    # MFU in model FLOPs: the plan's expected HFU less the recomputation (4 forwards for 3)
    recompute = 4 / 3 if plan["activation_checkpointing"] else 1.0
    assert run["mfu"] == pytest.approx(plan["mfu_expected"] / recompute, abs=2e-4)
    dry = _json("submit", "--profile", profile, "--dry-run")["plan"]["estimate"]
    est = _json("estimate", "--profile", profile)
    for k in FIGURES:
        assert dry[k] == run[k] == est[k], k
    assert est["recipe"] == f"seed-{SEED_PROFILES[profile]}" and est["mfu_source"].startswith("the plan's expected")


def test_human_plan_and_dry_run_print_the_whole_run_as_estimate_does():
    est = _json("estimate", "--profile", "h100x128")
    gpu_h = f"{est['gpu_hours']:,.0f}"
    for args in (("plan", "--profile", "h100x128"), ("submit", "--profile", "h100x128", "--dry-run")):
        out = run_cli(*args).stdout
        assert "whole run: 415,040 steps x 2,048 samples (850M)" in out, out
        row = next(line for line in out.splitlines() if line.startswith(" GPU-hours"))
        assert row.split() == ["GPU-hours", gpu_h]
        assert f"{est['energy_kwh']:,.0f} kWh" in out and f"{est['co2_kg']:,.0f} kg" in out
    out = run_cli("estimate", "--profile", "h100x128").stdout
    assert next(line for line in out.splitlines() if line.startswith(" GPU-hours")).split() == ["GPU-hours", gpu_h]


def test_estimate_of_a_recipes_samples_takes_the_plans_mfu():
    """Seed 003's 850M images of vl-22b: the same hours as the plan (it was 40% MFU and 201 h against 276)."""
    plan = _json("plan", "--profile", "h100x128")
    args = ("estimate", "--profile", "h100x128", "--samples", "850M", "--activation-checkpointing")
    d = _json(*args, "--model", "vl-22b")
    assert abs(415_040 * 2048 / 850e6 - 1) < 1e-3  # the recipe's steps are the paper's images
    assert d["hours"] == pytest.approx(plan["estimate"]["hours"], rel=2e-3) and d["mfu"] < 0.3
    other = _json(*args, "--model", "vl-30b")  # not the recipe's model: the plan says nothing of its MFU
    assert other["mfu"] == 0.4 and other["mfu_source"].startswith("assumed")
    given = _json(*args, "--model", "vl-22b", "--mfu", "0.5")
    assert given["mfu"] == 0.5 and given["mfu_source"] == "--mfu"


def test_seed_000_is_far_shorter_than_its_paper_and_seed_002_far_longer():
    plan = _json("plan", "--profile", "a100x32")
    hours = plan["steps"] * plan["step_time"]["total_s"] / 3600
    ratio = 6 * 7 * 24 / hours  # 6 weeks on the same 32 GPUs
    (line,) = [w for w in plan["warnings"] if w.startswith("duration:")]
    assert f"{ratio:.0f}x shorter" in line and "1,008 h (6.0 weeks) on 32 GPUs" in line, line
    assert "12.2 h on 32 GPUs" in line and "model or steps are far smaller" in line
    assert plan["estimate"]["paper"]["ratio"] == pytest.approx(ratio, rel=2e-3)
    d = _json("plan", "--profile", "a100x64")
    (line,) = [w for w in d["warnings"] if w.startswith("duration:")]
    longer = d["steps"] * d["step_time"]["total_s"] / 3600 / 1008
    assert f"{longer:.1f}x longer" in line and "the paper's time needs" in line, line
    out = run_cli("submit", "--profile", "a100x32", "--dry-run").stdout
    assert out.count("warning: duration: recipe seed-000") == 1, out  # once, among the checks


@pytest.mark.parametrize("profile", ["a100x128", "h100x128", "a100x256"])
def test_no_warning_when_the_paper_states_no_duration_or_agrees(profile):
    d = _json("plan", "--profile", profile)
    assert not [w for w in d["warnings"] if w.startswith("duration:")]
    paper = d["estimate"]["paper"]
    if profile == "a100x256":  # seed 004: 2 months on 256 GPUs, within 2x of the recipe
        assert paper["duration_h"] == pytest.approx(2 * 730.5, abs=1) and 1 / PAPER_FAR < paper["ratio"] < PAPER_FAR
    else:
        assert paper is None


def _run(gpu_hours: float, mfu: float = 0.3) -> dict:
    return {"hours": gpu_hours / 32, "gpus": 32, "gpu_hours": gpu_hours, "mfu": mfu}


def test_the_warning_starts_at_twice_the_papers_gpu_hours_either_way():
    facts = PaperFacts((), 100.0, 32, None)  # 3,200 GPU-hours
    for ours, warned in ((1600.0, True), (1601.0, False), (6399.0, False), (6400.0, True)):
        run = _run(ours)
        assert (paper_warning("r", run, paper_run(facts, run)) is not None) is warned, ours
    # a stated duration wins over stated GPU-hours; GPU-hours alone still count
    assert paper_run(PaperFacts((), 100.0, 32, 750_000.0), _run(3200.0)).gpu_hours == 3200
    assert paper_run(PaperFacts((), None, None, 6400.0), _run(3200.0)).ratio == 2.0
    assert paper_run(PaperFacts((), 100.0, None, None), _run(3200.0)) is None
    line = paper_warning("r", _run(800.0, 0.4), paper_run(facts, _run(800.0, 0.4)))
    assert line and "4.0x shorter" in line
    line = paper_warning("r", _run(12800.0, 0.2), paper_run(facts, _run(12800.0, 0.2)))
    assert line and "4.0x longer" in line and "needs 80% MFU" in line  # 20% x 4


def test_a_twin_on_a_cpu_profile_is_not_set_beside_the_paper():
    d = _json("plan", "--profile", "slurm-local", "--config", "configs/seed-000-tiny.toml")
    assert d["estimate"]["paper"] is None and not [w for w in d["warnings"] if w.startswith("duration:")]
