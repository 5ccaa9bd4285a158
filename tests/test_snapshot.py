"""`submit --snapshot` (issue 27 point 3): the submitted source copied into the run directory's code/
(runs.snapshot) and put first on every attempt's PYTHONPATH (backends.common.trainer_env), so a job
requeued after the work tree changed runs the code that was submitted. The real test submits from a
copy of the packages in a git work tree, changes that copy between submit and a preemption requeue,
and shows the requeued attempt of the snapshot run ran the submitted code while a control run without
--snapshot ran the changed code; it also checks each node's record of where each attempt ran."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import clusterctl
import vltrain
from clusterctl.backends import common
from clusterctl.planning.profiles import load_profile
from clusterctl.runs import snapshot
from tests.conftest import REPO, cancel_slurm_jobs_under, deadline, run_cli, slurm_up, tiny_data, wait_until
from tests.test_provenance import git
from vltrain.rundir import JobEnv, RunDir

MARKER = "changed-code-ran"  # written into the run directory by the changed code, when a job imports it


def copy_packages(dest: Path) -> str:
    """The packages under test (this checkout's, as imported) copied into a new git work tree; its commit."""
    for mod in (vltrain, clusterctl):
        src = Path(mod.__file__).parent
        shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / ".gitignore").write_text("__pycache__/\n")
    git(dest, "init", "-q")
    git(dest, "add", ".")
    git(dest, "commit", "-q", "-m", "submitted")
    return git(dest, "rev-parse", "HEAD").strip()


# --- fast ---------------------------------------------------------------------------------------


def test_choose_leaves_out_caches_big_and_binary_files():
    keep, skip = snapshot.choose(
        [
            ("vltrain/a.py", 100, False),
            ("vltrain/__pycache__/a.cpython-311.pyc", 100, True),
            ("vltrain/b.pyc", 100, True),
            ("vltrain/data.bin", 10, True),
            ("vltrain/odd.py", 10, True),  # a NUL in a Python file: still source
            ("vltrain/huge.json", snapshot.FILE_MAX + 1, False),
            ("clusterctl/configs/tiny.toml", 300, False),
        ]
    )
    assert keep == ["vltrain/a.py", "vltrain/odd.py", "clusterctl/configs/tiny.toml"]
    assert skip == ["vltrain/data.bin", "vltrain/huge.json"]


def test_take_copies_what_git_calls_source(tmp_path):
    src = tmp_path / "src"
    for pkg in ("vltrain", "clusterctl"):
        (src / pkg).mkdir(parents=True)
        (src / pkg / "__init__.py").write_text(f"NAME = {pkg!r}\n")
    (src / "vltrain" / "gone.py").write_text("x = 1\n")
    (src / ".gitignore").write_text("*.log\n")
    git(src, "init", "-q")
    git(src, "add", ".")
    git(src, "commit", "-q", "-m", "x")
    (src / "vltrain" / "gone.py").unlink()  # tracked, deleted since: not in the submitted state
    (src / "vltrain" / "new.py").write_text("y = 2\n")  # untracked, not ignored: the user's code
    (src / "vltrain" / "run.log").write_text("ignored\n")
    (src / "vltrain" / "blob.dat").write_bytes(b"\0" * 10)
    (src / "vltrain" / "__init__.py").write_text("NAME = 'edited'\n")  # uncommitted: what the user ran
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    got = snapshot.take(run_dir, {"vltrain": src, "clusterctl": src})
    code = RunDir(run_dir).code
    files = sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file())
    assert files == ["clusterctl/__init__.py", "vltrain/__init__.py", "vltrain/new.py"]
    assert (code / "vltrain" / "__init__.py").read_text() == "NAME = 'edited'\n"
    assert (got["files"], got["skipped"]) == (3, ["vltrain/blob.dat"])
    assert got["bytes"] == sum((code / f).stat().st_size for f in files)
    assert not list(run_dir.glob(".code*"))  # the temporary copy was renamed


