"""Hostile readers (issue 24 point 6 and its smaller cases): what status, watch, report, `profiles list`
and `recipes list` read from a run directory, ./cluster_profiles or ./configs may be a FIFO (open()
blocks forever), a link to /dev/zero (never ends), a huge file of zeros (one endless line), a
directory, a binary file or a name that is not UTF-8. Each command must finish, say what it skipped,
and print nothing raw (vltrain.common.safe_read, render.safe). Every case ran into a hang, a
MemoryError or a traceback on the code before.

Every command runs as a subprocess with a time-out (a hang fails the test, never blocks the suite)
and an address-space limit (reading a 4 GiB file whole fails instead of swapping the machine).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from clusterctl.runs.registry import Registry
from tests.conftest import BIN, REPO, deadline, trainer_shards
from tests.test_reliability_registry import add_run, env_for

AS_LIMIT = 2 << 30  # bytes of address space a command may use (clusterctl needs ~300 MB)
HUGE = 4 << 30  # a sparse file of zeros: more than AS_LIMIT, read whole it cannot fit
RUN = "bad-20260101-000000-aaaa"


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def cli(*args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real CLI under a time-out (deadline: the machine's time factor) and AS_LIMIT."""
    return subprocess.run(
        [str(BIN / "clusterctl"), *args],
        cwd=cwd,
        env=os.environ | {"COLUMNS": "120", "NO_COLOR": "1"} | env,
        capture_output=True,
        text=True,
        timeout=deadline(timeout),
        preexec_fn=_limit,
    )


