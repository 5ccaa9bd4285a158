"""Provenance: what code and environment a run was submitted with, and where each attempt ran.

A run lasts weeks and is requeued and retried; weeks later its owner asks which commit produced it,
whether the tree was dirty, which packages were installed, and which nodes (CUDA, NCCL, driver) it
ran on. `write` records the first part at submission, into the run directory (names in
vltrain.rundir): provenance.json (commit, branch, dirty flag, untracked files, the packages the
submitting process imported and from where, Python, torch, the submitting host), source.diff (the
uncommitted changes, `git diff HEAD`) and pip-freeze.txt. `record_attempt` runs in the job, on local
rank 0 of each node of each attempt, and writes hosts/nodeNNN-<attempt>.json. `read` merges them.

The source recorded is the work tree holding the imported vltrain package (where the code that runs
comes from, whatever the current directory is): if it is a git work tree that tracks the package, its
commit; else null, and the installed packages' versions say what ran. git runs under a time-out, and
a missing or failing git is a note, never an error: provenance must not stop a submission.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vltrain.rundir import RunDir, scheduler_job_id

FORMAT = 1
PACKAGES = ("vltrain", "clusterctl")  # what a job imports of this project
DISTRIBUTION = "clusterctl"  # the installed distribution that ships both
GIT_TIMEOUT_S = 10.0  # each git call; a network filesystem can stall one
DIFF_MAX = 16 << 20  # source.diff is cut beyond this (a tracked data file rewritten): noted
READ_MAX = 1 << 20  # provenance.json and each host file, as read back


# --- pure ---------------------------------------------------------------------------------------


def freeze_lines(dists: Iterable[tuple[str, str, Mapping[str, Any] | None]]) -> list[str]:
    """`pip freeze`'s lines from (name, version, direct_url.json) of each installed distribution,
    first of a name wins (the one Python imports), sorted by name: `name==version`, `name @ url` for a
    direct URL, and an editable install marked as pip marks it (a comment, then `-e PATH`)."""
    seen: dict[str, list[str]] = {}
    for name, version, direct in dists:
        key = name.lower().replace("_", "-")
        if key in seen or not name:
            continue
        url = str((direct or {}).get("url", ""))
        if (direct or {}).get("dir_info", {}).get("editable") and url:
            path = url.removeprefix("file://")
            seen[key] = [f"# Editable install with no version control ({name}=={version})", f"-e {path}"]
        elif url and not url.startswith("file://"):
            seen[key] = [f"{name} @ {url}"]
        else:
            seen[key] = [f"{name}=={version}"]
    return [line for key in sorted(seen) for line in seen[key]]


def porcelain_counts(status: str) -> tuple[bool, int]:
    """(dirty, untracked files) from `git status --porcelain -z`: any tracked change is dirty."""
    entries = [e for e in status.split("\0") if e]
    untracked = sum(e.startswith("?? ") for e in entries)
    dirty = any(len(e) > 3 and e[2] == " " and not e.startswith(("?? ", "!! ")) for e in entries)
    return dirty, untracked


def binary_paths(numstat: str) -> list[str]:
    """Files `git diff --numstat -z` counts as binary ('-' added and removed): their change is only
    named in source.diff ('Binary files ... differ')."""
    out = []
    for entry in numstat.split("\0"):
        parts = entry.split("\t", 2)
        if len(parts) == 3 and parts[0] == "-" and parts[1] == "-" and parts[2]:
            out.append(parts[2])
    return out


def attempt_tag(env: Mapping[str, str]) -> str:
    """This attempt's name: the job id (Slurm's, or the local controller's pid) and Slurm's restart count."""
    job = scheduler_job_id(env) or f"pid{os.getpid()}"
    return f"job{job}-r{env.get('SLURM_RESTART_COUNT', '0') or '0'}"


def merge(record: dict[str, Any], hosts: list[dict[str, Any]]) -> dict[str, Any]:
    """provenance.json with each attempt's nodes under "attempts" (oldest first), as readers show it."""
    attempts: dict[str, list[dict[str, Any]]] = {}
    for h in sorted(hosts, key=lambda h: (h.get("started_at") or 0, h.get("node_rank") or 0)):
        attempts.setdefault(str(h.get("attempt")), []).append(h)
    return record | {"attempts": [{"attempt": k, "nodes": v} for k, v in attempts.items()]}


# --- at submission (edge) -------------------------------------------------------------------------


