"""Shared test helpers: run the installed console scripts in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    prog: str = "clusterctl",
) -> subprocess.CompletedProcess:
    """Run an installed console script as a user would (a real subprocess, no in-process runner)."""
    full_env = os.environ | {"COLUMNS": "120", "NO_COLOR": "1"} | (env or {})
    return subprocess.run(
        [str(BIN / prog), *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def cli():
    return run_cli


def tiny_data(root: Path, n: int = 1200, vocab: int = 1000) -> tuple[Path, Path]:
    """Synthetic shards and a tokenizer for end-to-end runs of the tiny preset, made with the real CLI."""
    data = root / "data"
    for args in (
        ("data", "synth", "--out", str(data), "--n", str(n), "--shards", "4", "--holdout", "64", "--image-size", "32"),
        ("tokenizer", "train", "--shards", str(data), "--vocab-size", str(vocab), "--out", str(data / "tok.model")),
    ):
        r = run_cli(*args, prog="vltrain", timeout=300)
        assert r.returncode == 0, r.stderr
    return data, data / "tok.model"


def trainer_shards(d: Path, holdout: int = 48) -> Path:
    """The trainer tests' data in `d`: 256 synthetic pairs in 4 shards (32 px, seed 0), `holdout` of
    them held out, and a 1,000-piece tokenizer `d/tok.model` (in-process: the library calls, not the CLI)."""
    from vltrain.data.synth import write_synthetic_shards
    from vltrain.tokenizer import train_tokenizer_from_shards

    write_synthetic_shards(d / "shards", n=256, shards=4, seed=0, image_size=32, holdout=holdout)
    train_tokenizer_from_shards(d / "shards", 1000, d / "tok.model")
    return d


@pytest.fixture(autouse=True)
def _no_launcher_variables_left_behind():
    """A test that builds a trainer session in the pytest process exports torch.distributed's variables
    (vltrain.distenv.export); left there, every later subprocess and job inherits them and runs as a
    one-rank torchrun (this broke 20 tests of one CI run). Fail the test that leaves them."""
    from clusterctl.backends.common import LAUNCHER_VARS

    before = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    after = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    assert after == before, f"this test left torch.distributed's variables in os.environ: {after}"
