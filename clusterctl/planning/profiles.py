"""Cluster profiles: what a cluster is (nodes, GPUs, fabric, Slurm, site), loaded from TOML.

Parsing and validation are pure (`parse_profile`); finding files on disk is the only I/O
(`find_profile`, `load_profile`, `discover`). Every problem is a one-line `UserError` that names
the file, the dotted field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterctl.planning.calibration import Calibration
from clusterctl.planning.container_fields import Container as Container  # re-exported: its own module
from clusterctl.planning.cost import Cost
from clusterctl.planning.job_env import CODE_LOADING_ENV as CODE_LOADING_ENV  # re-exported
from clusterctl.planning.job_env import JOB_ENV_ALLOWED as JOB_ENV_ALLOWED
from clusterctl.planning.job_env import env_refusals
from clusterctl.planning.nccl_env import HCA_DOC, HCA_NAME
from clusterctl.planning.nccl_env import comm_env as comm_env  # backends and tests import it from here
from clusterctl.planning.slurm_fields import (
    MAX_EXTRA,
    SAFE_VALUE,
    SAFE_VALUE_DOC,
    TIME_FORMATS,
    check_time,
    extra_problem,
    signal_delay_problem,
)
from clusterctl.planning.slurm_fields import slurm_time_to_minutes as slurm_time_to_minutes  # tests import it here
from clusterctl.specs import EXECUTORS
from vltrain.common import safe_read
from vltrain.common.errors import UserError
from vltrain.common.schema import build, field, parse_toml

# Names that reach sbatch lines and shell environments: a conservative subset of what Slurm accepts.
SLURM_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
SLURM_NAME_DOC = "1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
ENV_NAME = r"[A-Z_][A-Z0-9_]{0,127}"


def _check_country(code: str) -> str | None:
    if not re.fullmatch(r"[A-Z]{3}", code):
        return f"{code!r} is not an ISO 3166 alpha-3 code"
    from clusterctl.planning.iso3166 import ALPHA_3  # pycountry's list, without importing it (~47 ms)

    if code not in ALPHA_3:
        return f"{code!r} is not an ISO 3166 country"
    return None


def _check_env(env: dict[str, str]) -> str | None:
    for k, v in env.items():
        if not re.fullmatch(ENV_NAME, k):
            return f"{k!r} is not an environment variable name"
        if not re.fullmatch(SAFE_VALUE, v):
            return f"{k}={v!r} has characters that are not allowed"
    return None


def code_loading_env(profile: ClusterProfile) -> list[str]:
    """The profile's `interconnect.env` names outside the allow-list (pure)."""
    return [k for k, _ in env_refusals(profile.interconnect.env)]


def check_job_env(profile: ClusterProfile, where: str, source: str, allow_env: bool = False) -> None:
    """Refuse, in one line naming the first variable and why, a profile whose `interconnect.env`
    sets a variable outside JOB_ENV_ALLOWED, unless `allow_env` (--allow-env: the user read it).
    `where`: the file the line names; `source`: where the profile came from (origin()'s words, or
    'a run directory'). Submit calls it for profiles that are not shipped or the user's own; resume
    and retry call it on the run directory's profile.json, which anyone who can write there can edit."""
    refused = env_refusals(profile.interconnect.env)
    if not refused or allow_env:
        return
    k, why = refused[0]
    more = f" (and {len(refused) - 1} more: {', '.join(n for n, _ in refused[1:])})" if len(refused) > 1 else ""
    raise UserError(
        f"{where}: interconnect.env: {k} {why}, and this profile comes from {source}{more}; allowed: "
        f"the NCCL/GLOO/UCX/Slurm/trainer variables of docs/reliability.md, the profile in {user_dir()}, or --allow-env"
    )


@dataclass(frozen=True, kw_only=True)
class Nodes:
    count: int = field("nodes in the job", min=1, max=100_000)
    gpus_per_node: int = field("GPUs per node = tasks per node", min=1, max=64)
    cpus_per_node: int = field("CPU cores per node", min=1, max=4096)
    memory_gib: int = field("host memory per node (GiB)", min=1, max=65_536)
    non_gpu_power_w: float | None = field(
        "power of a node besides its GPUs at full load (CPUs, memory, NICs, fans; W); default from the "
        "GPU model (NODE_POWER), an assumption",
        default=None,
        min=0,
        max=100_000,
    )


