"""Issue 24, points 1 and 2: nothing from the submitting directory runs in the job, and a profile's job
environment is an allow-list.

1. A cloned repository holding a module the trainer imports (`sentencepiece.py`) is the working
   directory of `clusterctl submit`: the job (local executor, and both ranks on the local Slurm
   cluster) must never import it. The module records each import and then hands over to the real
   one, so a job that imports it still completes (as in the issue): only the records tell.
2. A profile from the working directory setting a variable outside planning/job_env.JOB_ENV_ALLOWED
   is refused in one line naming the variable and why, unless --allow-env or the profile is the
   user's own; every allowed name loads without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clusterctl.planning.job_env import JOB_ENV_ALLOWED, NOT_LISTED
from clusterctl.planning.profiles import check_job_env, load_profile, parse_profile
from tests.conftest import REPO, deadline, dry_run_exit, run_cli, slurm_up, tiny_data
from vltrain.common.errors import UserError

# --- 2. the job environment is an allow-list ------------------------------------------------------

# The variables of the issue (each ran code, or was accepted, from a working-directory profile), the
# earlier round's, and names the prefixes and the allow-list catch: (name, words of the reason).
REFUSED = [
    ("OPENSSL_CONF", "loads the engines and providers its file names"),
    ("SLURM_TASK_PROLOG", "srun runs before every task"),
    ("SLURM_TASK_EPILOG", "srun runs after every task"),
    ("SRUN_CONTAINER", "OCI container bundle"),
    ("NCCL_CONF_FILE", "sets any NCCL variable from a file"),
    ("OMP_TOOL_LIBRARIES", "loads OpenMP tool libraries"),
    ("UCX_MODULE_DIR", "loads UCX modules"),
    ("GCONV_PATH", "character-set conversion modules"),
    ("LD_PRELOAD", "preloads a shared library"),
    ("LD_BIND_NOW", "dynamic loader"),  # any LD_*
    ("PYTHONPATH", "first on Python's import path"),
    ("PYTHONINSPECT", "how every Python process starts"),  # any PYTHON*
    ("PYTHONSAFEPATH", "clusterctl's to set"),
    ("BASH_ENV", "runs a file in every non-interactive bash"),
    ("NCCL_NET_PLUGIN", "loads a network plugin"),
    ("NCCL_DEBUG_FILE", "writes NCCL's log over any file"),
    ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "writes the flight recorder's dumps wherever it names"),
    ("CUDA_INJECTION64_PATH", "injection library"),
    ("SLURM_SPANK_PYXIS_IMAGE", "SPANK plugin"),
    ("HOME", "start-up files"),
    ("SOME_NEW_VARIABLE", NOT_LISTED),  # not known to be safe: refused too
]


def _clone(root: Path, env: dict[str, str], name: str = "a100x64") -> Path:
    """A cloned repository: ./cluster_profiles/<name>.toml, a shipped profile with `env` added."""
    cwd = root / "clone"
    (cwd / "cluster_profiles").mkdir(parents=True)
    table = ", ".join(f'{k} = "{v}"' for k, v in env.items())
    src = (REPO / "cluster_profiles" / f"{name}.toml").read_text()
    src = src.replace("[interconnect]\n", f"[interconnect]\nenv = {{ {table} }}\n", 1)
    (cwd / "cluster_profiles" / f"{name}.toml").write_text(src)
    return cwd


@pytest.fixture
def home(tmp_path, monkeypatch):
    """The user's own config directory in tmp_path (platformdirs reads XDG_CONFIG_HOME)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("CLUSTERCTL_PROFILES", raising=False)
    return tmp_path / "config" / "clusterctl" / "profiles"


@pytest.mark.parametrize("var,why", REFUSED, ids=[v for v, _ in REFUSED])
def test_a_variable_off_the_allow_list_is_refused_from_a_working_directory_profile(
    tmp_path, monkeypatch, home, var, why
):
    cwd = _clone(tmp_path, {var: "/tmp/payload", "NCCL_ALGO": "Ring"})
    monkeypatch.chdir(cwd)
    with pytest.raises(UserError) as e:
        load_profile("a100x64")
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith(f"{cwd / 'cluster_profiles' / 'a100x64.toml'}: interconnect.env: {var} "), line
    assert why in line.split(", and this profile")[0], line
    assert "the working directory" in line and "--allow-env" in line and str(home) in line
    assert "NCCL_ALGO" not in line  # allowed: not named
    assert load_profile("a100x64", allow_env=True).interconnect.env[var] == "/tmp/payload"


@pytest.mark.parametrize("var", sorted(JOB_ENV_ALLOWED))
def test_every_allowed_variable_loads_without_allow_env(tmp_path, monkeypatch, home, var):
    cwd = _clone(tmp_path, {var: "1"})
    monkeypatch.chdir(cwd)
    assert load_profile("a100x64").interconnect.env == {var: "1"}


@pytest.mark.parametrize("var", ["OPENSSL_CONF", "SLURM_TASK_PROLOG"])
def test_the_users_own_profile_may_set_any_variable(tmp_path, monkeypatch, home, var):
    mine = _clone(tmp_path, {var: "/opt/site/x"}) / "cluster_profiles" / "a100x64.toml"
    home.mkdir(parents=True)
    (home / "mine.toml").write_text(mine.read_text().replace('name = "a100x64"', 'name = "mine"'))
    monkeypatch.chdir(tmp_path)
    assert load_profile("mine").interconnect.env == {var: "/opt/site/x"}


