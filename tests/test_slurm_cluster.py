"""The local cluster of scripts/slurm-local.sh, checked the way tests and users use it: plain
sinfo/sbatch/sacct (the config is installed in /etc/slurm), a 2-node GPU job, accounting, and an
idempotent `up`. The last two tests need no cluster: they check the script's refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, deadline

SCRIPT = REPO / "scripts" / "slurm-local.sh"
STATE = Path(os.environ.get("SLURM_LOCAL_DIR", "/var/tmp/clusterctl-slurm"))
MARK = "# managed-by: clusterctl scripts/slurm-local.sh"
NODES = {"a1", "a2", "a3"}


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """`timeout`: an idle machine's seconds, through deadline()."""
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=deadline(timeout), env=os.environ | (env or {})
    )


@pytest.fixture(scope="module")
def client_env() -> dict[str, str]:
    """Environment for plain Slurm clients; SLURM_CONF only when /etc/slurm holds someone else's config."""
    if shutil.which("sinfo") is None or not SCRIPT.exists():
        pytest.skip("Slurm clients are not installed (scripts/slurm-local.sh up)")
    status = run(str(SCRIPT), "status", timeout=60)
    if status.returncode != 0:
        pytest.skip(f"the local Slurm cluster is not running (scripts/slurm-local.sh up): {status.stdout[-300:]}")
    etc = Path("/etc/slurm/slurm.conf")
    ours = etc.exists() and etc.read_text().startswith(MARK)
    return {} if ours else {"SLURM_CONF": str(STATE / "etc" / "slurm.conf")}


@pytest.fixture(scope="module")
def two_node_job(client_env, tmp_path_factory) -> tuple[str, Path]:
    """One 2-node job with one GPU per node, submitted with plain sbatch and waited for."""
    out_dir = tmp_path_factory.mktemp("slurm-job")
    script = out_dir / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "srun bash -c 'echo \"$SLURMD_NODENAME $SLURM_PROCID ${CUDA_VISIBLE_DEVICES:-unset} "
        "${SLURM_GPUS_ON_NODE:-unset}\"'\n"
    )
    r = run(
        "sbatch",
        "--parsable",
        "--wait",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=1",
        "--time=5",
        "--job-name=slurm-local-test",
        f"--output={out_dir / 'out.txt'}",
        str(script),
        env=client_env,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0], out_dir / "out.txt"


@pytest.mark.slurm
def test_sinfo_shows_every_node_in_default_debug_partition(client_env):
    r = run("sinfo", "-h", "-N", "-o", "%N|%P|%T|%c|%m|%G", env=client_env, timeout=10)
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[0]: line.split("|")[1:] for line in r.stdout.split()}
    assert set(rows) == NODES, r.stdout
    for node, (partition, state, cpus, mem, gres) in rows.items():
        assert partition == "debug*", node  # the star marks the default partition
        # Other tests may run jobs at the same time, so a busy node is healthy too.
        assert state in {"idle", "mixed", "allocated"}, (node, state)
        assert (cpus, mem, gres) == ("16", "8000", "gpu:8"), node


@pytest.mark.slurm
def test_two_node_job_runs_one_task_per_node_with_a_gpu(two_node_job):
    _, out = two_node_job
    rows = [line.split() for line in out.read_text().splitlines() if line.strip()]
    assert len({r[0] for r in rows}) == 2 and {r[0] for r in rows} <= NODES, rows  # two distinct nodes
    assert sorted(r[1] for r in rows) == ["0", "1"], rows
    for node, _, cuda, gpus_on_node in rows:
        assert cuda.isdigit() and 0 <= int(cuda) < 8, (node, cuda)  # one fake device index
        assert gpus_on_node == "1", node