@dataclass(frozen=True, kw_only=True)
class Gpu:
    model: str = field(
        "GPU model name", pattern=r"[A-Za-z0-9 _.()\-]{1,64}", allowed="1-64 letters, digits, spaces and _.()-"
    )
    kind: str = field("what the trainer runs on", choices=("cuda", "cpu"), default="cuda")
    memory_gib: float = field("memory per GPU (GiB)", min=1, max=4096)
    peak_bf16_tflops: float = field("dense bf16 peak per GPU (TFLOP/s)", min=0.01, max=100_000)
    power_w: float = field("board power per GPU (W)", min=1, max=5_000)
    usable_memory_gib: float | None = field(
        "memory PyTorch can allocate per GPU (GiB; torch.cuda.mem_get_info's total); default from the GPU "
        "model (docs/planning.md), else 98.5% of memory_gib",
        default=None,
        min=0.5,
        max=4096,
    )

    @property
    def capacity_gib(self) -> float:
        """What the planner fits a step into: the profile's usable_memory_gib, else the GPU model's
        measured figure (USABLE_MEMORY_GIB), else USABLE_SHARE of memory_gib; the whole memory_gib on CPUs."""
        if self.usable_memory_gib is not None:
            return min(self.usable_memory_gib, self.memory_gib)
        if self.kind != "cuda":
            return self.memory_gib
        name = self.model.upper().replace("-", " ").replace("_", " ")
        for rx, gib in USABLE_MEMORY_GIB:
            if re.search(rx, name) and gib <= self.memory_gib:
                return gib
        return round(self.memory_gib * USABLE_SHARE, 2)


# What PyTorch reports as a GPU's total memory (torch.cuda.get_device_properties().total_memory, the
# "total capacity" of its out-of-memory message): the board's memory less what the driver and ECC
# reserve. Figures as PyTorch prints them on these boards; first match wins.
USABLE_MEMORY_GIB: tuple[tuple[str, float], ...] = (
    (r"\bH200\b", 139.8),
    (r"\bH100\b.*\bNVL\b|\bH100\b.*\b94 ?GB\b", 93.0),
    (r"\bH100\b", 79.1),
    (r"\bA100\b.*\b80 ?GB\b", 79.15),
    (r"\bA100\b.*\b40 ?GB\b", 39.39),
    (r"\bV100\b.*\b32 ?GB\b", 31.74),
    (r"\bV100\b", 15.77),
)
USABLE_SHARE = 0.985  # an unlisted CUDA GPU: A100-80GB's 79.15 of 80, rounded down


# Power of a node besides its GPUs, per GPU, when the profile states none: the vendor's maximum system
# power less its GPUs' board power, over the GPUs (both at full load, as GPU energy is counted). An
# assumption, said wherever it is used; first match wins.
#   DGX A100: 6.5 kW max, 8 x 400 W GPUs -> (6,500 - 3,200) / 8 = 412.5 W (DGX A100 datasheet)
#   DGX H100 / H200: 10.2 kW max, 8 x 700 W -> (10,200 - 5,600) / 8 = 575 W (DGX H100/H200 datasheets)
#   DGX-1 V100: 3.5 kW max, 8 x 300 W -> (3,500 - 2,400) / 8 = 137.5 W (DGX-1 datasheet)
NODE_POWER: tuple[tuple[str, float], ...] = ((r"\bH[12]00\b", 575.0), (r"\bA100\b", 412.5), (r"\bV100\b", 137.5))


