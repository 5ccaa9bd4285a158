"""A wheel built from this repository, installed into a fresh venv outside it, has something to submit
to: the eight shipped profiles and the recipes (train configs) come with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO, deadline

pytestmark = pytest.mark.slow

SHIPPED = {"a100x32", "a100x64", "a100x128", "a100x256", "h100x128", "local", "slurm-local", "slurm-local-2x2"}


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=deadline(300))
    assert r.returncode == 0, f"{argv}: {r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, clusterctl) of a fresh venv holding only the wheel; its third-party dependencies come
    from this test's environment through a .pth line (not installed again: torch alone is 800 MB),
    which adds their directory but none of its .pth files, so this checkout's editable install is
    not active there."""
    tmp = tmp_path_factory.mktemp("wheel")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(REPO),
        ],
        cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("clusterctl-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(
        _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    )
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        cwd=tmp,
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLUSTERCTL_", "PYTHON"))} | {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local"),
    }
    return py, site, env, tmp


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    py, site, env, tmp = installed
    where = _run(
        [str(py), "-c", "import clusterctl, vltrain; print(clusterctl.__file__); print(vltrain.__file__)"],
        cwd=tmp,
        env=env,
    ).stdout.split()
    assert all(Path(w).is_relative_to(site) for w in where), where


def test_wheel_lists_the_shipped_profiles(installed):
    py, site, env, tmp = installed
    r = _run([str(py), "-m", "clusterctl", "profiles", "list", "--json"], cwd=tmp, env=env)
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} == SHIPPED and all(row["valid"] for row in rows)
    assert all(Path(row["path"]).is_relative_to(site) for row in rows)  # from the wheel, not the repo


def test_wheel_ships_the_recipes(installed):
    py, site, env, tmp = installed
    code = "import json; from clusterctl.planning.recipes import builtin_recipes as r; print(json.dumps({k: str(v) for k, v in r().items()}))"
    recipes = json.loads(_run([str(py), "-c", code], cwd=tmp, env=env).stdout)
    assert set(recipes) == {p.stem for p in (REPO / "configs").glob("*.toml")} and "tiny" in recipes
    assert all(
        Path(p).is_relative_to(site) and Path(p).read_text() == (REPO / "configs" / f"{k}.toml").read_text()
        for k, p in recipes.items()
    )
