"""bench/gpu_check.py, the one script a lent GPU runs (issue 14), runs its whole code path on CPU here
(the tiny model, a few steps), so that it works the day a GPU is available."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, deadline

pytestmark = pytest.mark.slow


def test_gpu_check_code_path_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--model",
            "tiny",
            "--steps",
            "3",
            "--warmup-steps",
            "1",
            "--micro-batch",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=deadline(300),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["micro_batch"] == 4 and d["samples_per_s"] > 0 and d["mfu"] > 0 and d["planner_total_gib"] > 0
    assert "step 3/3" in r.stdout
