"""What a run's start-up path imports (issue 29 point 3, docs/performance.md "time to first step").

`clusterctl submit` pickles the job (runs.attempt.Attempt) and hands it to sbatch; it must not pay
for torch (1.4 s of a 1.9 s submit before it was imported lazily). The job unpickles the same class
on every rank before the trainer starts, so what it pulls in is paid once per process too.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, deadline

HEAVY = ("torch", "deepspeed", "webdataset", "numpy", "codecarbon", "pandas")

# What submit does with the job: build the Attempt and pickle it as submitit does (cloudpickle).
PICKLE_ATTEMPT = """
import json, sys
import cloudpickle
from clusterctl.runs import submit
from clusterctl.backends import get_backend
from clusterctl.runs.attempt import Attempt
get_backend("slurm"), get_backend("local")
blob = cloudpickle.dumps(Attempt("/tmp/run", "run-1", "/tmp/registry.db"))
print(json.dumps({"bytes": len(blob), "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)

# What the job does before it calls the Attempt: unpickle it (submitit.core._submit).
UNPICKLE_ATTEMPT = """
import json, pickle, sys
import cloudpickle
from clusterctl.runs.attempt import Attempt
blob = cloudpickle.dumps(Attempt("/tmp/run", "run-1", "/tmp/registry.db"))
for m in [m for m in sys.modules if m.startswith(("clusterctl", "submitit"))]:
    del sys.modules[m]
job = pickle.loads(blob)
print(json.dumps({"type": type(job).__name__, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _probe(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=deadline(60))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_submit_pickles_the_job_without_torch():
    got = _probe(PICKLE_ATTEMPT)
    assert got["bytes"] > 0
    assert got["heavy"] == [], f"submit's path imported {got['heavy']}"


def test_the_job_unpickles_its_attempt_without_torch():
    got = _probe(UNPICKLE_ATTEMPT)
    assert got["type"] == "Attempt"
    assert got["heavy"] == [], f"unpickling the job imported {got['heavy']}"
