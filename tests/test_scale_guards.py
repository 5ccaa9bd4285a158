"""CPU guards for what only a GPU cluster would show (issue 14): each test fails on the trainer as it
was (collectives on CPU tensors, the model built in host memory, NCCL aborts not retried, no srun
kill-on-bad-exit, CPU binding lost, a CUDA profile silently on CPU, checkpoint files not fsynced by
their writers, every rank reading the whole module file, no data-loader workers on GPUs)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, deadline, run_cli

COLLECTIVES = {
    "all_reduce",
    "broadcast",
    "barrier",
    "broadcast_object_list",
    "all_gather",
    "all_gather_object",
    "reduce",
    "reduce_scatter",
    "all_to_all",
    "gather",
    "scatter",
    "send",
    "recv",
}


# --- 1. collectives on the process group's device ------------------------------------------------------
def test_no_trainer_module_calls_a_collective_but_through_the_helper():
    """How this is checked honestly without a GPU: (a) no vltrain module but vltrain/collectives.py
    calls a torch.distributed collective (AST), so every tensor the trainer sends passes the helper;
    (b) the helper puts every tensor on the device it is bound to (a recorder, bound to the meta
    device: any non-CPU device shows the same); (c) under NCCL it is bound to the rank's GPU."""
    offenders = []
    for path in (REPO / "vltrain").rglob("*.py"):
        if path.name == "collectives.py" or path.parent.name == "parallel":  # model parallelism: guarded below
            continue
        if path.name == "calibrate.py":  # times gloo's own collectives on CPU ranks (a CPU profile's calibration job)
            continue
        if path.name == "zero_collectives.py":  # DeepSpeed's own step collectives (deepspeed.comm, on the tensors
            continue  # DeepSpeed placed), issued together on gloo only: test_zero_collectives checks NCCL is refused
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                owner = ast.unparse(node.func.value)
                if owner in ("dist", "torch.distributed", "torch_dist"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{node.func.attr}")
    assert offenders == []


TENSOR_FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "zeros_like"}


def test_model_parallel_code_makes_every_tensor_on_a_device_it_names():
    """vltrain/parallel (FSDP, tensor and pipeline parallel) issues its own collectives over mesh groups
    (the pipeline's tied-weight gradient sum, the grad-norm sum over stages, the masked-ids broadcast):
    their tensors come from parameters, gradients and batches already on the rank's device, and a tensor
    made there from nothing must name its device, or under NCCL a CPU tensor reaches the collective
    ("No backend type associated with device type cpu") - e.g. the norm of a stage without gradients."""
    offenders = []
    for path in (REPO / "vltrain" / "parallel").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and ast.unparse(node.func.value) == "torch"
                and node.func.attr in TENSOR_FACTORIES
                and not node.func.attr.endswith("_like")
                and not any(k.arg == "device" for k in node.keywords)
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
    assert offenders == []


class _Sent(Exception):
    """Raised by a recording collective: the tensor got as far as the wire, on this device."""


def test_the_helper_sends_tensors_on_its_device(monkeypatch):
    import torch.distributed as dist

    from vltrain.collectives import Collectives

    def record(t, *a, **k):
        raise _Sent(t.device)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", record)
    monkeypatch.setattr(dist, "broadcast", record)
    monkeypatch.setattr(
        dist, "broadcast_object_list", lambda objs, src=0, device=None, **k: record(torch.empty(0, device=device))
    )
    c = Collectives(torch.device("meta"), world_size=2)  # the CPU tensors below must leave on it
    for send in (
        lambda: c.all_reduce_sum(torch.zeros(10, dtype=torch.float64)),
        lambda: c.broadcast(torch.tensor([3])),
        lambda: c.broadcast_objects([None]),
    ):
        with pytest.raises(_Sent) as sent:
            send()
        assert sent.value.args[0].type == "meta"
    assert (
        Collectives(torch.device("meta"), world_size=1).all_reduce_sum(torch.ones(2)).device.type == "cpu"
    )  # alone: no call