@pytest.mark.slurm
def test_sacct_reports_completed_with_gpu_tres(two_node_job, client_env):
    job_id, _ = two_node_job
    end = time.monotonic() + deadline(60)  # slurmdbd records the end a moment after sbatch --wait returns
    while True:
        r = run(
            "sacct",
            "-j",
            job_id,
            "-X",
            "-n",
            "-P",
            "-o",
            "JobID,State,Partition,NNodes,AllocTRES",
            env=client_env,
            timeout=15,
        )
        assert r.returncode == 0, r.stderr
        fields = r.stdout.strip().split("|")
        if (
            len(fields) == 5 and fields[1] == "COMPLETED" and fields[2]
        ) or time.monotonic() > end:  # the partition lags too
            break
        time.sleep(1)
    jid, state, partition, nnodes, tres = fields
    assert (jid, state, partition, nnodes) == (job_id, "COMPLETED", "debug", "2"), r.stdout
    alloc = dict(kv.split("=", 1) for kv in tres.split(","))
    assert alloc["gres/gpu"] == "2" and alloc["node"] == "2", tres


@pytest.mark.slurm
def test_launcher_variables_of_the_submitting_shell_do_not_reach_a_slurm_job(client_env, tmp_path, monkeypatch):
    """sbatch exports the submitting shell's environment; torch.distributed's variables in it (a notebook,
    a job under torchrun) would be read by the trainer before Slurm's, every rank then training alone.
    The slurm-local profile's job, as clusterctl submits it, sees neither on either node; the rest of
    the environment still arrives (tests/test_backend_launch.py checks the local executor)."""
    import submitit

    from clusterctl.backends import get_backend
    from clusterctl.planning.profiles import load_profile
    from tests.test_backend_launch import LEAKED, job_env

    for k, v in (LEAKED | client_env | {"CLUSTERCTL_TEST_KEPT": "yes"}).items():
        monkeypatch.setenv(k, v)
    backend = get_backend("slurm")
    spec = backend.launch_spec(load_profile("slurm-local"), tmp_path / "run", "envcheck")
    job_id = backend.schedule(spec, job_env())
    job = submitit.SlurmJob(folder=Path(spec.folder) / "%j", job_id=job_id, tasks=(0, 1))
    end = time.monotonic() + deadline(180)
    while not job.done() and time.monotonic() < end:
        time.sleep(1)
    assert job.done(), f"job {job_id} still {job.state} after {deadline(180):g} s"
    for text in job.results():
        env = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        assert not set(LEAKED) & set(env), {k: env[k] for k in set(LEAKED) & set(env)}
        assert env["CLUSTERCTL_TEST_KEPT"] == "yes" and env["SLURM_NTASKS"] == "2"


def _pids() -> dict[str, str]:
    files = [
        STATE / "run" / f for f in ("slurmctld.pid", "slurmdbd.pid", "slurmd-a1.pid", "slurmd-a2.pid", "slurmd-a3.pid")
    ]
    return {f.name: f.read_text().strip() for f in files}


@pytest.mark.slurm
def test_up_on_a_running_cluster_changes_nothing(client_env):
    if os.geteuid() != 0:
        pytest.skip("`up` needs root")
    before = _pids()
    for _ in range(2):
        r = run(str(SCRIPT), "up", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "already up" in r.stdout, r.stdout
    assert _pids() == before  # no daemon was restarted
    assert run(str(SCRIPT), "status", timeout=60).returncode == 0


def test_up_without_root_refuses_with_exit_3():
    """Exit 3 is what `make slurm-up` tolerates on machines that cannot host the cluster."""
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("needs runuser to drop root")
        cmd = ["runuser", "-u", "nobody", "--", str(SCRIPT), "up"]
    else:
        cmd = [str(SCRIPT), "up"]
    r = run(*cmd, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "needs root" in r.stderr


def test_status_of_an_empty_state_dir_is_not_usable(tmp_path):
    r = run(str(SCRIPT), "status", env={"SLURM_LOCAL_DIR": str(tmp_path)}, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.count(" stopped") == 7 and "not usable" in r.stdout, r.stdout
