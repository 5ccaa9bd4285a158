"""A profile's [container] and `setup` lines in the job (clusterctl.backends.container, common.setup_lines):
golden sbatch files for pyxis, Apptainer and set-up lines, the one code path from dry run to sbatch, what
runs on the host and what in the image, the local executor, one-line refusals, and a real 2-node run on
the local Slurm cluster whose set-up lines run before the trainer.

Neither enroot/pyxis nor Apptainer is installed here: the real run puts a stand-in `apptainer` on PATH
(it checks its arguments, records the rank's environment and runs the inner command on the host). It
proves the command line the job runs is well-formed and what reaches the ranks; it is not a container test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterctl.backends import get_backend
from clusterctl.planning.profiles import read_profile
from tests.conftest import (
    REPO,
    cancel_slurm_jobs_under,
    deadline,
    dry_run_exit,
    no_scheduler,
    one_line_error,
    run_cli,
    slurm_up,
    tiny_data,
)
from vltrain.common.errors import UserError

PROFILES = Path(__file__).parent / "fixtures" / "profiles"
GOLDEN = Path(__file__).parent / "fixtures" / "sbatch"
TEST_PROFILES = sorted(p.stem for p in PROFILES.glob("*.toml"))
RUN_DIR = Path("/scratch/runs/demo-20260101-000000-abcd")
PYTHON = "/opt/venv/bin/python"
SLURM = get_backend("slurm")


def profile(name: str):
    return read_profile(PROFILES / f"{name}.toml")


def script(name: str, run_dir: Path = RUN_DIR) -> str:
    return SLURM.dryrun(SLURM.launch_spec(profile(name), run_dir, "vltrain-demo"), python=PYTHON)


def section(text: str, title: str) -> list[str]:
    """The lines of one '# setup' / '# command' block of a submitit sbatch script."""
    lines = [*text.splitlines(), ""]
    start = lines.index(f"# {title}") + 1
    return lines[start : lines.index("", start)]


def srun_argv(text: str) -> list[str]:
    (line,) = [x for x in section(text, "command") if x.startswith("srun ")]
    return shlex.split(line)


@pytest.mark.parametrize("name", TEST_PROFILES)
def test_sbatch_matches_recorded_file(name):
    """As tests/test_backend_launch.py does for the shipped profiles (UPDATE_GOLDEN=1 re-records)."""
    text = script(name)
    golden = GOLDEN / f"{name}.sh"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"re-record with UPDATE_GOLDEN=1 if the change is intended: {golden}"


def test_pyxis_flags_name_the_image_mounts_workdir_and_every_export():
    text = script("a100x64-pyxis")
    argv = srun_argv(text)
    flags = dict(a.split("=", 1) for a in argv if a.startswith("--container-") and "=" in a)
    assert flags["--container-image"] == "nvcr.io#nvidia/pytorch:24.05-py3"
    assert flags["--container-mounts"].split(",") == [
        str(RUN_DIR), "/datasets/laion:/data:ro", "/home/alice/.local/share/clusterctl"
    ]  # fmt: skip
    assert flags["--container-workdir"] == str(RUN_DIR)  # no container.workdir: the run directory
    exported = sorted(m[1] for line in section(text, "setup") if (m := re.match(r"export ([A-Z0-9_]+)=", line)))
    assert flags["--container-env"].split(",") == exported  # clusterctl's values win over the image's
    assert "--container-writable" in argv
    # the image's interpreter (on its PATH), never this machine's venv
    tail = argv[argv.index("--container-writable") + 1 :]
    assert tail == ["python", "-P", "-u", "-m", "submitit.core._submit", f"{RUN_DIR}/submitit/%j"]
    assert PYTHON not in text and sys.executable not in text


def test_apptainer_wraps_the_interpreter():
    text = script("a100x64-apptainer")
    argv = srun_argv(text)
    inner = argv[argv.index("--kill-on-bad-exit=1") + 1 :]
    assert inner == [
        "apptainer", "exec",
        "--bind", f"{RUN_DIR},/datasets/laion:/data:ro,/home/alice/.local/share/clusterctl",
        "--pwd", "/scratch/work",
        "--nv",  # a CUDA profile: the host's driver in the container
        "/shared/images/vltrain-24.05.sif",
        "/opt/conda/bin/python3", "-P", "-u", "-m", "submitit.core._submit", f"{RUN_DIR}/submitit/%j",
    ]  # fmt: skip
    assert not [a for a in argv if a.startswith("--container-")]


def test_apptainer_on_a_cpu_profile_has_no_nv(tmp_path):
    src = (PROFILES / "a100x64-apptainer.toml").read_text()
    cpu = tmp_path / "cpu-apptainer.toml"
    cpu.write_text(
        src.replace('name = "a100x64-apptainer"', 'name = "cpu-apptainer"').replace("[gpu]\n", '[gpu]\nkind = "cpu"\n')
    )
    spec = SLURM.launch_spec(read_profile(cpu), RUN_DIR, "n")
    assert "apptainer exec" in spec.python and "--nv" not in spec.python and "--pwd /scratch/work" in spec.python


def test_setup_lines_run_after_the_unset_and_before_clusterctls_exports(tmp_path):
    """The rendered set-up block, run by bash as the batch script runs it: the profile's lines run (a
    function defined and called), in the run directory, and clusterctl's exports win over theirs."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = script("slurm-local-setup", run_dir)
    lines = section(text, "setup")
    assert lines[0].startswith("unset ") and lines[1] == f"cd {run_dir} || exit 1"
    assert lines[2:5] == list(profile("slurm-local-setup").setup)  # verbatim, in order
    assert all(x.startswith("export ") for x in lines[5:])
    probe = "\n".join([*lines, 'echo "OMP=$OMP_NUM_THREADS PWD=$PWD"'])
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["module load cuda/12.4", f"OMP=1 PWD={run_dir}"]