def node_power(nodes: Nodes, gpu: Gpu) -> tuple[float, str]:
    """(W per node besides the GPUs, where the figure comes from): the profile's nodes.non_gpu_power_w,
    else NODE_POWER's share per GPU x gpus_per_node (an assumption, and the source says so)."""
    if nodes.non_gpu_power_w is not None:
        return nodes.non_gpu_power_w, "profile"
    if gpu.kind != "cuda":
        return 0.0, "not counted: a CPU profile"
    name = gpu.model.upper().replace("-", " ").replace("_", " ")
    for rx, per_gpu in NODE_POWER:
        if m := re.search(rx, name):
            return per_gpu * nodes.gpus_per_node, f"default for {m[0]}, assumed"
    return 0.0, f"not counted: no default for {gpu.model}; set nodes.non_gpu_power_w"


@dataclass(frozen=True, kw_only=True)
class Interconnect:
    intra_node: str = field("fabric between GPUs of a node", choices=("nvlink", "pcie", "none"))
    inter_node: str = field("fabric between nodes", choices=("infiniband", "roce", "ethernet", "none"))
    ib_hcas: tuple[str, ...] | None = field(
        "the HCAs NCCL uses, exactly (NCCL_IB_HCA=<=list>)", default=None, pattern=HCA_NAME, allowed=HCA_DOC
    )
    socket_ifname: str | None = field(
        "NCCL/GLOO_SOCKET_IFNAME",
        default=None,
        pattern=r"[A-Za-z0-9_.^,=\-]{1,64}",
        allowed="an interface name list such as 'ib0' or '^lo,docker'",
    )
    intra_node_gb_s: float | None = field(
        "GPU-to-GPU bandwidth inside a node in GB/s (bytes), per GPU and direction; "
        "default from intra_node and the GPU (docs/planning.md)",
        default=None,
        min=0.1,
        max=100_000,
    )
    inter_node_gb_s: float | None = field(
        "bandwidth between nodes in GB/s (bytes), per node and direction, all NICs together "
        "(8 x 200 Gb/s = 200); default from inter_node and the GPU (docs/planning.md)",
        default=None,
        min=0.01,
        max=100_000,
    )
    env: dict[str, str] = field(
        "extra environment for every rank",
        default_factory=dict,
        check=_check_env,
        allowed=f"NAME = value with NAME matching {ENV_NAME} and values of {SAFE_VALUE_DOC}",
    )


@dataclass(frozen=True, kw_only=True)
class Slurm:
    partition: str | None = field("Slurm partition", default=None, pattern=SLURM_NAME, allowed=SLURM_NAME_DOC)
    account: str | None = field("Slurm account", default=None, pattern=SLURM_NAME, allowed=SLURM_NAME_DOC)
    qos: str | None = field("Slurm QOS", default=None, pattern=SLURM_NAME, allowed=SLURM_NAME_DOC)
    constraint: str | None = field(
        "node features",
        default=None,
        pattern=r"[A-Za-z0-9_.&|,\[\]*\-]{1,128}",
        allowed="feature names joined by & | , with [] and *",
    )
    time_limit: str = field("wall-clock limit per job", check=check_time, allowed=TIME_FORMATS)
    signal_delay_s: int = field(
        "seconds before the limit at which USR2 asks for a checkpoint (at most half the limit less 60 s)",
        default=120,
        min=10,
        max=3600,
    )
    exclusive: bool = field("whole nodes", default=True)
    mem_gib: int | None = field(
        "--mem per node in GiB (none: 0, all of a node's memory, with exclusive; else nodes.memory_gib)",
        default=None,
        min=0,
        max=65_536,
    )
    # How long the trainer waits before it calls a peer lost (exit 75: clusterctl requeues the run).
    startup_timeout_s: int = field(
        "collective time-out until the first step (rendezvous, model build, checkpoint load)",
        default=1800,
        min=60,
        max=86400,
    )
    collective_timeout_s: int = field(
        "collective (NCCL) time-out once steps run: a lost peer shows this fast", default=600, min=30, max=86400
    )
    stall_timeout_s: int = field(
        "no optimizer step for this long on a rank (hung outside a collective): exit 75",
        default=1800,
        min=60,
        max=86400,
    )
    max_excluded_nodes: int = field(
        "nodes a run's retries may exclude in all (the nodes its failed jobs died on; oldest dropped first; "
        "0: never exclude)",
        default=8,
        min=0,
        max=4096,
    )
    extra: dict[str, str] = field(
        "more sbatch long options",
        default_factory=dict,
        check=extra_problem,
        max_items=MAX_EXTRA,
        allowed=f"option = value with option a lower-case sbatch long option not managed by clusterctl, values of {SAFE_VALUE_DOC}",
    )