def test_under_nccl_the_helper_is_bound_to_the_ranks_gpu(monkeypatch):
    from vltrain.collectives import comm_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert comm_device("nccl", 3) == torch.device("cuda", 3)
    assert comm_device("nccl", 5) == torch.device("cuda", 1)  # one GPU per task: LOCAL_RANK modulo what it sees
    assert comm_device("gloo", 3) == torch.device("cpu")


# --- 2. the model is built where it trains, never in host memory ---------------------------------------
def test_a_30b_model_is_built_on_the_meta_device_without_host_memory():
    """build_model(device=...) creates parameters on the target device, in the training dtype: on the
    meta device the 30.5B crossmodal-xl allocates nothing (built on the CPU it would take 114 GiB per
    rank, 912 GiB per node of 8, against the profile's 1000 GiB)."""
    code = (
        "import resource, time, torch; from vltrain.config import TrainConfig; from vltrain.engines.common import build_model\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; t = time.time()\n"
        "m = build_model(TrainConfig(model='crossmodal-xl'), torch.device('meta'))\n"
        "n = sum(p.numel() for p in m.parameters()); devices = {(p.device.type, str(p.dtype)) for p in m.parameters()}\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(n, str(sorted(devices)).replace(' ', ''), grown, time.time() - t)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=deadline(300), cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    n, devices, grown_kib, seconds = r.stdout.split(maxsplit=3)
    from vltrain.model_math import param_count
    from vltrain.presets import get_preset

    # born in bf16 (the run's precision): 57 GiB of weights, where fp32 would not fit an 80 GiB GPU
    assert int(n) == param_count(get_preset("crossmodal-xl")) and devices == "[('meta','torch.bfloat16')]"
    assert int(grown_kib) < 512 * 1024, f"the build grew the process by {int(grown_kib) / 1024:.0f} MiB"
    assert float(seconds) < deadline(120)  # a guard: built for real on the CPU it would not end


# --- 6. NCCL faults and hung ranks ---------------------------------------------------------------------
@pytest.mark.parametrize("exit_code", ["134:0", "0:6"])  # SIGABRT as an exit code, or as the signal
def test_an_nccl_abort_is_a_cluster_failure(exit_code):
    from clusterctl.runs.retry import cluster_failure
    from clusterctl.specs import JobRecord

    assert cluster_failure(JobRecord("1", "r", 1, "submit", 0.0, "FAILED", exit_code=exit_code))


def test_sbatch_kills_the_step_when_a_rank_dies_and_binds_cpus():
    from clusterctl.backends import get_backend
    from clusterctl.planning.profiles import builtin_dir, load_profile, read_profile

    slurm = get_backend("slurm")
    for path in builtin_dir().glob("*.toml"):
        prof = read_profile(path)
        if prof.executor != "slurm":
            continue
        text = slurm.dryrun(slurm.launch_spec(load_profile(prof.name), Path("/scratch/r"), "n"))
        cpus = prof.nodes.cpus_per_node // prof.nodes.gpus_per_node
        assert " --kill-on-bad-exit=1 " in text, prof.name
        assert f"export SRUN_CPUS_PER_TASK={cpus}" in text and f"export OMP_NUM_THREADS={cpus}" in text, prof.name
        assert f"export DS_ACCELERATOR={prof.gpu.kind}" in text and f"export VLTRAIN_DEVICE={prof.gpu.kind}" in text


def test_the_watchdog_fires_on_a_stall_and_not_while_steps_finish():
    from vltrain.watchdog import Watchdog

    fired = []
    w = Watchdog(0.3, on_stall=fired.append, poll_s=0.02).start()
    for _ in range(10):
        time.sleep(0.05)
        w.progress()
    assert fired == []
    time.sleep(0.6)
    w.stop()
    assert len(fired) == 1 and fired[0] > 0.3


def test_a_stalled_rank_exits_75_so_that_the_run_is_requeued(tmp_path):
    code = (
        "import time; from vltrain.watchdog import Watchdog\n"
        f"w = Watchdog(0.2, run_dir={str(tmp_path)!r}, poll_s=0.02).start(); w.progress(); time.sleep(5)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=deadline(60), cwd=REPO)
    assert r.returncode == 75 and "no optimizer step for" in r.stderr, r.stderr
    assert (tmp_path / "failures" / "rank00000.json").exists()  # and `status` says why


def test_the_collective_timeout_shortens_after_the_first_step(monkeypatch):
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from vltrain.engines.process_group import shorten_timeout

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(c10d, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    monkeypatch.setattr(c10d, "_world", types.SimpleNamespace(pg_map={"pg": None, "mesh-dp": None}))
    monkeypatch.setattr(c10d, "default_pg_timeout", c10d.default_pg_timeout)  # restored after the test
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", c10d.default_pg_nccl_timeout)
    monkeypatch.setattr(c10d, "_set_pg_timeout", lambda timeout, group: seen.append((timeout.total_seconds(), group)))
    monkeypatch.setenv("VLTRAIN_STEP_DIST_TIMEOUT_S", "120")
    shorten_timeout()
    # every existing group (the default one and those the engine made), and groups made later
    assert seen == [(120.0, "pg"), (120.0, "mesh-dp")]
    assert c10d.default_pg_timeout.total_seconds() == 120.0


# --- 7. data-loader workers pinned ---------------------------------------------------------------------
def test_a_worker_is_pinned_to_one_cpu_and_one_thread():
    code = (
        "import os, torch; from vltrain.data.loader import pin_worker\n"
        "pin_worker(0); print(len(os.sched_getaffinity(0)), torch.get_num_threads())"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=deadline(60), cwd=REPO)
    assert r.returncode == 0, r.stderr
    cpus, threads = map(int, r.stdout.split())
    assert threads == 1 and cpus == (1 if len(os.sched_getaffinity(0)) > 1 else len(os.sched_getaffinity(0)))


# --- 8. device selection -------------------------------------------------------------------------------
def test_a_cuda_profile_without_cuda_fails_in_one_line_instead_of_training_on_cpu(tmp_path):
    r = run_cli(
        "train",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        "data.shards=/nonexistent",
        prog="vltrain",
        env={"VLTRAIN_DEVICE": "cuda"},
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: VLTRAIN_DEVICE: cuda (the profile has GPUs) but CUDA is not available")


def test_device_index_and_accelerator_come_from_the_run_not_the_shell():
    from vltrain import distenv

    assert distenv.cuda_index(5, 4) == 1 and distenv.cuda_index(3, 8) == 3 and distenv.cuda_index(2, 1) == 0
    env = {"DS_ACCELERATOR": "cpu"}  # leaked from the submitting shell
    distenv.export(distenv.detect({}, free_port=40001), "cuda", env)
    assert env["DS_ACCELERATOR"] == "cuda"
    assert distenv.resolve_device("", cuda_available=False) == "cpu" and distenv.resolve_device("cpu", True) == "cpu"


# --- 9. checkpoints at scale ---------------------------------------------------------------------------
def test_each_rank_fsyncs_the_checkpoint_files_it_wrote(tmp_path, monkeypatch):
    from tests.test_reliability_trainer import ds_engine
    from vltrain import checkpoint

    names = [
        "mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    ]

    class Engine:
        def save_checkpoint(self, path, tag, save_latest):
            for n in names:
                (Path(path) / tag).mkdir(parents=True, exist_ok=True)
                (Path(path) / tag / n).write_bytes(b"x")

    synced = []
    monkeypatch.setattr(checkpoint, "_fsync", lambda p: synced.append(p.name))
    checkpoint.save(
        ds_engine(Engine()),
        tmp_path,
        step=5,
        samples=10,
        rank=1,
        world_size=16,
        config_hash="h",
        trainer_state={},
        keep=2,
        barrier=lambda: None,
    )
    assert sorted(synced) == [
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "trainer_rank00001.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    ]
    owned0 = {p.name for p in checkpoint.owned_files(tmp_path / "checkpoints" / ".tmp-step_0000005", 0)}
    assert owned0 == {"mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"}


def test_resume_maps_the_module_file_instead_of_reading_it_per_rank(tmp_path, monkeypatch):
    from tests.test_reliability_trainer import ds_engine
    from vltrain import checkpoint

    f = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(3)}}, f)
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(k.get("mmap"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)

    class CheckpointEngine:
        def load(self, path, map_location=None):
            return real(path, map_location=map_location, weights_only=False)

    class Engine:
        checkpoint_engine = CheckpointEngine()
        lr_scheduler = None  # a DeepSpeedEngine's attribute (None when built without a scheduler)

        def load_checkpoint(self, path, **kw):
            return self.checkpoint_engine.load(str(f)), {}

    (tmp_path / "trainer_rank00000.pt").write_bytes(b"")
    torch.save({"step": 1}, tmp_path / "trainer_rank00000.pt")
    checkpoint.load(ds_engine(Engine()), tmp_path, 0)
    assert calls[0] is True  # the DeepSpeed module file, mapped


# --- 10. data loading on GPUs --------------------------------------------------------------------------
def test_gpu_runs_get_pinned_loader_workers_from_the_cpus_per_task():
    from vltrain.config import DataConfig
    from vltrain.data.loader import loader_settings

    assert DataConfig().workers == -1  # auto
    assert loader_settings(-1, "cuda", 8, env={"SLURM_CPUS_PER_TASK": "16"}) == {"workers": 8, "pin_memory": True}
    assert loader_settings(-1, "cuda", 8, env={"SLURM_CPUS_PER_TASK": "4"}) == {"workers": 3, "pin_memory": True}
    assert loader_settings(-1, "cuda", 8, env={}, cpus=96) == {"workers": 8, "pin_memory": True}
    assert loader_settings(-1, "cpu", 2, env={}) == {"workers": 0, "pin_memory": False}
    assert loader_settings(2, "cpu", 2, env={}) == {"workers": 2, "pin_memory": False}


# --- 5. ZeRO-3 is refused until it works end to end -----------------------------------------------------
def test_zero_3_is_refused_by_the_trainer_in_one_line(tmp_path):
    """Rank-0 evaluation would deadlock stage 3's parameter gathers and `vltrain eval` cannot read its
    sharded checkpoints: the trainer refuses it at start (clusterctl's checks refuse it at submit)."""
    from vltrain.config import TrainConfig
    from vltrain.support import not_run_yet

    assert any(p.startswith("zero_stage: 3 is planned but not run") for p in not_run_yet(TrainConfig(zero_stage=3)))
    assert not_run_yet(TrainConfig(zero_stage=2)) == []
    r = run_cli(
        "train", "--run-dir", str(tmp_path / "run"), "--set", "zero_stage=3", "--set", "data.shards=/x", prog="vltrain"
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: zero_stage: 3 is planned but not run by the trainer yet")


def test_the_profile_sets_the_collective_timeouts_and_the_stall_limit(tmp_path):
    from clusterctl.backends import get_backend
    from clusterctl.planning.profiles import builtin_dir, read_profile

    src = (builtin_dir() / "a100x64.toml").read_text()
    prof_path = tmp_path / "a100x64.toml"
    prof_path.write_text(src.replace("[slurm]\n", "[slurm]\ncollective_timeout_s = 120\nstall_timeout_s = 900\n"))
    prof = read_profile(prof_path)
    env = get_backend("slurm").launch_spec(prof, Path("/scratch/r"), "n").env
    assert (env["VLTRAIN_DIST_TIMEOUT_S"], env["VLTRAIN_STEP_DIST_TIMEOUT_S"], env["VLTRAIN_STALL_TIMEOUT_S"]) == (
        "1800",
        "120",
        "900",
    )
    prof_path.write_text(src.replace("[slurm]\n", "[slurm]\ncollective_timeout_s = 5\n"))
    with pytest.raises(Exception, match="slurm.collective_timeout_s: 5 is out of range"):
        read_profile(prof_path)