def test_dry_run_renders_what_schedule_submits(tmp_path, monkeypatch):
    """One code path: the script `submit --dry-run` shows is, byte for byte, the one sbatch gets (a
    stand-in sbatch first on PATH keeps it), with a container and without one."""
    import submitit

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    (bin_ / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    for name in ("a100x64-pyxis", "a100x64-apptainer", "slurm-local-setup"):
        run_dir = tmp_path / name
        spec = SLURM.launch_spec(profile(name), run_dir, "vltrain-demo")
        assert SLURM.schedule(spec, submitit.helpers.FunctionSequence()) == "4242"
        assert (tmp_path / "submitted.sh").read_text() == SLURM.dryrun(spec), name


def test_follow_up_job_runs_on_the_host_and_the_evaluation_in_the_container():
    """The follow-up runs clusterctl (sbatch, squeue, sacct: rarely in an image); the evaluation runs the
    trainer. Both run the profile's set-up lines."""
    for name in ("a100x64-pyxis", "a100x64-apptainer"):
        p = profile(name)
        follow = SLURM.side_spec(p, RUN_DIR, "f", "followup", "afternotok:1")
        ev = SLURM.side_spec(p, RUN_DIR, "e", "eval", "afterok:1", gpus=1)
        main = SLURM.launch_spec(p, RUN_DIR, "m")
        assert follow.python is None and "srun_args" not in follow.params
        (srun,) = [x for x in section(SLURM.dryrun(follow), "command") if x.startswith("srun ")]
        assert "--container-" not in srun and "apptainer" not in srun
        assert srun.endswith(f"{shlex.quote(sys.executable)} -P -u -m submitit.core._submit {RUN_DIR}/side/followup/%j")
        assert ev.python == main.python and ev.python is not None
        same = [a for a in main.params["srun_args"] if a.startswith(("--container-image", "--container-mounts"))]
        assert set(same) <= set(ev.params.get("srun_args", [])) and bool(same) == (p.container.runtime == "pyxis")
        for spec in (follow, ev):
            assert set(p.setup) <= set(spec.params["setup"])


def test_local_executor_runs_the_setup_lines_as_a_script_would(tmp_path):
    """submitit's local executor joins set-up items with && under /bin/sh: grouped, a comment does not
    swallow the job, a failing line does not stop it, and the exports still come last."""
    import submitit

    from clusterctl.backends import common

    user = (
        "probe() { echo ran > setup-ran.txt; }  # a function defined and called",
        "probe",
        "false",
        "export SETUP_PROBE=from-setup OMP_NUM_THREADS=8",
    )
    setup = common.setup_lines({"OMP_NUM_THREADS": "1"}, tmp_path, common.grouped(user))
    ex = submitit.LocalExecutor(folder=str(tmp_path / "sub"))
    ex.update_parameters(setup=setup)
    env_text = ex.submit(subprocess.check_output, ["env"], text=True).result()
    env = dict(line.split("=", 1) for line in env_text.splitlines() if "=" in line)
    assert env["SETUP_PROBE"] == "from-setup" and env["OMP_NUM_THREADS"] == "1"
    assert (tmp_path / "setup-ran.txt").read_text() == "ran\n"


def test_local_profile_passes_its_setup_lines(tmp_path):
    src = (REPO / "cluster_profiles" / "local.toml").read_text()
    path = tmp_path / "local-setup.toml"
    path.write_text(src.replace('name = "local"', 'name = "local-setup"\nsetup = ["export A=1"]', 1))
    spec = get_backend("local").launch_spec(read_profile(path), tmp_path, "n")
    assert "{\nexport A=1\n:\n}" in spec.params["setup"]


BAD = [
    ('[container]\nruntime = "docker"\nimage = "x"\n', "container.runtime"),
    ('[container]\nruntime = "pyxis"\nimage = "a b"\n', "container.image"),
    ('[container]\nruntime = "pyxis"\nimage = "x"\nmounts = ["data:/data"]\n', "container.mounts"),
    ('[container]\nruntime = "pyxis"\nimage = "x"\nmounts = ["/d:/e:rx"]\n', "container.mounts"),
    ('[container]\nruntime = "pyxis"\nimage = "x"\nworkdir = "work"\n', "container.workdir"),
    ('[container]\nruntime = "apptainer"\nimage = "x.sif"\npython = "python; id"\n', "container.python"),
    ('[container]\nimage = "x"\n', "container.runtime"),
]


@pytest.mark.parametrize("table, field", BAD)
def test_bad_container_fields_are_one_line_errors(tmp_path, table, field):
    src = (REPO / "cluster_profiles" / "slurm-local.toml").read_text().replace('name = "slurm-local"', 'name = "bad"')
    path = tmp_path / "bad.toml"
    path.write_text(src + "\n" + table)
    with pytest.raises(UserError) as e:
        read_profile(path)
    assert str(e.value).startswith(f"{path}: {field}") and "allowed" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("line", ["echo a\necho b", "echo \x1b[31m", "", "x" * 1001])
def test_bad_setup_lines_are_one_line_errors(tmp_path, line):
    src = (REPO / "cluster_profiles" / "slurm-local.toml").read_text().replace('name = "slurm-local"', 'name = "bad"')
    path = tmp_path / "bad.toml"
    path.write_text(src.replace('executor = "slurm"\n', f'executor = "slurm"\nsetup = [{json.dumps(line)}]\n', 1))
    with pytest.raises(UserError) as e:
        read_profile(path)
    assert str(e.value).startswith(f"{path}: setup") and "\n" not in str(e.value)


def test_a_local_profile_with_a_container_is_refused(tmp_path, env):
    src = (REPO / "cluster_profiles" / "local.toml").read_text().replace('name = "local"', 'name = "boxed"')
    path = tmp_path / "boxed.toml"
    path.write_text(src + '\n[container]\nruntime = "apptainer"\nimage = "/x.sif"\n')
    r = run_cli("submit", "--profile", str(path), "--dry-run", env=env)
    one_line_error(r, "error: container: the 'boxed' profile runs its ranks as processes of this machine")
    assert "allowed: [container] with a Slurm profile" in r.stderr


@pytest.mark.parametrize(
    "name, shown", [("a100x64-pyxis", "--container-image="), ("a100x64-apptainer", "apptainer exec")]
)
def test_dry_run_shows_the_container_and_setup_lines(tmp_path, env, name, shown):
    r = run_cli(
        "submit", "--profile", str(PROFILES / f"{name}.toml"), "--config", str(REPO / "configs" / "tiny.toml"), "--dry-run",
        env=env | no_scheduler(tmp_path),
    )  # fmt: skip
    dry_run_exit(r)
    assert shown in r.stdout and "module load" in r.stdout, r.stdout[-2000:]
    assert not (tmp_path / "runs").exists()


# --- the real cluster ----------------------------------------------------------------------------------

SHIM = """#!/bin/bash
# A stand-in for Apptainer (not installed here), for tests/test_containers.py: it checks the arguments
# clusterctl gives `apptainer exec`, records what the rank's environment holds, then runs the inner
# command on the host. Not a container.
set -u
[ "$1" = exec ] || { echo "apptainer stand-in: expected exec, got $1" >&2; exit 64; }
shift
binds="" pwd=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bind) binds=$2; shift 2 ;;
    --pwd) pwd=$2; shift 2 ;;
    -*) echo "apptainer stand-in: unexpected option $1" >&2; exit 64 ;;
    *) break ;;
  esac
done
image=$1; shift
echo "rank=$SLURM_PROCID node=$SLURMD_NODENAME image=$image binds=$binds pwd=$pwd" \\
  "probe=${SETUP_PROBE:-unset} omp=$OMP_NUM_THREADS argv=$*" >> "$pwd/apptainer-stand-in.log"
cd "$pwd" || exit 65
exec "$@"
"""


@pytest.mark.slow
@pytest.mark.slurm
def test_setup_lines_run_before_the_trainer_on_the_local_cluster(tmp_path):
    """A 2-node run whose profile's set-up lines define and call a shell function (it writes into the run
    directory), export a variable and put the Apptainer stand-in on PATH (as `module load apptainer`
    would): each rank starts with the variable set, so the lines ran in the real batch script before the
    trainer; clusterctl's OMP_NUM_THREADS wins over theirs; the run COMPLETED."""
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    (shim_dir / "apptainer").write_text(SHIM)
    (shim_dir / "apptainer").chmod(0o755)
    setup = [
        'probe() { echo "setup ran in job $SLURM_JOB_ID on $(hostname)" >> setup-ran.txt; }',
        "probe",
        "export SETUP_PROBE=from-setup OMP_NUM_THREADS=8",
        f"export PATH={shim_dir}:$PATH",
    ]
    src = (REPO / "cluster_profiles" / "slurm-local.toml").read_text()
    prof = tmp_path / "boxed.toml"
    prof.write_text(
        src.replace('name = "slurm-local"', 'name = "boxed"').replace(
            'executor = "slurm"\n', f'executor = "slurm"\nsetup = {json.dumps(setup)}\n', 1
        )
        + f'\n[container]\nruntime = "apptainer"\nimage = "/images/vltrain.sif"\npython = "{sys.executable}"\n'
    )
    data, tok = tiny_data(tmp_path)
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 4\nprecision = "fp32"\nlog_every = 1\n'
        f'[data]\nshards = "{data}"\ntokenizer = "{tok}"\n'
    )
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs")}
    try:
        r = run_cli("submit", "--profile", str(prof), "--config", str(cfg), "--name", "setup", "--json", env=env)
        assert r.returncode == 0, r.stderr
        sub = json.loads(r.stdout)
        end = time.monotonic() + deadline(300)
        while True:
            s = run_cli("status", sub["run_id"], "--json", env=env)
            assert s.returncode == 0, s.stderr
            row = json.loads(s.stdout)["runs"][0]
            if row["state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                break
            assert time.monotonic() < end, f"still {row['state']}"
            time.sleep(2)
        run_dir = Path(sub["run_dir"])
        assert row["state"] == "COMPLETED", (row, *(p.read_text()[-2000:] for p in run_dir.glob("submitit/*/*.err")))
        job = sub["job_id"]
        ran = (run_dir / "setup-ran.txt").read_text().splitlines()
        assert len(ran) == 1 and ran[0].startswith(f"setup ran in job {job} on ")  # once, in the batch script
        ranks = sorted((run_dir / "apptainer-stand-in.log").read_text().splitlines())
        assert len(ranks) == 2, ranks
        nodes = set()
        for rank, line in enumerate(ranks):
            fields = dict(kv.split("=", 1) for kv in line.split(" argv=")[0].split())
            argv = line.split(" argv=", 1)[1]
            assert fields["rank"] == str(rank) and fields["image"] == "/images/vltrain.sif", line
            assert fields["binds"] == str(run_dir) and fields["pwd"] == str(run_dir), line
            assert fields["probe"] == "from-setup" and fields["omp"] == "1", line  # set-up ran; clusterctl's export won
            # the folder as sbatch's script names it: submitit's job reads its own id into %j
            assert argv == f"{sys.executable} -P -u -m submitit.core._submit {run_dir}/submitit/%j", line
            nodes.add(fields["node"])
        assert len(nodes) == 2, ranks  # one rank on each of the two nodes
    finally:
        cancel_slurm_jobs_under(tmp_path)
