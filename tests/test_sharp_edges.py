"""Issue 23 point 7, the cluster side: exact HCA lists, --mem with whole nodes, a tokenizer made before
a multi-rank run, the NCCL flight recorder and expandable segments in the job's environment."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from clusterctl.backends import get_backend
from clusterctl.planning.nccl_env import TRACE_FILE_PREFIX, flight_recorder_env
from clusterctl.planning.plan import make_plan
from clusterctl.planning.profiles import builtin_dir, comm_env, load_profile, parse_profile
from clusterctl.runs import preflight
from vltrain.common.errors import UserError
from vltrain.config import TrainConfig
from vltrain.presets import get_preset

RUN_DIR = Path("/scratch/runs/demo-20260101-000000-abcd")


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
    return parse_profile(data, f"{name}.toml")


def _launch(profile) -> dict:
    return get_backend("slurm").launch_spec(profile, RUN_DIR, "vltrain-demo").params


# ---------------------------------------------------------------- HCAs
@pytest.mark.parametrize("name", ["a100x32", "a100x64", "a100x128", "a100x256", "h100x128"])
def test_shipped_profiles_list_their_hcas_exactly(name):
    p = load_profile(name)
    value = comm_env(p)["NCCL_IB_HCA"]
    assert value.startswith("=")  # NCCL's exact-match form: no mlx5_1 matching mlx5_10
    assert value[1:].split(",") == list(p.interconnect.ib_hcas) and len(p.interconnect.ib_hcas) == 8


@pytest.mark.parametrize(
    "hcas",
    [
        "mlx5",  # the old form: a prefix NCCL matches against every mlx5_* device
        ["mlx5"],
        ["mlx5_0", "mlx4:1"],
        ["=mlx5_0"],  # the '=' is comm_env's to write
        ["^mlx5_4"],
        ["mlx5_"],
    ],
)
def test_a_bare_prefix_or_nccl_syntax_in_a_profile_is_refused_in_one_line(hcas):
    with pytest.raises(UserError) as e:
        _profile("a100x64", interconnect={"ib_hcas": hcas})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("a100x64.toml: interconnect.ib_hcas")
    assert "allowed: a list of exact HCA names" in msg and "mlx5_10 too" in msg


def test_hca_ports_and_other_vendors_pass_through_exactly():
    p = _profile("a100x64", interconnect={"ib_hcas": ["mlx5_0:1", "mlx5_10", "bnxt_re0", "rocep1s0f0"]})
    assert comm_env(p)["NCCL_IB_HCA"] == "=mlx5_0:1,mlx5_10,bnxt_re0,rocep1s0f0"
    # a profile that really wants a prefix says so in interconnect.env, which wins
    mine = _profile("a100x64", interconnect={"env": {"NCCL_IB_HCA": "mlx5"}})
    assert comm_env(mine)["NCCL_IB_HCA"] == "mlx5"


# ---------------------------------------------------------------- --mem
def test_whole_nodes_ask_for_all_their_memory():
    assert _launch(load_profile("a100x64"))["mem"] == "0"  # was 1000GB: pending for ever on 990 GB nodes
    assert _launch(_profile("a100x64", slurm={"mem_gib": 900}))["mem"] == "900GB"  # stated: as stated
    shared = _profile("a100x64", slurm={"exclusive": False})
    assert _launch(shared)["mem"] == f"{shared.nodes.memory_gib}GB"


def test_mem_gib_out_of_range_names_the_field():
    with pytest.raises(UserError, match=r"slurm\.mem_gib: -1 is out of range; allowed: "):
        _profile("a100x64", slurm={"mem_gib": -1})


# ---------------------------------------------------------------- tokenizer
def test_a_multi_rank_run_without_a_tokenizer_is_refused_naming_the_command():
    cfg = TrainConfig(model="crossmodal-xl", global_batch=8192, activation_checkpointing=True)
    plan = make_plan(load_profile("a100x64"), get_preset("crossmodal-xl"), 8192, activation_checkpointing=True)
    problems = preflight.check(cfg, plan.to_dict()).problems
    (line,) = [p for p in problems if p.startswith("data.tokenizer")]
    assert line.startswith("data.tokenizer: not set for a 64-rank run; allowed: ")
    assert "`vltrain tokenizer train --shards DIR --vocab-size " in line and "\n" not in line
    assert preflight.tokenizer_needed(cfg, 1) == []  # one rank: training it first costs no one a time-out
    with_tok = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="/data/tok.model"))
    assert preflight.tokenizer_needed(with_tok, 64) == []


# ---------------------------------------------------------------- flight recorder, allocator
def test_cuda_jobs_get_the_flight_recorder_and_expandable_segments():
    p = load_profile("a100x64")
    env = get_backend("slurm").launch_spec(p, RUN_DIR, "vltrain-demo").env
    assert int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0 and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == f"{RUN_DIR}/{TRACE_FILE_PREFIX}"  # in the run dir, not /tmp
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    setup = "\n".join(get_backend("slurm").launch_spec(p, RUN_DIR, "vltrain-demo").params["setup"])
    assert f"export TORCH_NCCL_DEBUG_INFO_TEMP_FILE={RUN_DIR}/{TRACE_FILE_PREFIX}" in setup


def test_cpu_profiles_get_neither_and_the_profile_env_wins():
    for name in ("local", "slurm-local"):
        p = load_profile(name)
        env = comm_env(p) | flight_recorder_env(p, RUN_DIR)
        assert not {"TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "PYTORCH_CUDA_ALLOC_CONF"} & set(
            env
        )
    own = {"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/fast/fr_", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    env = get_backend("slurm").launch_spec(_profile("a100x64", interconnect={"env": own}), RUN_DIR, "x").env
    assert {k: env[k] for k in own} == own