def source_root() -> Path:
    """The directory holding the imported vltrain package (the code every attempt imports)."""
    import vltrain

    return Path(vltrain.__file__).resolve().parent.parent


def run_git(root: Path, *args: str, notes: list[str]) -> str | None:
    """One git command in `root`: its stdout, or None (and a note) when git is missing, fails or times out.
    GIT_* variables of the submitting shell (a hook's GIT_DIR) would point git at another repository."""
    import subprocess  # here, not at the top: `status` reads provenance and runs no git

    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {"LC_ALL": "C"}
    try:
        r = subprocess.run(
            ["git", "-c", "core.quotepath=off", *args],
            cwd=root,
            env=env,
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        notes.append("git: not installed")
        return None
    except subprocess.TimeoutExpired:
        notes.append(f"git {args[0]}: no answer in {GIT_TIMEOUT_S:g} s")
        return None
    if r.returncode != 0:
        return None
    return r.stdout.decode("utf-8", "surrogateescape")


def git_state(root: Path) -> tuple[dict[str, Any], str]:
    """The commit, branch, dirty flag and untracked files of the work tree holding `root`'s packages,
    and the uncommitted diff (text); all None when `root` is not a git work tree that tracks them
    (an installed package, or a virtual environment inside someone's repository)."""
    notes: list[str] = []
    state: dict[str, Any] = {"git": False, "commit": None, "branch": None, "dirty": None, "untracked": None}
    top = run_git(root, "rev-parse", "--show-toplevel", notes=notes)
    tracked = top and run_git(root, "ls-files", "--error-unmatch", "--", f"{PACKAGES[0]}/__init__.py", notes=notes)
    if not top or not tracked:
        return state | {"notes": notes or [f"{root}: not a git work tree tracking {PACKAGES[0]}"]}, ""
    state |= {"git": True, "work_tree": top.strip()}
    commit = run_git(root, "rev-parse", "--verify", "-q", "HEAD", notes=notes)
    if commit is None:
        return state | {"notes": [*notes, "git: no commit yet"]}, ""
    branch = (run_git(root, "rev-parse", "--abbrev-ref", "HEAD", notes=notes) or "").strip()
    status = run_git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all", notes=notes)
    dirty, untracked = porcelain_counts(status) if status is not None else (None, None)
    state |= {"commit": commit.strip(), "branch": branch if branch not in ("", "HEAD") else None}
    state |= {"dirty": dirty, "untracked": untracked}
    diff = ""
    if dirty:
        diff = run_git(root, "diff", "HEAD", "--no-color", "--no-ext-diff", notes=notes) or ""
        numstat = run_git(root, "diff", "HEAD", "--numstat", "-z", "--no-ext-diff", notes=notes) or ""
        state["binary_changes"] = binary_paths(numstat)
        if len(diff) > DIFF_MAX:
            notes.append(f"source.diff: cut at {DIFF_MAX >> 20} MiB of {len(diff) >> 20} MiB")
            diff = diff[:DIFF_MAX]
    return state | {"notes": notes}, diff


def pip_freeze() -> str:
    """The installed distributions as `pip freeze` prints them, from importlib.metadata: the same
    records pip reads (dist-info METADATA and PEP 610 direct_url.json), without a pip subprocess
    (0.45 s against 0.1 s on this machine, and pip is missing from some environments: uv's)."""
    import json
    from importlib import metadata

    def direct(d: metadata.Distribution) -> Mapping[str, Any] | None:
        try:
            return json.loads(d.read_text("direct_url.json") or "null")
        except ValueError:
            return None

    dists = ((*name_version(d), direct(d)) for d in metadata.distributions())
    return "\n".join(freeze_lines(dists)) + "\n"


def name_version(d: Any) -> tuple[str, str]:
    """A distribution's Name and Version from its metadata's headers alone (they end at the first blank
    line): `d.metadata` runs the email parser over the whole file, the long description included,
    0.18 s of a 0.5 s submit for this environment's 140 distributions."""
    text = d.read_text("METADATA") or d.read_text("PKG-INFO") or ""
    found: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("Name", "Version"):
            found.setdefault(key, value.strip())
    return found.get("Name", ""), found.get("Version", "")


def packages() -> dict[str, Any]:
    """Each package of this project as this process imported it: where from, and its version."""
    from importlib import import_module

    out = {}
    for name in PACKAGES:
        mod = import_module(name)
        # both ship in the one distribution pyproject.toml names (metadata.packages_distributions would
        # say so too, but reads every installed distribution's file list: a quarter of a second)
        out[name] = {"path": str(Path(mod.__file__ or "").resolve().parent), "version": _version(DISTRIBUTION)}
    return out


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:  # the headers alone (name_version): metadata.version parses torch's whole METADATA
        return name_version(metadata.distribution(dist))[1] or None
    except metadata.PackageNotFoundError:
        return None


def collect(root: Path | None = None) -> tuple[dict[str, Any], str, str]:
    """(provenance.json's record, source.diff's text, pip-freeze.txt's text) of this process."""
    import getpass
    import socket

    root = source_root() if root is None else root
    state, diff = git_state(root)
    record = {
        "format": FORMAT,
        "submitted_at": time.time(),
        "submit_host": socket.gethostname(),
        "user": getpass.getuser(),
        "source_root": str(root),
        **state,
        "packages": packages(),
        "python": {"version": sys.version.split()[0], "executable": sys.executable},
        "torch": _version("torch"),  # the installed version, without importing torch in the CLI
    }
    return record, diff, pip_freeze()


def write(run_dir: Path, snapshot: dict[str, Any] | None = None, root: Path | None = None) -> dict[str, Any]:
    """Record what is submitted into `run_dir` (atomic writes); `snapshot`: what submit --snapshot
    copied (runs.snapshot). Returns the record."""
    from vltrain.common.atomic import atomic_write, write_json

    rd = RunDir(run_dir)
    record, diff, freeze = collect(root)
    record["source_diff"] = rd.SOURCE_DIFF if diff else None
    record["pip_freeze"] = rd.PIP_FREEZE
    record["snapshot"] = snapshot
    if diff:
        atomic_write(rd.source_diff, diff.encode("utf-8", "surrogateescape"))
    atomic_write(rd.pip_freeze, freeze)
    write_json(rd.provenance, record)
    return record


# --- in the job (edge) --------------------------------------------------------------------------


def _driver() -> str | None:
    """The NVIDIA kernel driver's version, from /proc (no NVML, no CUDA context); None without one."""
    try:
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    words = line.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), None)