SETUP_LINE = r"[^\x00-\x1f\x7f]{1,1000}"


@dataclass(frozen=True, kw_only=True)
class Storage:
    """Where checkpoints go (the run directory's filesystem): how fast a node can write to it.

    The planner compares the time to write a checkpoint with slurm.signal_delay_s
    (clusterctl.planning.checkpoint); the defaults are deliberately modest (docs/planning.md)."""

    write_gb_s_per_node: float = field(
        "checkpoint write bandwidth of one node to the run directory's filesystem, GB/s (bytes)",
        default=2.0,
        min=0.001,
        max=10_000,
    )
    write_gb_s_total: float | None = field(
        "the filesystem's aggregate write bandwidth, GB/s (none: the nodes' sum)", default=None, min=0.001, max=1e6
    )


@dataclass(frozen=True, kw_only=True)
class Site:
    country_iso: str = field(
        "ISO 3166 alpha-3 country of the site",
        check=_check_country,
        allowed="an ISO 3166 alpha-3 code such as FRA, JPN, SGP",
    )
    pue: float = field("power usage effectiveness", default=1.2, min=1.0, max=3.0)
    carbon_intensity_g_per_kwh: float | None = field("fixed grid intensity (gCO2eq/kWh)", default=None, min=0, max=2000)


@dataclass(frozen=True, kw_only=True)
class ClusterProfile:
    name: str = field(
        "profile name", pattern=r"[a-z0-9][a-z0-9_\-]{0,63}", allowed="1-64 lower-case letters, digits, '_' and '-'"
    )
    description: str = field("one paragraph", pattern=r"[^\n\r]{1,2000}", allowed="one line of up to 2000 characters")
    executor: str = field("where jobs run (a backend in clusterctl/backends)", choices=EXECUTORS)
    nodes: Nodes = field()
    gpu: Gpu = field()
    interconnect: Interconnect = field()
    site: Site = field()
    slurm: Slurm | None = field("Slurm settings (required with executor = 'slurm')", default=None)
    storage: Storage = field(
        "the checkpoint filesystem (optional; defaults in docs/planning.md)", default_factory=Storage
    )
    container: Container | None = field("the container every rank runs in (optional)", default=None)
    cost: Cost | None = field(
        "prices that turn GPU-hours and energy into money (optional; none: no money shown)", default=None
    )
    setup: tuple[str, ...] = field(
        "shell lines the job runs on the host before the trainer and clusterctl's exports, e.g. 'module load cuda/12.4'",
        default=(),
        pattern=SETUP_LINE,
        allowed="lines of 1-1000 characters without control characters",
        max_items=64,
    )
    seed: str | None = field(
        "the seed setup this profile reproduces", default=None, pattern=r"[0-9]{3}", allowed="a three-digit seed number"
    )
    recipe: str | None = field(
        "the train config `submit` runs when no --config is given (a shipped recipe's name, or a path)",
        default=None,
        pattern=r"[A-Za-z0-9_.\-/]{1,200}",
        allowed="a recipe name such as seed-002 (clusterctl recipes lists them) or a path to a .toml file",
    )
    calibration: Calibration | None = field("measured rates (`clusterctl profiles calibrate`)", default=None)

    # Derived figures -----------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.nodes.count * self.nodes.gpus_per_node

    @property
    def peak_bf16_pflops(self) -> float:
        return self.world_size * self.gpu.peak_bf16_tflops / 1000

    @property
    def gpu_power_kw(self) -> float:
        return self.world_size * self.gpu.power_w / 1000

    @property
    def total_gpu_memory_gib(self) -> float:
        return self.world_size * self.gpu.memory_gib

    @property
    def time_limit_min(self) -> float | None:
        return slurm_time_to_minutes(self.slurm.time_limit) if self.slurm else None

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.gpu.kind == "cuda" else "gloo"

    def derived(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "peak_bf16_pflops": round(self.peak_bf16_pflops, 3),
            "gpu_power_kw": round(self.gpu_power_kw, 3),
            "total_gpu_memory_gib": self.total_gpu_memory_gib,
            "dist_backend": self.dist_backend,
            "comm_env": comm_env(self),
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"derived": self.derived()}


