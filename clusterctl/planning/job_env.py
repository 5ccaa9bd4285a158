"""The job environment a cluster profile may set (pure): an allow-list of names known to load no code.

A profile's `interconnect.env` reaches every rank of the job. A profile found in the working
directory (a cloned repository's ./cluster_profiles) is not the user's own: a variable that makes a
process load a library, a plugin, a module or a config file, or run a program (OPENSSL_CONF,
SLURM_TASK_PROLOG, NCCL_CONF_FILE, LD_*, PYTHON*...), would run that repository's code on the cluster
under the user's account. A deny-list always has holes, so this is an allow-list (JOB_ENV_ALLOWED);
CODE_LOADING_ENV says why the usual suspects are refused. profiles.check_job_env applies it.
"""

from __future__ import annotations

from collections.abc import Mapping

from vltrain import rundir  # the trainer's variable names are spelled there only

# The job environment a profile may set without --allow-env: an ALLOW-list of names, each known to
# load no code (no library, plugin, module, script or config file that names one) and to write no
# file of its choosing. A profile in a cloned repository's ./cluster_profiles would otherwise run
# that repository's code on the cluster under your account. Everything else needs --allow-env, or
# the profile in your own config directory (or shipped). docs/reliability.md lists them.
JOB_ENV_ALLOWED = frozenset(
    {
        # the trainer's own tuning (vltrain reads these; clusterctl sets the rest of its JobEnv itself)
        rundir.GRAD_REDUCTION,
        rundir.ENERGY_FLUSH_S,
        rundir.DIST_TIMEOUT_S,
        rundir.STEP_DIST_TIMEOUT_S,
        rundir.STALL_TIMEOUT_S,
        # Slurm: task placement and binding among Slurm's own choices (srun reads them)
        "SLURM_CPU_BIND",
        "SLURM_MEM_BIND",
        "SLURM_GPU_BIND",
        "SLURM_DISTRIBUTION",
        "SLURM_HINT",
        "SLURM_MPI_TYPE",
        "SLURM_NETWORK",
        "SLURM_CPU_FREQ_REQ",
        "SLURM_UNBUFFEREDIO",
        "SRUN_CPUS_PER_TASK",
        # NCCL tuning (NCCL's environment-variable docs): numbers, names and interface/HCA lists
        "NCCL_DEBUG",
        "NCCL_DEBUG_SUBSYS",
        "NCCL_IB_HCA",
        "NCCL_IB_DISABLE",
        "NCCL_IB_GID_INDEX",
        "NCCL_IB_ROCE_VERSION_NUM",
        "NCCL_IB_TIMEOUT",
        "NCCL_IB_RETRY_CNT",
        "NCCL_IB_SL",
        "NCCL_IB_TC",
        "NCCL_IB_QPS_PER_CONNECTION",
        "NCCL_IB_SPLIT_DATA_ON_QPS",
        "NCCL_IB_PCI_RELAXED_ORDERING",
        "NCCL_IB_ADAPTIVE_ROUTING",
        "NCCL_IB_CUDA_SUPPORT",
        "NCCL_NET",
        "NCCL_NET_GDR_LEVEL",
        "NCCL_NET_GDR_READ",
        "NCCL_NET_SHARED_BUFFERS",
        "NCCL_SOCKET_IFNAME",
        "NCCL_SOCKET_FAMILY",
        "NCCL_SOCKET_NTHREADS",
        "NCCL_NSOCKS_PERTHREAD",
        "NCCL_P2P_LEVEL",
        "NCCL_P2P_DISABLE",
        "NCCL_SHM_DISABLE",
        "NCCL_CUMEM_ENABLE",
        "NCCL_NVLS_ENABLE",
        "NCCL_COLLNET_ENABLE",
        "NCCL_PXN_DISABLE",
        "NCCL_CROSS_NIC",
        "NCCL_ALGO",
        "NCCL_PROTO",
        "NCCL_MIN_NCHANNELS",
        "NCCL_MAX_NCHANNELS",
        "NCCL_MIN_CTAS",
        "NCCL_MAX_CTAS",
        "NCCL_BUFFSIZE",
        "NCCL_NTHREADS",
        "NCCL_LAUNCH_MODE",
        "NCCL_IGNORE_CPU_AFFINITY",
        "NCCL_ASYNC_ERROR_HANDLING",
        "NCCL_TOPO_FILE",  # an XML description of the node, read as data
        # gloo and UCX transports
        "GLOO_SOCKET_IFNAME",
        "GLOO_DEVICE_TRANSPORT",
        "UCX_TLS",
        "UCX_NET_DEVICES",
        "UCX_IB_GID_INDEX",
        "UCX_IB_SL",
        "UCX_IB_PCI_RELAXED_ORDERING",
        "UCX_RNDV_THRESH",
        "UCX_RNDV_SCHEME",
        "UCX_MAX_RNDV_RAILS",
        "UCX_MEMTYPE_CACHE",
        "UCX_UNIFIED_MODE",
        "UCX_LOG_LEVEL",
        # torch.distributed and the CUDA runtime
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "TORCH_NCCL_BLOCKING_WAIT",
        "TORCH_NCCL_TRACE_BUFFER_SIZE",
        "TORCH_NCCL_DUMP_ON_TIMEOUT",
        "TORCH_NCCL_ENABLE_MONITORING",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC",
        "TORCH_NCCL_AVOID_RECORD_STREAMS",
        "TORCH_NCCL_HIGH_PRIORITY",
        "TORCH_DISTRIBUTED_DEBUG",
        "TORCH_CPP_LOG_LEVEL",
        "TORCH_SHOW_CPP_STACKTRACES",
        "PYTORCH_CUDA_ALLOC_CONF",
        "CUDA_DEVICE_MAX_CONNECTIONS",
        "CUDA_DEVICE_ORDER",
        "CUDA_LAUNCH_BLOCKING",
        "CUDA_MODULE_LOADING",
        # threads
        "OMP_NUM_THREADS",
        "OMP_PROC_BIND",
        "OMP_PLACES",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
    }
)