def attempt_record(env: Mapping[str, str]) -> dict[str, Any]:
    """Where this process of the job runs: the node (Slurm's name and the kernel's), the attempt, the
    code it imported, and the CUDA / NCCL / driver versions it sees (None on CPU)."""
    import socket

    import torch

    from vltrain.distenv import detect

    dist = detect(env)
    cuda = torch.cuda.is_available()  # no CUDA context is made: the trainer initialises CUDA itself
    nccl = torch.cuda.nccl.version() if cuda else None
    return {
        "attempt": attempt_tag(env),
        "job_id": scheduler_job_id(env),
        "restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
        "node_rank": dist.node_rank,
        "node": env.get("SLURMD_NODENAME"),
        "hostname": socket.gethostname(),
        "started_at": time.time(),
        "packages": {k: v["path"] for k, v in packages().items()},
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else (str(nccl) if nccl else None),
        "driver": _driver() if cuda else None,
    }


def record_attempt(run_dir: str | Path, env: Mapping[str, str] | None = None) -> None:
    """On local rank 0 of each node: hosts/nodeNNN-<attempt>.json. Never fails the attempt: what goes
    wrong is one line on stderr (the rank's log)."""
    from vltrain.common.atomic import write_json
    from vltrain.distenv import detect

    env = os.environ if env is None else env
    try:
        if detect(env).local_rank != 0:
            return
        rec = attempt_record(env)
        write_json(RunDir(run_dir).host_file(rec["node_rank"], rec["attempt"]), rec)
    except Exception as e:  # provenance is a record, not a duty of the run
        print(f"provenance: where this attempt runs was not recorded: {e}", file=sys.stderr)


# --- readers (edge) ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    from vltrain.common import safe_read

    try:
        data = json.loads(safe_read.read_capped(path, READ_MAX))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's provenance with its attempts' nodes merged in; None when it has none (a run submitted
    before provenance was recorded)."""
    rd = RunDir(run_dir)
    record = _read_json(rd.provenance)
    if record is None:
        return None
    return merge(record, [h for p in rd.host_files() if (h := _read_json(p)) is not None])


def commit_of(run_dir: str | Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) a run was submitted from (status, report); (None, None) when not known."""
    record = _read_json(RunDir(run_dir).provenance) or {}
    commit, dirty = record.get("commit"), record.get("dirty")
    return (commit if isinstance(commit, str) else None), (dirty if isinstance(dirty, bool) else None)
