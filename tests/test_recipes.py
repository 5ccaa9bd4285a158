"""The headline command runs the paper's setup: each profile's recipe holds its seed's figures (checked
against the seed texts in shared/seeds/), what will run is shown and checked before sbatch, and
overrides apply or fail in one line naming their flag (issue 13)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clusterctl.runs.registry import Registry
from tests.conftest import REPO, dry_run_exit, no_scheduler, run_cli
from vltrain.config import parse_train_config
from vltrain.model_math import param_count
from vltrain.presets import get_preset

SEEDS_DIR = REPO.parent / "shared" / "seeds"


def seed_text(seed: str) -> str:
    (path,) = SEEDS_DIR.glob(f"{seed}_*.txt")
    return path.read_text(encoding="utf-8", errors="replace")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


@pytest.fixture
def env(tmp_path):
    return {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}


def dry_run(env, *args) -> dict:
    """`submit --dry-run --json` where no scheduler answers (its checks: this recipe's, not a local cluster's)."""
    r = run_cli("submit", *args, "--dry-run", "--json", env=env | no_scheduler(Path(env["CLUSTERCTL_REGISTRY"]).parent))
    dry_run_exit(r)
    return json.loads(r.stdout)


# (profile, seed, [(JSON path in `submit --dry-run --json`, expected, words of the seed text that state it)])
FIGURES = [
    (
        "a100x64",
        "002",
        [
            ("plan.global_batch", 8192, "8,192 image-text pairs"),
            ("plan.params", 30.5e9, "30.5 billion parameters"),
            ("plan.world_size", 64, "64</gpu_count>"),
            ("config.optim.lr", 5e-4, "peaking at 5e-4"),
            ("config.optim.betas", [0.9, 0.95], "β1=0.9, β2=0.95"),
            ("config.optim.weight_decay", 0.1, "weight decay of 0.1"),
            ("config.optim.warmup_steps", 2000, "linear warmup phase of 2,000 steps"),
            ("config.model.max_text_len", 77, "maximum sequence length of 77 tokens"),
            ("config.model.vocab_size", 64000, "vocabulary size of 64,000"),
            ("config.model.image_size", 224, "224x224 pixels"),
            ("config.precision", "bf16", "Mixed-precision training (bfloat16)"),
            ("config.zero_stage", 2, "ZeRO-2 optimization"),
            ("config.activation_checkpointing", True, "and gradient checkpointing"),
            ("config.data.random_crop", True, "random cropping and horizontal flipping"),
            ("config.data.hflip", True, "random cropping and horizontal flipping"),
        ],
    ),
    (
        "a100x32",
        "000",
        [
            ("plan.global_batch", 2048, "global batch size of 2048"),
            ("plan.accumulation", 8, "gradient accumulation over 8 mini-batches"),
            ("plan.world_size", 32, "32</gpu_count>"),
            ("config.optim.lr", 1e-4, "peak learning rate was set to 1e-4"),
            ("config.optim.warmup_steps", 10000, "linear warmup for the first 10,000 steps"),
            ("config.optim.min_lr", 0.0, "cosine decay to zero"),
            ("config.model.vocab_size", 64000, "vocabulary size of 64,000"),
            ("config.model.image_size", 224, "224x224 pixels"),
            ("config.precision", "bf16", "Mixed-precision training (bfloat16)"),
            ("config.zero_stage", 2, "ZeRO-2 optimization"),
            ("config.loss.mlm", 1.0, "masked language modeling"),
            ("config.loss.itc", 1.0, "image-text contrastive learning"),
            ("config.loss.caption", 1.0, "image-to-text generation"),
        ],
    ),
    (
        "a100x128",
        "001",
        [
            ("plan.global_batch", 2048, "global batch size of 2048"),
            ("plan.accumulation", 8, "gradient accumulation over 8 mini-batches"),
            ("plan.params", 30.5e9, "30.5 billion parameters"),
            ("plan.world_size", 128, "128</gpu_count>"),
            ("config.optim.warmup_fraction", 0.05, "first 5% of training steps"),
            ("config.optim.min_lr", 1e-6, "minimum learning rate of 1e-6"),
            ("config.model.vocab_size", 64000, "vocabulary of 64,000 tokens"),
            ("config.model.image_size", 224, "224x224 pixels"),
            ("config.data.randaugment", True, "using RandAugment"),
            ("config.parallel.strategy", "fsdp", "FSDP (Fully Sharded Data Parallel)"),
            ("config.loss.mim", 1.0, "masked image modeling and contrastive pre-training"),
            ("config.loss.itc", 1.0, "masked image modeling and contrastive pre-training"),
        ],
    ),
    (
        "h100x128",
        "003",
        [
            ("plan.global_batch", 2048, "global batch size was set to 2048"),
            ("plan.accumulation", 16, "gradient accumulation across 16 steps"),
            ("plan.params", 22e9, "22 billion parameters"),
            ("plan.world_size", 128, "128</gpu_count>"),
            ("config.optim.lr", 1e-4, "peak learning rate of 1e-4"),
            ("config.optim.warmup_steps", 10000, "linear warmup schedule over 10,000 steps"),
            ("config.model.image_size", 336, "336"),
            ("config.model.vocab_size", 65000, "vocabulary of 65,000 tokens"),
            ("config.model.pos_embedding", "rope", "rotary position embeddings"),
            ("config.model.norm", "rmsnorm", "RMSNorm layers"),
            ("config.precision", "fp16", "automatic loss scaling"),
            ("config.activation_checkpointing", True, "gradient checkpointing and activation recomputation"),
            ("config.steps", 850e6 / 2048, "850 million images"),
            ("config.parallel.strategy", "fsdp", "tensor parallelism and pipeline parallelism"),
            ("plan.strategy", "fsdp", "tensor parallelism and pipeline parallelism"),
            ("config.parallel.tp", 2, "tensor parallelism"),
            ("plan.tensor_parallel", 2, "tensor parallelism"),
            ("config.parallel.pp", 2, "pipeline parallelism"),
            ("plan.pipeline_parallel", 2, "pipeline parallelism"),
            ("plan.data_parallel", 32, "tensor parallelism and pipeline parallelism"),
        ],
    ),
    (
        "a100x256",
        "004",
        [
            ("plan.global_batch", 2048, "global batch size of 2,048 sequences"),
            ("plan.world_size", 256, "256</gpu_count>"),
            ("config.model.max_text_len", 1024, "1,024 tokens for text"),
            ("config.model.image_size", 256, "256x256 pixel images"),
            ("config.model.vocab_size", 32000, "vocabulary size of 32,000"),
            ("config.optim.lr", 5e-4, "peak learning rate of 5e-4"),
            ("config.optim.warmup_steps", 10000, "over the first 10,000 steps"),
            ("config.optim.min_lr", 1e-5, "minimum learning rate of 1e-5"),
            ("config.optim.grad_clip", 1.0, "clipping at a norm of 1.0"),
            ("config.precision", "bf16", "Mixed-precision training (bfloat16)"),
            ("config.loss.mim", 1.0, "masked reconstruction tasks with contrastive learning"),
            ("config.loss.itc", 1.0, "masked reconstruction tasks with contrastive learning"),
        ],
    ),
]


@pytest.mark.parametrize("profile, seed, figures", FIGURES, ids=[f[0] for f in FIGURES])
def test_submit_dry_run_has_the_seeds_figures(env, profile, seed, figures):
    """`clusterctl submit --profile P --dry-run --json` with no other flag: the paper's setup."""
    text = seed_text(seed)
    d = dry_run(env, "--profile", profile)
    assert d["source"].endswith(f"configs/seed-{seed}.toml")
    for path, expected, words in figures:
        assert words in text, f"the seed {seed} text does not say {words!r}: the expected {path} is not grounded"
        got = _get(d, path)
        if path in ("plan.params", "config.steps"):
            assert got == pytest.approx(expected, rel=0.01), path
        else:
            assert got == expected, path
    # the resolved config has the shape of a config file: it loads back as one
    assert parse_train_config(d["config"], "dry-run").to_dict() == d["config"]


