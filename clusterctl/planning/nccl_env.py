"""The job environment that follows from a cluster profile (pure): NCCL/gloo settings for its fabric,
PyTorch's NCCL flight recorder, the CUDA caching allocator.

HCAs are listed exactly. NCCL_IB_HCA matches each name in its list as a prefix unless the list starts
with '=' (NCCL's environment-variable docs): `mlx5` picks every mlx5 device, storage ports included,
and `mlx5_1` picks mlx5_10 to mlx5_17 as well. A profile lists the devices (`ibv_devinfo -l`) and
comm_env writes `=mlx5_0,mlx5_1,...`; a bare prefix in a profile is refused (profiles.Interconnect).
A profile that really wants a prefix sets NCCL_IB_HCA in interconnect.env, which comes last and wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clusterctl.planning.profiles import ClusterProfile

# An HCA as the kernel names it (mlx5_0, ibp12s0, bnxt_re0, rocep1s0f0, irdma1), optionally with
# :port; it ends in its index, and a Mellanox driver prefix alone (mlx4, mlx5) is refused.
HCA_NAME = r"(?!mlx\d+(?::|$))[A-Za-z][A-Za-z0-9_.\-]{0,62}[0-9](?::[0-9]{1,3})?"
HCA_DOC = (
    "a list of exact HCA names (ibv_devinfo -l), each with an optional :port, e.g. ['mlx5_0', 'mlx5_1:1']; "
    "not a prefix such as 'mlx5', which NCCL matches against every mlx5_* device (mlx5_10 too)"
)
TRACE_BUFFER_SIZE = 2000  # flight recorder entries per rank (torch's default when enabled)
TRACE_FILE_PREFIX = "nccl_trace_rank_"  # in the run directory; torch appends the global rank


def ib_hca_value(hcas: tuple[str, ...]) -> str:
    """NCCL_IB_HCA's exact-match form of a profile's HCA list."""
    return "=" + ",".join(hcas)


def comm_env(p: ClusterProfile) -> dict[str, str]:
    """The NCCL/gloo environment that follows from the profile's fabric; on CUDA also the flight
    recorder (a dump of each rank's last collectives when the NCCL watchdog times out: which rank
    hung where; the file's place is `flight_recorder_env`) and expandable segments for the caching
    allocator (less fragmentation: reserved stays nearer allocated). interconnect.env wins."""
    ic = p.interconnect
    env: dict[str, str] = {}
    if p.gpu.kind == "cuda":
        if ic.intra_node == "nvlink":
            env["NCCL_P2P_LEVEL"] = "NVL"
        elif ic.intra_node == "pcie":
            env["NCCL_P2P_LEVEL"] = "PHB"
        if ic.inter_node in ("infiniband", "roce"):
            env["NCCL_IB_DISABLE"] = "0"
            if ic.ib_hcas:
                env["NCCL_IB_HCA"] = ib_hca_value(ic.ib_hcas)
            if ic.inter_node == "roce":
                env["NCCL_IB_GID_INDEX"] = "3"
        elif ic.inter_node == "ethernet":
            env["NCCL_IB_DISABLE"] = "1"
        if ic.socket_ifname:
            env["NCCL_SOCKET_IFNAME"] = ic.socket_ifname
        env["NCCL_ASYNC_ERROR_HANDLING"] = "1"
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        env["TORCH_NCCL_TRACE_BUFFER_SIZE"] = str(TRACE_BUFFER_SIZE)
        env["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    elif ic.socket_ifname:
        env["GLOO_SOCKET_IFNAME"] = ic.socket_ifname
    env.update(ic.env)
    return env


def flight_recorder_env(p: ClusterProfile, run_dir: Path | str) -> dict[str, str]:
    """Where the flight recorder dumps (TORCH_NCCL_DEBUG_INFO_TEMP_FILE: a prefix, one file per rank):
    the run directory, which outlives the job and is on a shared filesystem, not the node's /tmp
    (torch's default). Nothing off CUDA, or when interconnect.env sets it."""
    if p.gpu.kind != "cuda" or "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" in p.interconnect.env:
        return {}
    return {"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": f"{Path(run_dir) / TRACE_FILE_PREFIX}"}
