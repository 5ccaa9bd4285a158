"""Commands that do not train must not import torch, deepspeed or webdataset (CLI start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, deadline

HEAVY = ("torch", "deepspeed", "webdataset")
# Also slow to import (~90 ms each, more than typer itself) and never needed to show state: typer
# 0.29 pulls pydantic to coerce every parameter, which is why constraints.txt pins typer 0.28.
STARTUP_HEAVY = (*HEAVY, "pydantic", "pandas", "matplotlib", "codecarbon", "numpy")

# Each entry is a command line that must stay light. Grows as commands land.
LIGHT_COMMANDS = [
    ["--help"],
    ["profiles", "list"],
    ["profiles", "show", "a100x64"],
    ["profiles", "validate"],
    ["status"],
    [
        "plan",
        "--profile",
        "a100x64",
        "--model",
        "crossmodal-xl",
        "--global-batch",
        "8192",
        "--activation-checkpointing",
    ],
    ["estimate", "--profile", "a100x32", "--duration", "6w", "--json"],
    ["plan", "--profile", "a100x64"],
    ["presets", "list"],
    ["recipes", "list"],
    ["submit", "--profile", "a100x64", "--dry-run", "--json"],
]

PROBE = """
import json, sys
from typer.testing import CliRunner
from clusterctl.cli import app
r = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({"exit": r.exit_code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (STARTUP_HEAVY,)


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=[" ".join(a) for a in LIGHT_COMMANDS])
def test_light_command_imports_no_heavy_module(argv):
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True, timeout=deadline(60)
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"{argv} imported {result['heavy']}"


# Commands whose answer is lines and aligned columns print plain text (clusterctl.render.text): rich's
# console and tables would cost them ~25 ms to import, as much as their own work.
PLAIN_COMMANDS = [
    ["status"],
    ["status", "--all"],
    ["plan", "--profile", "a100x64", "--model", "crossmodal-xl"],
    ["estimate", "--profile", "a100x32", "--samples", "1.8B", "--model", "crossmodal-xl", "--claimed-co2-t", "5"],
    ["report", "energy"],
    ["report", "gpu-hours", "--by", "month"],
]

MODULES_PROBE = """
import json, sys
from typer.testing import CliRunner
from clusterctl.cli import app
r = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({"exit": r.exit_code, "out": r.output, "modules": sorted(sys.modules)}))
"""


def probe_modules(argv: list[str], tmp_path) -> dict:
    """The exit code, output and every module imported of one command, run in a fresh interpreter
    against an empty registry of its own."""
    env = {**os.environ, "CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db")}
    r = subprocess.run(
        [sys.executable, "-c", MODULES_PROBE, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=deadline(60),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", PLAIN_COMMANDS, ids=[" ".join(a) for a in PLAIN_COMMANDS])
def test_plain_commands_do_not_import_rich(argv, tmp_path):
    d = probe_modules(argv, tmp_path)
    assert d["exit"] == 0, d["out"]
    assert d["out"].strip(), argv  # they did print their answer
    assert [m for m in d["modules"] if m == "rich" or m.startswith("rich.")] == [], argv


def test_plan_opens_no_registry_and_loads_no_backend(tmp_path):
    """`plan` is submit's planning step alone (runs.submit.prepare): the registry, SQLite and the
    backends are what writing and submitting need, and it imports none of them."""
    d = probe_modules(["plan", "--profile", "a100x64", "--model", "crossmodal-xl"], tmp_path)
    assert d["exit"] == 0 and "memory per GPU" in d["out"], d["out"]
    assert "clusterctl.runs.submit" in d["modules"]  # the probe sees the planner's modules
    loaded = [
        m for m in d["modules"] if m in ("sqlite3", "clusterctl.runs.registry") or m.startswith("clusterctl.backends")
    ]
    assert loaded == []
    assert not (tmp_path / "reg.db").exists()


def test_probe_detects_heavy_imports():
    """The probe itself can fail: importing the trainer's engine pulls torch."""
    code = "import sys, vltrain.config; import torch; print([m for m in %r if m in sys.modules])" % (HEAVY,)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=deadline(60))
    assert "torch" in r.stdout


def test_a_command_imports_only_its_own_module(tmp_path):
    """clusterctl/cli.py builds commands on use: `status` never imports planning, runs, watch or reports."""
    code = (
        "import sys; from typer.testing import CliRunner; from clusterctl.cli import app; "
        "r = CliRunner().invoke(app, ['status']); "
        "print(r.exit_code, sorted(m for m in sys.modules if m.startswith('clusterctl.cli.cmd_')))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=deadline(60),
        env={**os.environ, "CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db")},
    )
    code_, modules = r.stdout.strip().splitlines()[-1].split(" ", 1)
    assert code_ == "0" and modules == "['clusterctl.cli.cmd_status']", r.stdout + r.stderr


HELP_PROBE = """
import json, sys
from typer.testing import CliRunner
from clusterctl.cli import app
r = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({"exit": r.exit_code, "out": r.output,
                  "loaded": sorted(m for m in sys.modules if m.startswith(("clusterctl.cli.cmd_", "clusterctl.planning"))),
                  "rich_help": [m for m in ("markdown_it", "pygments", "typer.rich_utils") if m in sys.modules]}))
"""


def test_help_builds_no_command_and_imports_no_rich_markdown():
    """`clusterctl --help` lists every command from the table in clusterctl/cli/__init__.py: no
    command module is imported, and help is click's plain text (no markdown_it, pygments)."""
    from clusterctl.cli import COMMANDS

    r = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, "--help"], cwd=REPO, capture_output=True, text=True, timeout=deadline(60)
    )
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["exit"] == 0 and d["loaded"] == [] and d["rich_help"] == [], d
    text = " ".join(d["out"].split())
    for name, (_, _, help_) in COMMANDS.items():
        assert f"{name} {' '.join(help_.split())}" in text, name  # whole, never cut at 45 characters


def test_help_table_matches_each_command():
    """The help the table lists is each command's own first paragraph (they cannot drift)."""
    import inspect

    from clusterctl.cli import COMMANDS, build_command

    for name, (module, attr, help_) in COMMANDS.items():
        cmd = build_command(name, module, attr)
        assert inspect.cleandoc(cmd.help or "").split("\n\n")[0].replace("\n", " ") == help_, name
        assert cmd.rich_markup_mode is None  # plain help for every command, as for the root


def test_subcommand_help_is_plain():
    r = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, "report", "energy", "--help"], cwd=REPO, capture_output=True, text=True,
        timeout=deadline(60),
    )  # fmt: skip
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["exit"] == 0 and d["rich_help"] == [] and "--since" in d["out"] and "--user" in d["out"], d


def test_estimate_mfu_default_is_the_planners():
    """`estimate --mfu` defaults to planning.plan.DEFAULT_MFU (a copy: the planner is not imported)."""
    from clusterctl.cli import cmd_estimate
    from clusterctl.planning import plan

    assert cmd_estimate.DEFAULT_MFU == plan.DEFAULT_MFU