# Why the variables most often tried are refused (the refusal says it); any other name outside
# JOB_ENV_ALLOWED is refused as not known to be safe. Prefixes: LD_* (the dynamic loader), PYTHON*.
CODE_LOADING_ENV = {
    "LD_PRELOAD": "preloads a shared library into every process",
    "LD_LIBRARY_PATH": "chooses the shared libraries every process loads",
    "LD_AUDIT": "loads an audit library into every process",
    "PYTHONPATH": "puts modules first on Python's import path",
    "PYTHONSTARTUP": "runs a file when Python starts",
    "PYTHONHOME": "replaces Python's standard library",
    "PYTHONUSERBASE": "adds a site directory whose .pth files run code",
    "PYTHONWARNINGS": "imports the modules its filters name",
    "PYTHONBREAKPOINT": "imports and calls a function",
    "PYTHONSAFEPATH": "is clusterctl's to set (jobs never import from their working directory)",
    "BASH_ENV": "runs a file in every non-interactive bash",
    "ENV": "runs a file in every sh",
    "PROMPT_COMMAND": "runs a command in every bash",
    "PATH": "chooses which python and srun run",
    "HOME": "chooses the start-up files and user site-packages every tool reads",
    "XDG_CONFIG_HOME": "chooses the configuration files every tool reads",
    "OPENSSL_CONF": "loads the engines and providers its file names when hashlib or ssl starts",
    "OPENSSL_MODULES": "loads OpenSSL providers from its directory",
    "OPENSSL_ENGINES": "loads OpenSSL engines from its directory",
    "GCONV_PATH": "loads glibc's character-set conversion modules from its directories",
    "SLURM_TASK_PROLOG": "is a program srun runs before every task",
    "SLURM_TASK_EPILOG": "is a program srun runs after every task",
    "SLURM_PROLOG": "is a program srun runs before the step",
    "SLURM_EPILOG": "is a program srun runs after the step",
    "SRUN_CONTAINER": "runs every task in the OCI container bundle it names",
    "SLURM_CONTAINER": "runs every task in the OCI container bundle it names",
    "SLURM_EXPORT_ENV": "chooses which environment the tasks get",
    "NCCL_CONF_FILE": "sets any NCCL variable from a file, plugins included",
    "NCCL_NET_PLUGIN": "loads a network plugin library into NCCL",
    "NCCL_TUNER_PLUGIN": "loads a tuner plugin library into NCCL",
    "NCCL_PROFILER_PLUGIN": "loads a profiler plugin library into NCCL",
    "NCCL_DEBUG_FILE": "writes NCCL's log over any file it names (a shell start-up file too)",
    "NCCL_TOPO_DUMP_FILE": "writes over any file it names",
    "NCCL_GRAPH_DUMP_FILE": "writes over any file it names",
    "OMP_TOOL_LIBRARIES": "loads OpenMP tool libraries into every process",
    "OMP_TOOL": "turns on the OpenMP tool libraries OMP_TOOL_LIBRARIES names",
    "UCX_MODULE_DIR": "loads UCX modules from its directory",
    "UCX_LOG_FILE": "writes over any file it names",
    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "writes the flight recorder's dumps wherever it names (clusterctl puts them in the run directory)",
    "CUDA_INJECTION64_PATH": "loads an injection library into the CUDA runtime",
    "TORCH_EXTENSIONS_DIR": "loads the compiled extensions found in it",
    "TRITON_CACHE_DIR": "runs the compiled kernels cached in it",
    "TORCHINDUCTOR_CACHE_DIR": "runs the compiled code cached in it",
}
NOT_LISTED = "is not on the allow-list of variables known to load no code (docs/reliability.md)"


def env_refusals(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(name, why) for each variable of a job environment outside JOB_ENV_ALLOWED (pure): those known
    to load code first, then the rest, each group by name."""
    out = []
    for k in sorted(env):
        if k in JOB_ENV_ALLOWED:
            continue
        if k in CODE_LOADING_ENV:
            why = CODE_LOADING_ENV[k]
        elif k.startswith("LD_"):
            why = "changes what the dynamic loader loads into every process"
        elif k.startswith("PYTHON"):
            why = "changes how every Python process starts"
        elif k.startswith("SLURM_SPANK_"):
            why = "passes an option to a SPANK plugin (a container image, for one)"
        else:
            why = NOT_LISTED
        out.append((k, why))
    return sorted(out, key=lambda kw: (kw[1] == NOT_LISTED, kw[0]))  # the ones known to load code first
