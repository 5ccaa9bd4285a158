"""`submit --snapshot`: the submitted source copied into the run directory, imported by every attempt.

A run is requeued or retried days after submission, and by then its owner has edited, pulled or
switched branches in the work tree the packages are imported from: without a snapshot the requeued
job imports that changed code. `take` copies the two packages a job imports (vltrain, clusterctl) as
they are now into <run_dir>/code/: in a git work tree the files git tracks plus the untracked ones
it does not ignore (`git ls-files -co --exclude-standard`: what `git status` calls the source, as
NeMo-Run's GitArchivePackager takes, but with uncommitted edits, which are what the user ran),
elsewhere every file of the package directories but caches; big files and binary data are left out
(named in provenance.json). backends.common.trainer_env then puts code/ on PYTHONPATH for every
attempt of the run, which comes before site-packages and before an editable install's finder
(setuptools appends its finder to sys.meta_path, after the PYTHONPATH search).

submitit's RsyncSnapshot is not used: it copies the tree and makes it the job's working directory,
and this project's jobs never import from their working directory (they cd into the run directory
and run `python -P`: backends.common.job_python), so PYTHONPATH is what decides what they import.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clusterctl.runs.provenance import PACKAGES, run_git
from vltrain.common.errors import UserError
from vltrain.rundir import RunDir

FILE_MAX = 1 << 20  # a bigger file in a package is data, not source
SKIP_DIRS = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo")


# --- pure ---------------------------------------------------------------------------------------


def choose(files: Iterable[tuple[str, int, bool]]) -> tuple[list[str], list[str]]:
    """(copied, left out) of (path, size, binary) entries: caches, binary data and files over FILE_MAX
    are left out; a Python file is source even when it holds a NUL byte."""
    keep, skip = [], []
    for path, size, binary in files:
        parts = Path(path).parts
        if any(p in SKIP_DIRS for p in parts) or path.endswith(SKIP_SUFFIXES):
            continue
        if size > FILE_MAX or (binary and not path.endswith(".py")):
            skip.append(path)
        else:
            keep.append(path)
    return keep, skip


# --- edge ---------------------------------------------------------------------------------------


def _listed(parent: Path, package: str, notes: list[str]) -> list[str]:
    """The package's files, relative to `parent`: git's view of its source where git tracks it,
    else every file under it."""
    tracked = run_git(parent, "ls-files", "--error-unmatch", "--", f"{package}/__init__.py", notes=notes)
    if tracked is not None:
        listing = run_git(parent, "ls-files", "-co", "--exclude-standard", "-z", "--", package, notes=notes)
        if listing is not None:
            return [p for p in listing.split("\0") if p]
    out = []
    for d, dirs, names in os.walk(parent / package):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        out += [str(Path(d, n).relative_to(parent)) for n in sorted(names)]
    return out


def _entry(parent: Path, rel: str) -> tuple[str, int, bool] | None:
    """(path, size, binary) of a regular file; None when it is gone (deleted since git listed it) or not a file."""
    path = parent / rel
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            head = f.read(8192)
        return rel, path.stat().st_size, b"\0" in head
    except OSError:
        return None


def package_parents() -> dict[str, Path]:
    """Each package a job imports -> the directory it was imported from is in (this process's)."""
    from importlib import import_module

    return {name: Path(import_module(name).__file__ or "").resolve().parent.parent for name in PACKAGES}


def take(run_dir: Path, parents: dict[str, Path] | None = None) -> dict[str, Any]:
    """Copy the packages' source (`parents`: package -> the directory holding it; default: where this
    process imported them from) into <run_dir>/code/ (a temporary name, renamed when whole); returns
    what was copied: files, bytes, where from, what was left out."""
    code = RunDir(run_dir).code
    tmp = code.with_name(f".{code.name}.tmp")
    notes: list[str] = []
    files = size = 0
    skipped: list[str] = []
    sources = {}
    try:
        for package, parent in (parents or package_parents()).items():
            sources[package] = str(parent / package)
            entries = [e for rel in _listed(parent, package, notes) if (e := _entry(parent, rel))]
            keep, skip = choose(entries)
            skipped += skip
            for rel in keep:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(parent / rel, tmp / rel)
                size += (tmp / rel).stat().st_size
            files += len(keep)
        os.replace(tmp, code)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"--snapshot: could not copy the source into {code}: {e.strerror or e}") from None
    return {"dir": RunDir.CODE, "files": files, "bytes": size, "from": sources, "skipped": skipped, "notes": notes}


def summary_line(snap: dict[str, Any]) -> str:
    """'snapshot 153 files, 1.2 MB in RUN_DIR/code (2 left out: big or binary)' for submit's output."""
    left = f" ({len(snap['skipped'])} left out: big or binary)" if snap.get("skipped") else ""
    return f"{snap['files']} files, {snap['bytes'] / 1e6:.1f} MB{left}"