def plant(path: Path, how: str) -> None:
    """Put a hostile thing at `path` (its parent made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif how == "huge":
        with open(path, "wb") as f:
            f.truncate(HUGE)  # sparse: no disk used
    elif how == "directory":
        path.mkdir()
    else:
        raise AssertionError(how)


@pytest.fixture
def fifo_cleanup(tmp_path):
    """FIFOs are removed even when a test fails (pytest's tmp_path keeps the last runs' files)."""
    yield
    for p in tmp_path.rglob("*"):
        if p.is_fifo():
            p.unlink()


# --- 1. run-directory files: status, watch and report read with a cap and skip non-regular files ------

WHERE = {
    "failure record": "failures/rank00000.json",
    "events.jsonl": "events.jsonl",
    "metrics.jsonl": "metrics.jsonl",
    "eval.json": "eval.json",
    "energy file": "energy/node000-0.csv",
    "energy timeline": "energy/node000-0.timeline.jsonl",
    "result pickle": "submitit/9/9_0_result.pkl",
    "task log": "submitit/9/9_0_log.out",
}
COMMANDS = [
    ("status",),
    ("status", "--json"),
    ("status", "--all"),
    ("watch", RUN),  # a failed run: one refresh, then the summary
    ("report", "loss", RUN),
    ("report", "loss", RUN, "--json"),
    ("report", "energy", "--plot", "PLOT"),
]


def _world(tmp_path: Path, where: str, how: str) -> dict[str, str]:
    reg = Registry(tmp_path / "reg.db")
    run_dir = add_run(
        reg, RUN, tmp_path / "runs", [("9", {"state": "FAILED", "elapsed_s": 60.0, "exit_code": "1:0"})], state="FAILED"
    )
    reg.close()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    plant(run_dir / WHERE[where], how)
    return env_for(tmp_path)


@pytest.mark.parametrize("how", ["fifo", "/dev/zero", "huge", "directory"])
@pytest.mark.parametrize("where", list(WHERE))
def test_run_files_that_are_not_regular_or_huge_are_skipped(tmp_path, fifo_cleanup, where, how):
    env = _world(tmp_path, where, how)
    noted = False
    for args in COMMANDS:
        if (args[:2] == ("report", "loss") and where != "metrics.jsonl") or (
            args[:2] == ("report", "energy") and not where.startswith("energy")
        ):
            continue  # a report that does not read this file
        args = tuple(str(tmp_path / "e.png") if a == "PLOT" else a for a in args)
        r = cli(*args, env=env)
        out = r.stdout + r.stderr
        assert "Traceback" not in out, (args, out[-2000:])
        if where == "metrics.jsonl" and args[:2] == ("report", "loss"):
            # nothing else to report: one line naming the file (and what it is, or that it holds no record)
            assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, out)
            assert "metrics.jsonl: " in r.stderr and "allowed: " in r.stderr, r.stderr
            assert how == "huge" or "not a regular file" in r.stderr, r.stderr
            continue
        assert r.returncode in ((0, 1) if args[0] == "watch" else (0,)), (args, out[-2000:])  # watch: 1 = FAILED
        if args == ("status", "--json"):
            notes = json.loads(r.stdout)["notes"]
            noted = noted or any(WHERE[where].split("/")[-1] in n for n in notes)
        else:
            noted = noted or any(WHERE[where].split("/")[-1] in ln and "skipped" in ln for ln in out.splitlines())
    # some command read the file and said it skipped it (a huge metrics.jsonl is read from its tail:
    # only 1 MiB of it, with nothing to say; a huge log is tailed too, a result pickle's head read)
    quiet = how == "huge" and where in ("metrics.jsonl", "task log", "result pickle")  # its head: 1 MiB
    assert noted or quiet, f"no command said it skipped {WHERE[where]}"


def test_a_huge_metrics_file_is_read_only_up_to_its_cap(tmp_path):
    """A metrics.jsonl of zeros (one endless line): the reports read at most METRICS_MAX, a line at most
    safe_read.LINE_MAX, so the good records after the junk are still found."""
    from clusterctl.runs import artifacts
    from vltrain.common import safe_read

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    junk = b"\0" * (3 * safe_read.LINE_MAX)
    good = b"".join(json.dumps({"step": s, "loss": 1.0 / s}).encode() + b"\n" for s in (1, 2, 3))
    (run_dir / "metrics.jsonl").write_bytes(junk + b"\n" + good)
    assert [r["step"] for r in artifacts.metric_rows(run_dir)] == [1, 2, 3]
    assert artifacts.loss_summary(run_dir).steps == 3


# --- 2. profiles list: a FIFO in ./cluster_profiles does not hang it ----------------------------------


@pytest.mark.parametrize(
    "how, said",
    [
        ("fifo", "a FIFO, not a regular file"),
        ("/dev/zero", "a character device, not a regular file"),
        ("huge", "larger than 1 MiB"),
        ("directory", "a directory, not a regular file"),
    ],
)
def test_profiles_list_lists_a_non_regular_profile_as_invalid(tmp_path, fifo_cleanup, how, said):
    plant(tmp_path / "cluster_profiles" / "odd.toml", how)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "HOME": str(tmp_path / "home")}
    r = cli("profiles", "list", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"odd.toml: {said}" in r.stdout, r.stdout
    rows = json.loads(cli("profiles", "list", "--json", env=env, cwd=tmp_path).stdout)
    odd = next(row for row in rows if row["name"] == "odd")
    assert not odd["valid"] and said in odd["error"]
    assert any(row["name"] == "local" and row["valid"] for row in rows)  # the others still listed


# --- 3. recipes list: odd files in ./configs are skipped with a note, never printed raw -----------------


def _odd_recipe(configs: Path, case: str) -> str:
    """Make the case's file in ./configs; returns what its note says."""
    if case == "binary file":
        (configs / "bin.toml").write_bytes((bytes(range(128, 256)) + bytes(range(128))) * 8)  # not UTF-8 first
        return "bin.toml: not UTF-8 text; skipped"
    if case == "non-UTF-8 name":
        (configs / os.fsdecode(b"n\xff\xfe.toml")).write_text("# a recipe\n")
        return "n\\xff\\xfe.toml in "
    if case == "escape codes":
        (configs / "esc.toml").write_text("# ev\x1b[2J\x1b]0;pwn\x07il\u202e\n[model]\n")
        return ""
    plant(configs / "odd.toml", {"directory": "directory", "FIFO": "fifo", "link to /dev/zero": "/dev/zero"}[case])
    return "odd.toml in "


