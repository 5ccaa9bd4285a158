"""Provenance (issue 27 point 3): what a run was submitted from (runs.provenance: provenance.json,
source.diff, pip-freeze.txt) from a git work tree, a dirty one, a tree that is not git, with git
missing or hanging; where each attempt ran (hosts/); and `status --json`, `status` and `report eval`
showing the commit. The real submissions on the local Slurm cluster are in tests/test_snapshot.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterctl.render.status_table import commit_text, provenance_lines
from clusterctl.runs import provenance
from clusterctl.runs.registry import Registry
from clusterctl.specs import RunRecord
from tests.conftest import run_cli
from vltrain.rundir import RunDir


def git(root: Path, *args: str) -> str:
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]
    return subprocess.run(["git", *ident, *args], cwd=root, check=True, capture_output=True, text=True).stdout


def work_tree(root: Path) -> str:
    """A git work tree tracking a vltrain/ package (and a binary file); returns its commit."""
    (root / "vltrain").mkdir(parents=True)
    (root / "vltrain" / "__init__.py").write_text("STEPS = 1\n")
    (root / "weights.bin").write_bytes(b"\0\1\2")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "first")
    return git(root, "rev-parse", "HEAD").strip()


# --- pure ---------------------------------------------------------------------------------------


def test_freeze_lines_are_pips_with_editable_installs_marked():
    editable = {"url": "file:///src/proj", "dir_info": {"editable": True}}
    lines = provenance.freeze_lines(
        [
            ("zlib_thing", "1.0", None),
            ("proj", "0.1", editable),
            ("Alpha", "2.0", {"url": "https://example.com/alpha.whl", "archive_info": {}}),
            ("zlib-thing", "9.9", None),  # the same name further down sys.path: shadowed, as Python imports
            ("local", "3.0", {"url": "file:///wheels/local.whl", "archive_info": {}}),
        ]
    )
    assert lines == [
        "Alpha @ https://example.com/alpha.whl",
        "local==3.0",
        "# Editable install with no version control (proj==0.1)",
        "-e /src/proj",
        "zlib_thing==1.0",
    ]


def test_git_output_parsers():
    assert provenance.porcelain_counts(" M a.py\0?? new.py\0?? b/c.txt\0") == (True, 2)
    assert provenance.porcelain_counts("?? new.py\0") == (False, 1)
    assert provenance.porcelain_counts("") == (False, 0)
    assert provenance.porcelain_counts("R  new.py\0old.py\0") == (True, 0)  # a rename: its old name follows
    assert provenance.binary_paths("3\t1\ta.py\0-\t-\tw.bin\0") == ["w.bin"]


def test_attempts_are_merged_by_attempt_in_start_order():
    hosts = [
        {"attempt": "job7-r1", "node_rank": 1, "started_at": 30.0},
        {"attempt": "job7-r0", "node_rank": 1, "started_at": 11.0},
        {"attempt": "job7-r0", "node_rank": 0, "started_at": 10.0},
    ]
    merged = provenance.merge({"commit": "abc"}, hosts)
    assert merged["commit"] == "abc"
    assert [(a["attempt"], [n["node_rank"] for n in a["nodes"]]) for a in merged["attempts"]] == [
        ("job7-r0", [0, 1]),
        ("job7-r1", [1]),
    ]


def test_commit_words():
    assert commit_text("0123456789abcdef", True) == "01234567+dirty"
    assert commit_text("0123456789abcdef", False) == "01234567"
    assert commit_text(None, None) is None
    rows = [{"run_id": "a", "commit": "0123456789", "dirty": False, "excluded_nodes": ["a1", "a2"]}]
    assert provenance_lines(rows) == ["a: retries exclude a1, a2", "a: submitted from commit 01234567"]
    rows.append({"run_id": "b", "commit": "99", "dirty": None, "excluded_nodes": []})
    assert provenance_lines(rows) == ["a: retries exclude a1, a2"]  # a listing: the commit is in --json


# --- at submission ------------------------------------------------------------------------------


def test_clean_git_tree(tmp_path):
    src, run_dir = tmp_path / "src", tmp_path / "run"
    commit = work_tree(src)
    rec = provenance.write(run_dir, root=src)
    on_disk = json.loads((run_dir / RunDir.PROVENANCE).read_text())
    assert on_disk == json.loads(json.dumps(rec))
    assert (rec["git"], rec["commit"], rec["branch"], rec["dirty"], rec["untracked"]) == (
        True,
        commit,
        "main",
        False,
        0,
    )
    assert rec["source_diff"] is None and not (run_dir / RunDir.SOURCE_DIFF).exists()
    assert rec["python"] == {"version": sys.version.split()[0], "executable": sys.executable}
    assert rec["submit_host"] and rec["torch"]  # torch's version without importing it (the CLI does not)
    assert rec["packages"]["clusterctl"]["path"].endswith("clusterctl") and rec["packages"]["vltrain"]["version"]
    freeze = (run_dir / RunDir.PIP_FREEZE).read_text().splitlines()
    assert any(line.startswith("torch==") for line in freeze)
    assert any(line.startswith("-e ") for line in freeze) == any("Editable" in line for line in freeze)
    assert provenance.commit_of(run_dir) == (commit, False)


def test_dirty_tree_keeps_its_diff_and_counts_untracked_files(tmp_path):
    src, run_dir = tmp_path / "src", tmp_path / "run"
    commit = work_tree(src)
    (src / "vltrain" / "__init__.py").write_text("STEPS = 2\n")
    (src / "weights.bin").write_bytes(b"\0\7\7\7")
    (src / "vltrain" / "new.py").write_text("x = 1\n")
    rec = provenance.write(run_dir, root=src)
    assert (rec["commit"], rec["dirty"], rec["untracked"]) == (commit, True, 1)
    assert rec["binary_changes"] == ["weights.bin"] and rec["source_diff"] == RunDir.SOURCE_DIFF
    diff = (run_dir / RunDir.SOURCE_DIFF).read_text()
    assert "-STEPS = 1\n+STEPS = 2" in diff and "Binary files a/weights.bin and b/weights.bin differ" in diff
    assert provenance.commit_of(run_dir) == (commit, True)


def test_not_a_git_tree_has_no_commit_but_the_versions(tmp_path):
    src = tmp_path / "site-packages"
    (src / "vltrain").mkdir(parents=True)
    rec = provenance.write(tmp_path / "run", root=src)
    assert (rec["git"], rec["commit"], rec["dirty"]) == (False, None, None)
    assert rec["notes"] and "not a git work tree" in rec["notes"][0]
    assert rec["packages"]["clusterctl"]["version"] and (tmp_path / "run" / RunDir.PIP_FREEZE).stat().st_size > 0
    # a package inside a repository that does not track it (a virtual environment in a clone): not its commit
    work_tree(tmp_path / "repo")
    venv = tmp_path / "repo" / ".venv" / "lib"
    (venv / "vltrain").mkdir(parents=True)
    assert provenance.write(tmp_path / "run2", root=venv)["commit"] is None


def test_missing_or_hanging_git_is_a_note_not_an_error(tmp_path, monkeypatch):
    src = tmp_path / "src"
    work_tree(src)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    rec = provenance.write(tmp_path / "run", root=src)
    assert rec["commit"] is None and rec["notes"] == ["git: not installed"]
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "git").write_text("#!/bin/sh\nexec /bin/sleep 30\n")
    (bin_ / "git").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))
    monkeypatch.setattr(provenance, "GIT_TIMEOUT_S", 0.3)
    t0 = time.monotonic()
    rec = provenance.write(tmp_path / "run2", root=src)
    assert rec["commit"] is None and rec["notes"] == ["git rev-parse: no answer in 0.3 s"]
    assert time.monotonic() - t0 < 10  # one call timed out; no further git call was waited for


# --- in the job ---------------------------------------------------------------------------------


def test_each_nodes_local_rank_zero_records_where_it_runs(tmp_path):
    slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2"}
    slurm |= {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1", "SLURMD_NODENAME": "a2", "SLURM_JOB_NODELIST": "a[1-2]"}
    provenance.record_attempt(tmp_path, slurm | {"SLURM_LOCALID": "0", "SLURM_NODEID": "1"})
    provenance.record_attempt(tmp_path, slurm | {"SLURM_LOCALID": "1", "SLURM_NODEID": "1"})  # not local rank 0
    (path,) = RunDir(tmp_path).host_files()
    assert path == RunDir(tmp_path).host_file(1, "job42-r1")
    rec = json.loads(path.read_text())
    assert (rec["node"], rec["node_rank"], rec["job_id"], rec["restart"]) == ("a2", 1, "42", 1)
    assert rec["hostname"] and rec["torch"] and rec["packages"]["vltrain"].endswith("vltrain")
    import torch

    if not torch.cuda.is_available():  # this machine: a CPU build, no GPU
        assert (rec["cuda"], rec["nccl"], rec["driver"]) == (None, None, None)
    provenance.write(tmp_path, root=tmp_path)
    assert [a["attempt"] for a in provenance.read(tmp_path)["attempts"]] == ["job42-r1"]


def test_a_local_job_records_its_one_node(tmp_path):
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2"}
    for rank in ("0", "1"):
        provenance.record_attempt(tmp_path, local | {"SUBMITIT_LOCAL_LOCALID": rank, "SUBMITIT_LOCAL_GLOBALID": rank})
    (path,) = RunDir(tmp_path).host_files()
    rec = json.loads(path.read_text())
    assert path.name == "node000-job4242-r0.json" and (rec["node"], rec["job_id"]) == (None, "4242")


def test_a_failing_record_does_not_fail_the_attempt(tmp_path, capsys):
    blocked = tmp_path / "run"
    blocked.write_text("a file where the run directory should be")
    provenance.record_attempt(blocked, {})
    assert "provenance: where this attempt runs was not recorded" in capsys.readouterr().err


# --- what status and report show ----------------------------------------------------------------


@pytest.fixture
def run_with_provenance(tmp_path):
    """A finished run (registry row, provenance from a dirty work tree, eval.json) and a retry event."""
    src = tmp_path / "src"
    commit = work_tree(src)
    (src / "vltrain" / "__init__.py").write_text("STEPS = 3\n")
    reg = Registry(tmp_path / "reg.db")
    run_id = reg.new_run_id("prov")
    run_dir = tmp_path / "runs" / run_id
    provenance.write(run_dir, root=src)
    ev = {"step": 10, "n": 48, "chance_r1": 1 / 48, "cider": 0.1, "i2t": {"R@1": 0.1}, "t2i": {"R@1": 0.2}}
    (run_dir / RunDir.EVAL).write_text(json.dumps(ev))
    old = time.time() - 7200
    reg.add_run(RunRecord(run_id, "prov", "local", "local", str(run_dir), old, "u", 1, 10, "COMPLETED"))
    reg.add_job(run_id, "1", "submit", submitted_at=old)
    reg.update_job("1", state="COMPLETED", ended_at=old + 60)
    reg.add_event(run_id, "retry", {"failed_job": "0", "excluded": ["a1"]})
    reg.add_event(run_id, "retry", {"failed_job": "1", "excluded": ["a1", "a3"]})  # the newest counts
    reg.close()
    env = {"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"), "PATH": "/nonexistent"}
    return run_id, commit, env


def test_status_json_and_text_show_commit_and_excluded_nodes(run_with_provenance):
    run_id, commit, env = run_with_provenance
    r = run_cli("status", run_id, "--json", env=env)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["runs"]
    assert (row["commit"], row["dirty"], row["excluded_nodes"]) == (commit, True, ["a1", "a3"])
    r = run_cli("status", "--all", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runs"] == [row]  # the same row from the summaries (stored at STATUS_FORMAT)
    r = run_cli("status", run_id, env=env | {"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert f"{run_id}: submitted from commit {commit[:8]}+dirty" in r.stdout
    assert f"{run_id}: retries exclude a1, a3" in r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines()), r.stdout


def test_report_eval_shows_the_commit(run_with_provenance):
    run_id, commit, env = run_with_provenance
    r = run_cli("report", "eval", "--json", env=env)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    assert (row["run_id"], row["commit"], row["dirty"]) == (run_id, commit, True)
    r = run_cli("report", "eval", env=env | {"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    words = " ".join(r.stdout.split())  # the notes under the table are wrapped at 80 columns
    assert f"commit {commit[:8]}+ |" in words and "commit+: with uncommitted changes" in words, r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines()), r.stdout


def test_a_run_without_provenance_shows_none(tmp_path):
    reg = Registry(tmp_path / "reg.db")
    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    reg.add_run(RunRecord("old-1", "old", "local", "local", str(run_dir), time.time() - 7200, "u", 1, 10, "COMPLETED"))
    reg.close()
    r = run_cli("status", "old-1", "--json", env={"CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db")})
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["runs"]
    assert (row["commit"], row["dirty"], row["excluded_nodes"]) == (None, None, [])
    assert os.path.isdir(run_dir)