def parse_profile(data: dict[str, Any], where: str) -> ClusterProfile:
    """Validate a parsed TOML table as a profile (pure)."""
    profile: ClusterProfile = build(ClusterProfile, data, where)
    if profile.executor == "slurm" and profile.slurm is None:
        raise UserError(
            f"{where}: slurm: missing; allowed: a [slurm] table with at least time_limit (executor = 'slurm')"
        )
    if profile.slurm is not None and (
        problem := signal_delay_problem(profile.slurm.time_limit, profile.slurm.signal_delay_s)
    ):
        raise UserError(f"{where}: slurm.signal_delay_s: {problem}")
    if profile.cost is not None and (problem := profile.cost.problem()):
        raise UserError(f"{where}: cost: {problem}")
    if profile.executor == "local" and profile.nodes.count != 1:
        raise UserError(
            f"{where}: nodes.count: {profile.nodes.count} is out of range; allowed: 1 with executor = 'local'"
        )
    return profile


PROFILE_MAX = 1 << 20  # bytes of a profile file read (shipped ones are ~2 KB)


def read_profile(path: Path) -> ClusterProfile:
    """Read and validate one profile file."""
    where = str(path)
    try:
        text = safe_read.read_text_capped(path, PROFILE_MAX)  # a FIFO would block, /dev/zero never end
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except safe_read.NotReadable as e:
        raise UserError(f"{e}; allowed: a regular file of at most {PROFILE_MAX >> 20} MiB") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: cannot read: {e}") from None
    profile = parse_profile(parse_toml(text, where), where)  # nesting bounded as in train configs
    if profile.name != path.stem:
        raise UserError(f"{where}: name: {profile.name!r} differs from the file name; allowed: {path.stem!r}")
    return profile


def check_job_name(name: str) -> str:
    """A run's name as Slurm takes a job name (SLURM_NAME), or a one-line error."""
    if not re.fullmatch(SLURM_NAME, name):
        raise UserError(f"--name: {name!r} is not a valid job name; allowed: {SLURM_NAME_DOC}")
    return name


def builtin_dir() -> Path:
    """The profiles shipped with clusterctl: `clusterctl/cluster_profiles`, a link to the repository's
    cluster_profiles/ in a checkout, a real directory in an installed wheel."""
    return Path(__file__).resolve().parents[1] / "cluster_profiles"


def search_dirs(cwd: Path | None = None) -> list[Path]:
    """Where profiles are looked up by name, first match wins."""
    return list(_search(cwd))


def _search(cwd: Path | None = None) -> Iterator[Path]:
    """search_dirs, one at a time (duplicates left out): a lookup that stops at the working
    directory's profiles never asks platformdirs for the user's config dir (~4 ms to import)."""
    seen: set[Path] = set()

    def dirs() -> Iterator[Path]:
        yield (cwd or Path.cwd()) / "cluster_profiles"
        yield from (Path(d) for d in os.environ.get("CLUSTERCTL_PROFILES", "").split(os.pathsep) if d)
        yield user_dir()
        yield builtin_dir()

    for d in dirs():
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            yield d