@pytest.mark.parametrize(
    "case", ["binary file", "directory", "FIFO", "link to /dev/zero", "non-UTF-8 name", "escape codes"]
)
def test_recipes_list_skips_what_is_not_a_recipe(tmp_path, fifo_cleanup, case):
    configs = tmp_path / "configs"
    configs.mkdir()
    note = _odd_recipe(configs, case)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    r = cli("recipes", "list", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "seed-000" in r.stdout  # the shipped ones are still listed
    for ch in ("\x1b", "\x07", "\u202e"):
        assert ch not in r.stdout + r.stderr
    if case == "escape codes":
        assert "ev\\x1b[2J\\x1b]0;pwn\\x07il\\u202e" in r.stdout
    else:
        assert any(ln.startswith("note: ") and note in ln for ln in r.stdout.splitlines()), r.stdout
    j = cli("recipes", "list", "--json", env=env, cwd=tmp_path)
    assert j.returncode == 0 and "Traceback" not in j.stderr, j.stderr
    names = [row["name"] for row in json.loads(j.stdout)]  # stdout stays JSON: the notes go to stderr
    assert "seed-000" in names and (case == "escape codes") == ("esc" in names)
    assert (case == "escape codes") or note in j.stderr


# --- 4. a CLUSTERCTL_RUNS_DIR that is not UTF-8 -------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return trainer_shards(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize(
    "args", [("submit", "--profile", "local", "--dry-run"), ("submit", "--profile", "local"), ("registry", "rebuild")]
)
def test_a_runs_directory_that_is_not_utf8_is_one_line_and_makes_nothing(tmp_path, shards, args):
    base = tmp_path / "base"
    base.mkdir()
    env = {
        "CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"),
        "CLUSTERCTL_RUNS_DIR": os.fsdecode(bytes(base) + b"/r\xff"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "HOME": str(tmp_path / "home"),
    }
    data = ("--set", f"data.shards={shards / 'shards'}", "--set", f"data.tokenizer={shards / 'tok.model'}")
    r = cli(*args, *(data if args[0] == "submit" else ()), env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: CLUSTERCTL_RUNS_DIR: ") and r.stderr.count("\n") == 1, r.stderr
    assert "r\\xff' is not UTF-8; allowed: " in r.stderr and "Traceback" not in r.stderr
    assert list(base.iterdir()) == []  # no runs directory, no run directory


# --- 5. numbers a metrics line may hold: the status table stays a table --------------------------------

ODD_METRICS = {
    "step 1e308": {"step": 1e308, "loss": 1.0},
    "step 1.7e308, loss NaN": {"step": 1.7976931348623157e308, "loss": float("nan")},
    "infinite speed and loss": {"step": 5, "loss": float("inf"), "samples_per_s": float("inf")},
    "negative infinity": {"step": 5, "loss": float("-inf"), "samples_per_s": float("-inf"), "mfu": float("nan")},
    "step 1e15": {"step": 1e15, "loss": 2.0},
}


@pytest.mark.parametrize("case", list(ODD_METRICS))
@pytest.mark.parametrize("state", ["RUNNING", "FAILED"])
def test_odd_metrics_numbers_keep_the_status_table_narrow(tmp_path, case, state):
    reg = Registry(tmp_path / "reg.db")
    run_dir = add_run(reg, RUN, tmp_path / "runs", [("9", {"state": state, "elapsed_s": 60.0})], state=state)
    reg.close()
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 3.0}) + "\n" + json.dumps(ODD_METRICS[case]) + "\n"
    )
    env = env_for(tmp_path)
    for args in (("status",), ("status", "--all"), ("report", "loss", RUN)):
        r = cli(*args, env=env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert max(map(len, r.stdout.splitlines())) <= 120, r.stdout  # COLUMNS=120: no 309-digit cell
        if args == ("status",) and case.startswith("step 1"):
            step = ODD_METRICS[case]["step"]
            assert f"{step:.4g}/100" in r.stdout, r.stdout
    if state == "FAILED":  # watch: one refresh, then the summary line
        r = cli("watch", RUN, env=env)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert max(map(len, r.stdout.splitlines())) <= 400, r.stdout


def test_step_text_and_quantity_bound_their_width():
    from clusterctl.render.units import quantity, step_text

    assert step_text(1e308) == "1e+308" and step_text(123456, grouped=True) == "123,456"
    assert step_text(3.7) == "3" and step_text(None) == "-" and step_text(float("nan")) == "-"
    assert step_text(10**400) == "-"  # not a float's range: what metric_record turns into inf
    assert len(quantity(1e308)) < 12 and quantity(12480.0) == "12,480"


def test_the_reader_refuses_before_it_could_block(tmp_path, fifo_cleanup):
    """safe_read in-process, in a child with a time-out: a FIFO is refused without blocking, named as
    one; a capped read of a larger file is refused; the note says 'skipped'."""
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    (tmp_path / "big").write_bytes(b"x" * 100)
    code = (
        "import sys\nfrom vltrain.common import safe_read as s\n"
        "for p, cap in ((sys.argv[1], 10), (sys.argv[2], 10), ('/dev/zero', 10)):\n"
        "    try:\n        s.read_capped(p, cap)\n    except s.NotReadable as e:\n        print(e)\n"
        "print(len(s.read_head(sys.argv[2], 10)), len(s.skipped()))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(fifo), str(tmp_path / "big")],
        capture_output=True,
        text=True,
        timeout=deadline(30),
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"{fifo}: a FIFO, not a regular file",
        f"{tmp_path / 'big'}: larger than 10 bytes, the most read of it",
        "/dev/zero: a character device, not a regular file",
        "10 3",
    ]