def test_every_shipped_profile_names_a_recipe_that_plans(env):
    for prof in ("a100x32", "a100x64", "a100x128", "a100x256", "h100x128", "local", "slurm-local"):
        r = run_cli("plan", "--profile", prof, "--json", env=env)
        assert r.returncode == 0, (prof, r.stderr)


# --- 2. a profile names its recipe; --config, --model and --set override it ---------------------------
def test_config_model_and_set_override_the_recipe(env):
    d = dry_run(env, "--profile", "a100x64", "--config", str(REPO / "configs" / "seed-000.toml"))
    assert d["source"].endswith("seed-000.toml") and d["plan"]["global_batch"] == 2048
    d = dry_run(env, "--profile", "a100x64", "--model", "base", "--set", "optim.lr=3e-4")
    assert d["config"]["model"]["name"] == "base" and d["config"]["optim"]["lr"] == 3e-4
    assert d["config"]["optim"]["betas"] == [0.9, 0.95] and d["plan"]["global_batch"] == 8192  # the rest: the recipe's


def test_a_profile_without_a_recipe_names_the_recipes(env, tmp_path):
    src = (REPO / "cluster_profiles" / "a100x64.toml").read_text()
    prof = tmp_path / "mine.toml"
    prof.write_text(re.sub(r"(?m)^recipe = .*\n", "", src).replace('name = "a100x64"', 'name = "mine"'))
    r = run_cli("submit", "--profile", str(prof), "--dry-run", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --config: profile 'mine' names no recipe; allowed: --config FILE or one of")
    assert all(f"seed-00{i}" in r.stderr for i in range(5))
    r = run_cli("profiles", "validate", str(REPO / "cluster_profiles" / "a100x64.toml"), env=env)
    assert r.returncode == 0


# --- 3. overrides are never silently dropped ----------------------------------------------------------
def test_set_on_a_preset_applies_and_the_parameter_count_follows(env):
    d = dry_run(env, "--profile", "a100x64", "--set", "model.vocab_size=32000")
    m = d["config"]["model"]
    assert m["name"] == "crossmodal-xl" and m["vocab_size"] == 32000 and m["max_text_len"] == 77
    expected = param_count(get_preset("crossmodal-xl").__class__(**m))
    assert d["plan"]["params"] == expected < param_count(get_preset("crossmodal-xl"))


@pytest.mark.parametrize(
    "args, msg",
    [
        (("--set", "optim.lr=-1"), "error: --set optim.lr: -1 is out of range"),
        (("--set", "model.bogus=1"), "error: --set model.bogus: unknown key; allowed: name, image_size"),
        (("--set", "optim.lr.x=1"), "error: --set optim.lr.x: optim.lr is not a table"),
        (("--global-batch", "0"), "error: --global-batch: 0 is out of range"),
        (("--model", "huge"), "error: --model: unknown preset 'huge'; allowed: tiny, small, base, large, vl-seed000"),
    ],
)
def test_override_errors_name_the_flag(env, args, msg):
    r = run_cli("submit", "--profile", "a100x64", *args, "--dry-run", env=env)
    assert r.returncode == 2 and r.stderr.startswith(msg) and r.stderr.count("\n") == 1, r.stderr


def test_a_bad_config_file_is_named(env, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('base = "' + str(REPO / "configs" / "seed-002.toml") + '"\n[optim]\nlr = -1\n')
    r = run_cli("submit", "--profile", "a100x64", "--config", str(cfg), "--dry-run", env=env)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {cfg}: optim.lr: -1 is out of range"), r.stderr
    loop = tmp_path / "loop.toml"
    loop.write_text('base = "loop.toml"\n')
    r = run_cli("submit", "--profile", "a100x64", "--config", str(loop), "--dry-run", env=env)
    assert r.returncode == 2 and "includes itself" in r.stderr


# --- 4. submit takes plan's planning flags, from one definition ---------------------------------------
def test_plan_and_submit_share_their_planning_options():
    from clusterctl.cli import build_command

    opts = {}
    for name, mod in (("plan", "clusterctl.cli.cmd_plan"), ("submit", "clusterctl.cli.cmd_submit")):
        cmd = build_command(name, mod, name)
        opts[name] = {tuple(p.opts): (p.help, p.default) for p in cmd.params}
    assert set(opts["plan"]) - {("--json",)} <= set(opts["submit"])
    for key in opts["plan"]:
        if key != ("--json",):
            assert opts["plan"][key] == opts["submit"][key], key


def test_submit_planning_flags_change_the_plan(env):
    d = dry_run(env, "--profile", "a100x64", "--micro-batch", "2")
    assert (d["plan"]["micro_batch"], d["plan"]["accumulation"]) == (2, 64)
    d = dry_run(env, "--profile", "a100x64", "--accum", "32", "--zero-stage", "3", "--no-activation-checkpointing")
    assert (d["plan"]["accumulation"], d["plan"]["zero_stage"], d["plan"]["activation_checkpointing"]) == (32, 3, False)
    assert d["config"]["zero_stage"] == 3 and d["config"]["accumulation"] == 32


def test_plan_with_no_model_plans_the_recipe_with_its_layout(env):
    r = run_cli("plan", "--profile", "a100x64", "--json", env=env)
    d = json.loads(r.stdout)
    assert (d["model"], d["global_batch"], d["activation_checkpointing"]) == ("crossmodal-xl", 8192, True)
    r = run_cli("plan", "--profile", "h100x128", env=env)
    assert r.returncode == 0 and "tp 2 x pp 2" in r.stdout and "FSDP zero_stage 2" in r.stdout, r.stdout
    assert "note:" not in r.stdout  # the trainer runs all of seed 003's recipe


def test_tensor_parallel_under_deepspeed_is_refused_at_submit(env, tmp_path):
    r = run_cli("submit", "--profile", "slurm-local", "--tp", "2", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith('error: --tp: 2 needs parallel.strategy = "fsdp"'), r.stderr
    assert not (tmp_path / "runs").exists() and Registry(tmp_path / "reg.db").count_runs() == 0


# --- 5. one resolved config, shown -------------------------------------------------------------------
def test_dry_run_text_shows_the_resolved_config_under_the_plan(env):
    r = run_cli("submit", "--profile", "a100x64", "--dry-run", env=env)
    dry_run_exit(r)  # 2: the recipe's data is not on this machine
    out = r.stdout
    assert out.index("global batch 8192") < out.index("resolved config") < out.index("#SBATCH --nodes=8")
    for line in ("max_text_len = 77", "vocab_size = 64000", "lr = 0.0005", "warmup_steps = 2000", "weight_decay = 0.1"):
        assert line in out
    assert "submit would refuse: data.shards: not set" in out


# --- 6. checks before sbatch ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Shards and two tokenizers (the tiny model's 1,000 pieces, and 500), made in-process."""
    from vltrain.data.synth import write_synthetic_shards
    from vltrain.tokenizer import train_tokenizer_from_shards

    root = tmp_path_factory.mktemp("data")
    write_synthetic_shards(root / "shards", 400, 2, seed=0, image_size=32)
    for vocab in (1000, 500):
        train_tokenizer_from_shards(root / "shards", vocab, root / f"tok{vocab}.model")
    return root


def _submit(env, *args):
    return run_cli(
        "submit", "--profile", "slurm-local", "--config", str(REPO / "configs" / "tiny.toml"), *args, env=env
    )


def test_no_data_is_refused_before_sbatch_and_leaves_nothing(env, tmp_path):
    r = _submit(env, "--set", f"data.shards={tmp_path / 'none'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: data.shards: {tmp_path / 'none'} does not exist")
    assert not (tmp_path / "runs").exists() and Registry(tmp_path / "reg.db").count_runs() == 0


def test_tokenizer_vocabulary_must_equal_the_models(env, small_data, tmp_path):
    r = _submit(
        env, "--set", f"data.shards={small_data / 'shards'}", "--set", f"data.tokenizer={small_data / 'tok500.model'}"
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert (
        "has 500 pieces but model.vocab_size is 1,000; allowed: a tokenizer of 1,000 pieces, or --set model.vocab_size=500"
        in r.stderr
    )
    d = dry_run(
        env,
        "--profile",
        "slurm-local",
        "--config",
        str(REPO / "configs" / "tiny.toml"),
        "--set",
        f"data.shards={small_data / 'shards'}",
        "--set",
        f"data.tokenizer={small_data / 'tok1000.model'}",
    )
    assert d["checks"] == {"problems": [], "warnings": []}
    assert Registry(tmp_path / "reg.db").count_runs() == 0


def test_a_plan_that_does_not_fit_is_refused_and_one_near_the_limit_warns(env):
    r = run_cli("submit", "--profile", "a100x32", "--model", "vl-30b", "--zero-stage", "0", env=env)
    assert r.returncode == 2 and "error: plan: vl-30b needs" in r.stderr and "GiB per GPU" in r.stderr, r.stderr
    r = run_cli(
        "submit", "--profile", "a100x64", env=env
    )  # the recipe plans 78.5 of the 79.15 GiB PyTorch gets, and has no data
    lines = r.stderr.strip().splitlines()  # a refusal is the only line: the warning is the dry-run's
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: data.shards: not set") and "(and 0 more" not in lines[0]
    warnings = dry_run(env, "--profile", "a100x64")["checks"]["warnings"]
    assert any(re.match(r"plan: 7\d\.\d of 79\.15 GiB per GPU \(9\d%\) is over 90%", w) for w in warnings), warnings


def test_dry_run_lists_every_problem_the_recipe_has_here(env):
    d = dry_run(env, "--profile", "h100x128")
    # the trainer runs TP x PP, fp16; 128 ranks need a tokenizer made beforehand
    assert [p.split(":")[0] for p in d["checks"]["problems"]] == ["data.shards", "data.tokenizer"]
    d = dry_run(env, "--profile", "a100x128", "--set", "parallel.strategy=deepspeed", "--tp", "1", "--zero-stage", "3")
    assert [p.split(":")[0] for p in d["checks"]["problems"]] == ["zero_stage", "data.shards", "data.tokenizer"]


# --- 8. presets ----------------------------------------------------------------------------------------
def test_presets_list_and_show(env):
    from vltrain.presets import PRESETS

    rows = json.loads(run_cli("presets", "list", "--json", env=env).stdout)
    assert [r["name"] for r in rows] == list(PRESETS)
    assert all(r["params"] == param_count(get_preset(r["name"])) for r in rows)
    assert {r["name"]: r["seed"] for r in rows if r["seed"]} == {
        "vl-seed000": "000",
        "crossmodal-xl": "002",
        "vl-30b": "001",
        "vl-22b": "003",
        "vl-seed004": "004",
    }
    d = json.loads(run_cli("presets", "show", "vl-22b", "--json", env=env).stdout)
    assert sum(d["params_by_part"].values()) == d["params"] and d["paper_params"] == 22e9
    r = run_cli("presets", "show", "nope", env=env)
    assert r.returncode == 2 and "allowed: tiny, small, base" in r.stderr


def test_recipes_list_names_the_profiles_that_run_them(env):
    rows = {r["name"]: r for r in json.loads(run_cli("recipes", "list", "--json", env=env).stdout)}
    assert {f"seed-00{i}" for i in range(5)} | {f"seed-00{i}-tiny" for i in range(5)} | {"tiny"} <= set(rows)
    assert rows["seed-002"]["profiles"] == ["a100x64"] and rows["tiny"]["profiles"] == ["local", "slurm-local"]
    d = json.loads(run_cli("recipes", "show", "seed-003-tiny", "--json", env=env).stdout)
    assert d["config"]["model"]["pos_embedding"] == "rope" and d["config"]["optim"]["lr"] == 1e-4  # the recipe's
    assert d["config"]["model"]["vision_width"] == 96 and d["config"]["parallel"]["tp"] == 2  # the twin's