def find_profile(name_or_path: str, flag: str = "--profile") -> Path:
    """A profile's file, by path (contains '/' or ends in .toml) or by name in the search dirs."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        return Path(name_or_path)
    if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,63}", name_or_path):
        raise UserError(
            f"{flag}: {name_or_path!r} is not a profile name; allowed: lower-case letters, digits, '_', '-', or a path to a .toml file"
        )
    for d in _search():
        p = d / f"{name_or_path}.toml"
        if p.is_file():
            return p
    dirs = search_dirs()
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})
    raise UserError(
        f"{flag}: no profile named {name_or_path!r}; allowed: {', '.join(known) or 'none found'} (searched {', '.join(map(str, dirs))})"
    )


def user_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir("clusterctl")) / "profiles"


def origin(path: Path, cwd: Path | None = None) -> str:
    """Where a profile file came from, for every line that names it: 'shipped', 'your config
    (~/.config/clusterctl/profiles)', 'the working directory (./cluster_profiles)', '$CLUSTERCTL_PROFILES',
    or the path it was given by; with ', shadowing the shipped one' when a shipped profile has its name."""
    where = path.resolve()
    cwd = cwd or Path.cwd()

    def places() -> Iterator[tuple[Path, str]]:  # in this order, each made when reached (user_dir: platformdirs)
        yield builtin_dir(), "shipped"
        yield user_dir(), f"your config ({user_dir()})"
        yield cwd / "cluster_profiles", f"the working directory ({cwd / 'cluster_profiles'})"
        for d in os.environ.get("CLUSTERCTL_PROFILES", "").split(os.pathsep):
            if d:
                yield Path(d), f"$CLUSTERCTL_PROFILES ({d})"

    said = f"the path {path}"
    for d, words in places():
        if d.is_dir() and where.parent == d.resolve():
            said = words
            break
    if said != "shipped" and (builtin_dir() / path.name).is_file() and (builtin_dir() / path.name).resolve() != where:
        said += ", shadowing the shipped one"
    return said


def load_profile(name_or_path: str, flag: str = "--profile", allow_env: bool = False) -> ClusterProfile:
    """Find and validate a profile; `flag` names the option in error messages. A profile whose
    interconnect.env sets a variable outside the allow-list (job_env.JOB_ENV_ALLOWED) is refused
    unless it is shipped or in the user's own config directory, or `allow_env` (--allow-env) says
    the user read it."""
    path = find_profile(name_or_path, flag)
    profile = read_profile(path)
    if profile.interconnect.env and not allow_env:
        where = origin(path)
        if not (where == "shipped" or where.startswith("your config")):
            check_job_env(profile, str(path), where)
    return profile


def profile_origin(name_or_path: str, flag: str = "--profile") -> str:
    return origin(find_profile(name_or_path, flag))


def discover() -> list[tuple[Path, bool]]:
    """Every profile file in the search dirs, with whether an earlier dir shadows it."""
    seen: set[str] = set()
    out = []
    for d in search_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.toml")):
            out.append((p, p.stem in seen))
            seen.add(p.stem)
    return out


_FABRIC = {
    "nvlink": "NVLink",
    "pcie": "PCIe",
    "infiniband": "InfiniBand",
    "roce": "RoCE",
    "ethernet": "Ethernet",
    "none": "-",
}
_FABRIC_SHORT = _FABRIC | {"infiniband": "IB", "ethernet": "Eth"}


def fabric(p: ClusterProfile, short: bool = False) -> str:
    """'NVLink + InfiniBand' (short: 'NVLink + IB')."""
    names = _FABRIC_SHORT if short else _FABRIC
    return f"{names[p.interconnect.intra_node]} + {names[p.interconnect.inter_node]}"


def profile_rows() -> list[dict[str, Any]]:
    """Every profile found, in search order, as the rows of `profiles list --json`; an invalid file
    is a row with its one-line error."""
    rows: list[dict[str, Any]] = []
    for path, shadowed in discover():
        try:
            p = read_profile(path)
        except UserError as e:
            rows.append({"name": path.stem, "path": str(path), "shadowed": shadowed, "valid": False, "error": str(e)})
            continue
        rows.append(
            {
                "name": p.name,
                "path": str(path),
                "shadowed": shadowed,
                "valid": True,
                "executor": p.executor,
                "nodes": p.nodes.count,
                "gpus_per_node": p.nodes.gpus_per_node,
                "world_size": p.world_size,
                "gpu": p.gpu.model,
                "gpu_memory_gib": p.gpu.memory_gib,
                "fabric": fabric(p),
                "fabric_short": fabric(p, True),
                "country": p.site.country_iso,
                "seed": p.seed,
                "recipe": p.recipe,
            }
        )
    return rows
