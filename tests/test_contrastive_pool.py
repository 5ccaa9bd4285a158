"""Issue 25 point 6: the contrastive (ITC) pool, micro batch x data-parallel ranks (what
vltrain.model.losses.itc_loss gathers; tests/test_dp_mixed_parallel.py checks the gather itself). Every
reduced twin keeps a pool >= 4 on the shipped slurm-local-2x2 profile, the planner warns under
contrastive.MIN_POOL, and a twin's first steps train a contrastive loss at its pool's chance level,
not the identically-0 loss of a pool of 1 or the log 2 of a pool of 2."""

from __future__ import annotations

import json
import math

import pytest

from clusterctl.planning import contrastive
from clusterctl.planning.plan import plan_for_run
from clusterctl.planning.profiles import builtin_dir, load_profile
from tests.conftest import REPO, run_cli, tiny_data
from vltrain.batching import BatchSplit, split_batch
from vltrain.config import load_train_config

SEEDS = ("000", "001", "002", "003", "004")
TWO_BY_TWO = "slurm-local-2x2"


def _twin_plan(seed: str, profile: str = TWO_BY_TWO):
    cfg = load_train_config(REPO / "configs" / f"seed-{seed}-tiny.toml", None)
    return plan_for_run(load_profile(profile), cfg)


def test_the_two_by_two_profile_is_shipped():
    p = load_profile(TWO_BY_TWO)
    assert (builtin_dir() / f"{TWO_BY_TWO}.toml").is_file()
    assert (p.nodes.count, p.nodes.gpus_per_node, p.executor) == (2, 2, "slurm")
    assert p.slurm is not None and p.slurm.partition == load_profile("slurm-local").slurm.partition


@pytest.mark.parametrize("seed", SEEDS)
def test_every_twin_plans_a_pool_of_at_least_4_on_slurm_local_2x2(seed):
    plan, ran = _twin_plan(seed)
    recipe = load_train_config(REPO / "configs" / f"seed-{seed}.toml", None)
    assert "itc" in plan.objectives and plan.memory.fits and plan.host.fits
    assert contrastive.contrastive_pool(plan.split) >= 4
    # the recipe's shape is kept: its accumulation where the paper states one, seed 003's tp x pp
    if recipe.accumulation:
        assert ran.accumulation == recipe.accumulation
    if seed == "003":
        assert (plan.tensor_parallel, plan.pipeline_parallel) == (recipe.parallel.tp, recipe.parallel.pp)


@pytest.mark.parametrize("seed", ("000", "001", "002", "004"))
def test_a_twin_keeps_its_pool_on_slurm_local_too(seed):
    """global batch / accumulation = micro batch x dp: the pool does not depend on the ranks."""
    pools = {p: contrastive.contrastive_pool(_twin_plan(seed, p)[0].split) for p in (TWO_BY_TWO, "slurm-local")}
    assert pools["slurm-local"] == pools[TWO_BY_TWO], pools


def test_the_warning_names_the_pool_and_a_split_that_reaches_the_threshold():
    w = contrastive.pool_warning(
        ("itc", "mlm"), BatchSplit(micro_batch=1, accumulation=8, data_parallel=4, global_batch=32)
    )
    assert w is not None and w.startswith("contrastive: ") and "\n" not in w
    assert "scores 4 captions" in w and f"under {contrastive.MIN_POOL}" in w and f"log 4 = {math.log(4):.2f}" in w
    assert "--micro-batch 4 --accum 2" in w
    one = contrastive.pool_warning(("itc",), BatchSplit(1, 16, 1, 16))
    assert one is not None and "identically 0" in one
    small = contrastive.pool_warning(("itc",), BatchSplit(1, 4, 2, 8))  # 8 samples in all: no split reaches 16
    assert small is not None and f"a global batch of at least {contrastive.MIN_POOL}" in small


def test_no_warning_without_itc_or_at_the_threshold():
    assert contrastive.pool_warning(("caption", "mim"), BatchSplit(1, 8, 1, 8)) is None
    assert contrastive.pool_warning(("itc",), BatchSplit(4, 2, 4, 32)) is None  # 16


@pytest.mark.parametrize("global_batch, dp", [(32, 4), (64, 1), (48, 3), (2048, 32), (8, 2), (16, 16)])
def test_the_suggested_micro_batch_is_a_valid_split_with_the_smallest_pool_over_the_threshold(global_batch, dp):
    split = split_batch(global_batch, dp, micro_batch=1)
    micro = contrastive.pool_split_within(split)
    valid = [m for m in range(1, split.per_rank + 1) if split.per_rank % m == 0]
    reaching = [m for m in valid if m * dp >= contrastive.MIN_POOL]
    assert micro == (min(reaching) if reaching else None)
    if micro is not None:
        assert contrastive.contrastive_pool(split_batch(global_batch, dp, micro_batch=micro)) >= contrastive.MIN_POOL


def test_the_seed_recipes_pass_and_the_twins_warn_in_plan_json(env):
    seeds = {"a100x32": "000", "a100x128": "001", "a100x64": "002", "h100x128": "003", "a100x256": "004"}
    for prof in seeds:
        d = json.loads(run_cli("plan", "--profile", prof, "--json", env=env).stdout)
        assert d["micro_batch"] * d["data_parallel"] >= contrastive.MIN_POOL, prof
        assert not any(w.startswith("contrastive:") for w in d["warnings"]), prof
    r = run_cli("plan", "--profile", TWO_BY_TWO, "--json", env=env)  # its recipe: seed 003's twin, pool 4
    assert r.returncode == 0, r.stderr
    assert [w for w in json.loads(r.stdout)["warnings"] if w.startswith("contrastive:")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("pool-data"), n=160)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_a_twin_trains_its_contrastive_loss_at_its_pools_chance_level(seed, data, tmp_path):
    """Two real steps on one CPU rank (tp = pp = 1: the pool, global batch / accumulation, is the one the
    twin has on slurm-local-2x2): the ITC loss is near log(pool), not 0 (a pool of 1) nor log 2."""
    data, tok = data
    pool = contrastive.contrastive_pool(_twin_plan(seed)[0].split)
    assert pool >= 4
    rd = tmp_path / "run"
    r = run_cli(
        "train", "-c", str(REPO / "configs" / f"seed-{seed}-tiny.toml"), "--run-dir", str(rd), "--stop-after", "2",
        *("--set", f"data.shards={data}", "--set", f"data.tokenizer={tok}", "--set", "parallel.tp=1"),
        *("--set", "parallel.pp=1"),
        prog="vltrain", env={"OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    start = json.loads((rd / "events.jsonl").read_text().splitlines()[0])
    assert start["micro_batch"] * start["dp"] == pool
    steps = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2]
    first = steps[0]["itc"]
    assert abs(first - math.log(pool)) < min(abs(first - math.log(2)), abs(first)), (first, pool)
