"""`submit --dry-run` exits 2 when submit would refuse (issue 25, point 5), and the checks before sbatch ask
the scheduler, when one answers, whether the profile's partition exists and holds its nodes: a wrong
slurm.partition is one line naming the field and the partitions that exist, before anything is written,
instead of sbatch's refusal later (or a job pending for ever: PartitionNodeLimit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterctl.backends.slurm.backend import partition_check
from clusterctl.backends.slurm.parse import Partition, parse_partitions
from clusterctl.planning.profiles import load_profile
from clusterctl.runs.registry import Registry
from tests.conftest import REPO, dry_run_exit, no_scheduler, one_line_error, run_cli, slurm_up, trainer_shards

# `scontrol -a -o show partition` on the local cluster (scripts/slurm-local.sh, Slurm 22.05)
RECORDED = (
    "PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A "
    "DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED "
    "MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=a[1-2] PriorityJobFactor=1 "
    "PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP "
    "TotalCPUs=32 TotalNodes=2 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED "
    "MaxMemPerNode=UNLIMITED TRES=cpu=32,mem=16000M,node=2,billing=32,gres/gpu=16\n"
)


def profile_file(tmp_path: Path, name: str, partition: str | None, nodes: int = 2) -> Path:
    """The shipped slurm-local profile with another partition (None: the line left out) and node count."""
    text = (REPO / "cluster_profiles" / "slurm-local.toml").read_text()
    text = text.replace('name = "slurm-local"', f'name = "{name}"').replace("count = 2", f"count = {nodes}")
    text = text.replace('partition = "debug"\n', f'partition = "{partition}"\n' if partition else "")
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


# --- pure: what scontrol prints, and the check of a profile against it ----------------------------------
def test_partitions_parse_from_scontrols_one_line_output():
    parts = parse_partitions(RECORDED + "PartitionName=gpu Default=NO State=DOWN TotalNodes=8 MaxNodes=4\n")
    assert parts == {
        "debug": Partition("debug", "UP", 2, None, True),
        "gpu": Partition("gpu", "DOWN", 8, 4, False),
    }
    assert parts["debug"].node_limit == 2 and parts["gpu"].node_limit == 4
    assert parse_partitions("No partitions in the system\n") == {}


def test_a_partition_that_does_not_exist_is_one_line_naming_the_field_and_those_that_do(tmp_path):
    parts = parse_partitions(RECORDED + "PartitionName=gpu Default=NO State=UP TotalNodes=8\n")
    check = partition_check(load_profile(str(profile_file(tmp_path, "p1", "nosuch"))), parts)
    (line,) = check.problems
    assert line.startswith("slurm.partition: 'nosuch' is not a partition of this cluster") and "\n" not in line
    assert "allowed: debug, gpu (or no slurm.partition: the cluster's default, debug)" in line
    none = partition_check(load_profile(str(profile_file(tmp_path, "p4", "debug"))), {})
    assert none.problems == [
        "slurm.partition: 'debug' is not a partition of this cluster (scontrol show partition); "
        "allowed: none: the cluster has no partition"
    ]


def test_more_nodes_than_the_partition_holds_is_refused_and_a_partition_down_warns(tmp_path):
    parts = parse_partitions(RECORDED + "PartitionName=gpu Default=NO State=DRAIN TotalNodes=8 MaxNodes=4\n")
    (line,) = partition_check(load_profile(str(profile_file(tmp_path, "n3", "debug", nodes=3))), parts).problems
    assert (
        line.startswith("nodes.count: 3 nodes, but partition debug takes at most 2 per job")
        and "allowed: at most 2" in line
    )
    # no partition named: the cluster's default is the one checked
    (line,) = partition_check(load_profile(str(profile_file(tmp_path, "n3d", None, nodes=3))), parts).problems
    assert line.startswith("nodes.count: 3 nodes, but partition debug takes")
    # MaxNodes counts too; a partition that is not UP only warns
    (line,) = partition_check(load_profile(str(profile_file(tmp_path, "n5", "gpu", nodes=5))), parts).problems
    assert line.startswith("nodes.count: 5 nodes, but partition gpu takes at most 4 per job")
    ok = partition_check(load_profile(str(profile_file(tmp_path, "n4", "gpu", nodes=4))), parts)
    assert ok.problems == [] and ok.warnings == [
        "slurm.partition: 'gpu' is DRAIN: the job waits until the partition is UP again"
    ]
    default = {"debug": Partition("debug", "UP", 2, None, False)}
    (line,) = partition_check(load_profile(str(profile_file(tmp_path, "nd", None))), default).problems
    assert line == "slurm.partition: not set and the cluster has no default partition; allowed: debug"


# --- the exit code of the dry run ------------------------------------------------------------------------
def test_the_dry_run_exits_2_when_submit_would_refuse_and_0_when_it_would_start(env, tmp_path):
    """Was 0 both ways: a script could not tell "would refuse" from "would start" without parsing."""
    missing = ("--set", f"data.shards={tmp_path / 'none'}")
    for fmt in ([], ["--json"]):
        r = run_cli("submit", "--profile", "local", *missing, "--dry-run", *fmt, env=env)
        assert r.returncode == 2, r.stdout[-500:] + r.stderr
        if fmt:
            assert json.loads(r.stdout)["checks"]["problems"][0].startswith("data.shards:")
        else:
            assert "submit would refuse: data.shards:" in r.stdout and r.stderr == ""
    d = trainer_shards(tmp_path / "d")
    good = ("--set", f"data.shards={d / 'shards'}", "--set", f"data.tokenizer={d / 'tok.model'}")
    r = run_cli("submit", "--profile", "local", *good, "--dry-run", env=env)
    assert r.returncode == 0 and "checks passed: submit would start this run" in r.stdout, r.stdout[-1000:]
    r = run_cli("submit", "--profile", "local", *good, "--dry-run", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["checks"]["problems"] == []
    assert json.loads(r.stdout)["checks_skipped"] == []  # a local run asks no scheduler
    assert not (tmp_path / "runs").exists() and Registry(tmp_path / "reg.db").count_runs() == 0


# --- a scheduler that does not answer: the check is skipped, and said so --------------------------------
def _shim(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "scontrol"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize(
    "body, why",
    [
        (None, "scontrol: not found on PATH"),
        ("exec /bin/sleep 60", "scontrol: slurmctld did not answer within 1 s"),
        ("echo 'scontrol: error: Unable to contact slurm controller (connect failure)' >&2; exit 1",
         "scontrol: Unable to contact slurm controller (connect failure)"),
    ],
)  # fmt: skip
def test_an_unreachable_scheduler_skips_the_partition_check_with_a_note(env, tmp_path, body, why):
    prof = profile_file(tmp_path, "elsewhere", "nosuch")
    bin_dir = tmp_path / "bin"
    if body is not None:
        _shim(bin_dir, body)
    path = f"{bin_dir}:/nonexistent" if body is not None else "/nonexistent"
    env = env | {"PATH": path, "CLUSTERCTL_SLURM_TIMEOUT": "1"}
    r = run_cli("submit", "--profile", str(prof), "--dry-run", "--json", env=env)
    d = json.loads(r.stdout)
    assert d["checks_skipped"] == [f"slurm.partition not checked with the scheduler ({why})"]
    assert not any(p.startswith("slurm.partition") for p in d["checks"]["problems"])
    r = run_cli("submit", "--profile", str(prof), "--dry-run", env=env)
    assert f"note: slurm.partition not checked with the scheduler ({why})" in r.stdout.splitlines()


# --- against the real local cluster (scripts/slurm-local.sh) --------------------------------------------


@pytest.mark.slurm
def test_the_real_schedulers_partitions_decide(env, tmp_path):
    """A partition the cluster does not have: the dry run lists it (exit 2), submit refuses it in one line
    before anything is written; more nodes than `debug` holds: refused too (sbatch would queue the job for
    ever, PartitionNodeLimit); the shipped slurm-local profile passes the check."""
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    d = trainer_shards(tmp_path / "d")
    data = ("--set", f"data.shards={d / 'shards'}", "--set", f"data.tokenizer={d / 'tok.model'}")
    bad = profile_file(tmp_path, "nopart", "nosuch")
    r = run_cli("submit", "--profile", str(bad), *data, "--dry-run", "--json", env=env)
    assert r.returncode == 2, r.stderr
    (line,) = json.loads(r.stdout)["checks"]["problems"]
    assert line.startswith("slurm.partition: 'nosuch' is not a partition of this cluster") and "debug" in line
    r = run_cli("submit", "--profile", str(bad), *data, env=env)
    one_line_error(r, "error: slurm.partition: 'nosuch' is not a partition of this cluster")
    assert "allowed: debug" in r.stderr
    assert not (tmp_path / "runs").exists() and Registry(tmp_path / "reg.db").count_runs() == 0
    big = profile_file(tmp_path, "fournodes", "debug", nodes=4)  # the local cluster has 3
    r = run_cli("submit", "--profile", str(big), *data, "--set", "global_batch=64", "--dry-run", "--json", env=env)
    problems = json.loads(r.stdout)["checks"]["problems"]
    assert r.returncode == 2 and [p.split(":")[0] for p in problems] == ["nodes.count"], problems
    r = run_cli("submit", "--profile", "slurm-local", *data, "--dry-run", "--json", env=env)
    dry_run_exit(r)
    d = json.loads(r.stdout)
    assert d["checks_skipped"] == [] and not [p for p in d["checks"]["problems"] if p.startswith("slurm.")]
    assert r.returncode == 0, d["checks"]
    # the same dry run where no controller answers: skipped, and said
    r = run_cli("submit", "--profile", str(bad), *data, "--dry-run", "--json", env=env | no_scheduler(tmp_path))
    assert r.returncode == 0 and json.loads(r.stdout)["checks_skipped"][0].startswith("slurm.partition not checked")