def test_several_refused_variables_name_the_code_loading_one_first_and_count_the_rest(tmp_path, monkeypatch, home):
    cwd = _clone(tmp_path, {"AAA_UNKNOWN": "1", "SLURM_TASK_PROLOG": "/x", "LD_AUDIT": "/y"})
    monkeypatch.chdir(cwd)
    with pytest.raises(
        UserError, match=r"interconnect\.env: LD_AUDIT .* \(and 2 more: SLURM_TASK_PROLOG, AAA_UNKNOWN\)"
    ):
        load_profile("a100x64")


@pytest.mark.parametrize("var,why", REFUSED[:8], ids=[v for v, _ in REFUSED[:8]])
def test_a_run_directorys_profile_is_checked_the_same_way(tmp_path, var, why):
    """check_job_env is what resume and retry apply to profile.json (anyone who can write the run
    directory can edit it): the same refusal, naming that file."""
    data = json.loads(json.dumps(_profile_table("slurm-local")))
    data["interconnect"]["env"] = {var: "/tmp/payload"}
    profile = parse_profile(data, "profile.json")
    where = str(tmp_path / "profile.json")
    with pytest.raises(UserError, match=rf"^{where}: interconnect\.env: {var} .*comes from a run directory") as e:
        check_job_env(profile, where, "a run directory")
    assert why in str(e.value)
    check_job_env(profile, where, "a run directory", allow_env=True)


def _profile_table(name: str) -> dict:
    import tomllib

    return tomllib.loads((REPO / "cluster_profiles" / f"{name}.toml").read_text())


@pytest.mark.parametrize("var", ["OPENSSL_CONF", "SLURM_TASK_PROLOG", "SRUN_CONTAINER"])
def test_submit_refuses_it_in_one_line_and_accepts_it_with_allow_env(tmp_path, var):
    cwd = _clone(tmp_path, {var: "/tmp/payload"})
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db")}
    r = run_cli("submit", "--profile", "a100x64", "--dry-run", env=env, cwd=cwd)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {cwd / 'cluster_profiles' / 'a100x64.toml'}: interconnect.env: {var} ")
    r = run_cli("submit", "--profile", "a100x64", "--dry-run", "--json", "--allow-env", env=env, cwd=cwd)
    dry_run_exit(r)
    assert json.loads(r.stdout)["env"][var] == "/tmp/payload"


# --- 1. jobs never import from the submitting directory -------------------------------------------

SHADOW = '''"""A module of a cloned repository, named like one the trainer imports: records each import."""
import os, sys
_here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join({markers!r}, "%s-%d" % (os.uname().nodename, os.getpid())), "w") as f:
    f.write(" ".join(sys.argv))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
del sys.modules[__name__]
import sentencepiece as _real  # the real one: the job goes on, as in the issue
sys.modules[__name__] = _real
'''


def _shadowing_clone(root: Path) -> tuple[Path, Path]:
    """A working directory with a `sentencepiece.py` that records imports in `markers`; checked to
    record one when imported the way the job used to import (the working directory on sys.path)."""
    cwd, markers = root / "clone", root / "markers"
    cwd.mkdir()
    markers.mkdir()
    (cwd / "sentencepiece.py").write_text(SHADOW.format(markers=str(markers)))
    probe = [sys.executable, "-c", "import sentencepiece; sentencepiece.SentencePieceProcessor"]
    subprocess.run(probe, cwd=cwd, check=True, timeout=deadline(60), capture_output=True)
    assert len(list(markers.iterdir())) == 1, "the shadowing module must record an unsafe import"
    for p in markers.iterdir():
        p.unlink()
    return cwd, markers


@pytest.mark.parametrize("profile", ["local", "slurm-local", "a100x64"])
def test_every_job_starts_python_with_a_safe_path_in_its_run_directory(tmp_path, profile):
    """The fast guard of what the slow test below shows: the command has -P, the script exports
    PYTHONSAFEPATH=1 (the local controller and what the ranks start) and moves into the run directory."""
    from clusterctl.backends import common, get_backend

    spec = get_backend(load_profile(profile).executor).launch_spec(load_profile(profile), tmp_path / "r", "n")
    setup = spec.params["setup"]
    assert setup[1] == f"cd {tmp_path / 'r'} || exit 1" and "export PYTHONSAFEPATH=1" in setup
    assert common.submitit_command("/f", "/py").startswith("/py -P -u -m submitit.core._submit ")
    assert common.job_python() == f"{sys.executable} -P"


@pytest.mark.slow
@pytest.mark.parametrize(
    "profile",
    ["local", pytest.param("slurm-local", marks=pytest.mark.slurm)],
)
def test_a_module_in_the_submitting_directory_is_never_imported_by_the_job(tmp_path, profile):
    if profile == "slurm-local" and not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    data, tok = tiny_data(tmp_path, n=200)
    cwd, markers = _shadowing_clone(tmp_path)
    env = {
        "CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"),
        "CLUSTERCTL_RUNS_DIR": str(tmp_path / "runs"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    args = ["--config", str(REPO / "configs" / "tiny.toml"), "--set", f"data.shards={data}"]
    args += ["--set", f"data.tokenizer={tok}", "--set", "global_batch=8", "--set", "checkpoint_every=0"]
    r = run_cli(
        "submit", "--profile", profile, *args, "--steps", "2", "--name", "shadow", "--wait", env=env, cwd=cwd, timeout=420
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    (row,) = json.loads(run_cli("status", "shadow", "--json", env=env).stdout)["runs"]
    assert row["state"] == "COMPLETED", row
    ranks = 2 if profile == "slurm-local" else 1
    run_dir = Path(row["run_dir"])
    logs = sorted(run_dir.glob("submitit/*/*_log.out"))
    assert len(logs) >= ranks, logs  # every rank ran (and imported the real sentencepiece: it trained)
    imported = sorted(p.read_text() for p in markers.iterdir())
    assert not imported, f"the job imported {cwd / 'sentencepiece.py'}: {imported}"
