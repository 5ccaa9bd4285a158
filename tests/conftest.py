"""Shared test helpers: run the installed console scripts in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120,
            prog: str = "clusterctl") -> subprocess.CompletedProcess:
    """Run an installed console script as a user would (a real subprocess, no in-process runner)."""
    full_env = os.environ | {"COLUMNS": "120", "NO_COLOR": "1"} | (env or {})
    return subprocess.run([str(BIN / prog), *args], cwd=cwd or REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