def test_take_outside_git_copies_the_package_directories(tmp_path):
    src = tmp_path / "site-packages"
    (src / "vltrain" / "__pycache__").mkdir(parents=True)
    (src / "vltrain" / "__init__.py").write_text("")
    (src / "vltrain" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    got = snapshot.take(tmp_path, {"vltrain": src})
    assert got["files"] == 1 and (tmp_path / RunDir.CODE / "vltrain" / "__init__.py").is_file()


def test_snapshot_goes_first_on_the_jobs_pythonpath(tmp_path):
    profile = load_profile("slurm-local")
    assert "PYTHONPATH" not in common.trainer_env(profile, tmp_path)  # without --snapshot: nothing changes
    RunDir(tmp_path).code.mkdir()
    from clusterctl.backends import get_backend

    spec = get_backend("slurm").launch_spec(profile, tmp_path, "snap")
    assert spec.env["PYTHONPATH"] == str(tmp_path / RunDir.CODE)
    assert f"export PYTHONPATH={tmp_path / RunDir.CODE}" in get_backend("slurm").dryrun(spec)


def test_pythonpath_wins_over_the_editable_install(tmp_path):
    """The job's interpreter (this virtual environment's, with clusterctl installed editable: its
    finder is on sys.meta_path) imports both packages from a PYTHONPATH entry, as jobs run it (-P)."""
    copy = tmp_path / "copy"
    for mod in (vltrain, clusterctl):
        src = Path(mod.__file__).parent
        shutil.copytree(src, copy / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    probe = "import clusterctl.runs.attempt, vltrain.loop, clusterctl.configs as c; print(vltrain.loop.__file__, "
    probe += "clusterctl.runs.attempt.__file__, list(c.__path__)[0])"
    r = subprocess.run(
        [common.job_python().split()[0], "-P", "-c", probe],
        env=os.environ | {"PYTHONPATH": str(copy)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=deadline(60),
    )
    assert r.returncode == 0, r.stderr
    assert all(p.startswith(str(copy)) for p in r.stdout.split()), r.stdout


# --- real: the local Slurm cluster ----------------------------------------------------------------


def _changed(src: Path) -> None:
    """The work tree edited after submission: importing vltrain now leaves a line in the job's run directory."""
    with open(src / "vltrain" / "__init__.py", "a") as f:
        f.write(
            "\nimport os as _os\n"
            f"if _os.environ.get('SLURM_PROCID') is not None and _os.environ.get({JobEnv.RUN_DIR!r}):\n"
            f"    with open(_os.path.join(_os.environ[{JobEnv.RUN_DIR!r}], {MARKER!r}), 'a') as _f:\n"
            "        _f.write(f\"{_os.environ.get('SLURM_JOB_ID')} {_os.environ.get('SLURM_RESTART_COUNT', '0')}\\n\")\n"
        )


@pytest.mark.slow
@pytest.mark.slurm
def test_a_requeued_attempt_runs_the_submitted_code(tmp_path):
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    src = tmp_path / "src"
    commit = copy_packages(src)
    data, tok = tiny_data(tmp_path, n=600)
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 24\nprecision = "fp32"\nlog_every = 1\ncheckpoint_every = 4\n'
        f'keep_checkpoints = 2\n[data]\nshards = "{data}"\ntokenizer = "{tok}"\n[optim]\nlr = 1e-3\nwarmup_steps = 4\n'
    )
    one_node = tmp_path / "one-node.toml"  # the control beside it: the cluster's third node is free
    one_node.write_text(
        (REPO / "cluster_profiles" / "slurm-local.toml")
        .read_text()
        .replace('name = "slurm-local"', 'name = "one-node"')
        .replace("count = 2", "count = 1")
    )
    env = {
        "CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"),
        "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs"),
        "PYTHONPATH": str(src),  # the submitting CLI imports the copy, as a user's checkout
    }

    def submit(profile: str, name: str, *extra: str) -> dict:
        r = run_cli("submit", "--profile", profile, "--config", str(cfg), "--name", name, "--json", *extra, env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def row(run_id: str) -> dict:
        r = run_cli("status", run_id, "--json", env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["runs"][0]

    try:
        snap = submit("slurm-local", "snap", "--snapshot")
        ctrl = submit(str(one_node), "nosnap")
        assert snap["snapshot"]["files"] > 100 and snap["snapshot"]["skipped"] == []
        runs = {k: Path(d["run_dir"]) for k, d in (("snap", snap), ("ctrl", ctrl))}
        for d in runs.values():  # training has started: the first attempt imported the code as submitted
            wait_until(lambda d=d: (d / RunDir.METRICS).exists(), 300, f"{d}: no step logged")
        _changed(src)
        for d in (snap, ctrl):  # preemption: submitit requeues the job (USR2), a new attempt starts
            subprocess.run(["scancel", "--signal=USR2", d["job_id"]], check=True, timeout=deadline(30))
        final = {}
        for k, d in (("snap", snap), ("ctrl", ctrl)):
            final[k] = wait_until(
                lambda d=d: (r := row(d["run_id"]))["state"] in ("COMPLETED", "FAILED", "CANCELLED") and r,
                420,
                f"{d['run_id']} did not end",
                every=2,
            )
            assert final[k]["state"] == "COMPLETED" and final[k]["requeues"] >= 1, final[k]
        # the control's requeued attempt imported the changed work tree; the snapshot run's never did
        seen = [line.split() for line in (runs["ctrl"] / MARKER).read_text().splitlines()]
        assert seen and all(s == [ctrl["job_id"], "1"] for s in seen), seen  # job id, restart count
        assert not (runs["snap"] / MARKER).exists()
        assert (final["snap"]["commit"], final["snap"]["dirty"]) == (commit, False)
        code = runs["snap"] / RunDir.CODE
        attempts = json.loads((runs["snap"] / RunDir.PROVENANCE).read_text())
        assert attempts["source_root"] == str(src) and attempts["packages"]["vltrain"]["path"] == str(src / "vltrain")
        hosts = [json.loads(p.read_text()) for p in RunDir(runs["snap"]).host_files()]
        assert sorted((h["restart"], h["node_rank"]) for h in hosts) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert {h["packages"]["vltrain"] for h in hosts} == {str(code / "vltrain")}
        assert len({h["node"] for h in hosts if h["restart"] == 0}) == 2  # SLURMD_NODENAME: two nodes
        assert all(h["hostname"] and h["cuda"] is None for h in hosts)
        ctrl_hosts = [json.loads(p.read_text()) for p in RunDir(runs["ctrl"]).host_files()]
        assert {h["packages"]["vltrain"] for h in ctrl_hosts} == {str(src / "vltrain")}
    finally:
        cancel_slurm_jobs_under(tmp_path)
