"""The profiles commands through typer's runner and through the installed console script."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from clusterctl import __version__
from clusterctl.cli import app

runner = CliRunner()


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"clusterctl {__version__}"


def test_profiles_list_shows_at_least_seven(cli):
    r = cli("profiles", "list")
    assert r.returncode == 0, r.stderr
    for name in ("a100x32", "a100x64", "a100x128", "a100x256", "h100x128", "local", "slurm-local"):
        assert name in r.stdout


def test_profiles_list_json():
    r = runner.invoke(app, ["profiles", "list", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert len([x for x in rows if x["valid"] and not x["shadowed"]]) >= 7
    a = next(x for x in rows if x["name"] == "a100x64")
    assert (a["world_size"], a["nodes"], a["country"]) == (64, 8, "FRA")


def test_profiles_show_a100x64(cli):
    r = cli("profiles", "show", "a100x64")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "64 GPUs" in out and "8 x 8 GPUs" in out
    assert "NVLink + InfiniBand" in out and "France" in out
    assert "19.968 PFLOP/s" in out and "25.6 kW" in out and "5120 GiB" in out


def test_profiles_show_json_has_derived():
    r = runner.invoke(app, ["profiles", "show", "h100x128", "--json"])
    d = json.loads(r.stdout)
    assert d["derived"]["world_size"] == 128
    assert d["derived"]["peak_bf16_pflops"] == round(128 * 989 / 1000, 3)


def test_validate_bad_file_is_one_line_exit_2(cli, tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text('name = "broken"\ndescription = "x"\nexecutor = "slurm"\n[nodes]\ncount = 0\n')
    r = cli("profiles", "validate", str(bad))
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: {bad}: nodes.count: 0 is out of range; allowed: an integer from 1 to 100,000"]
    assert "Traceback" not in r.stderr


def test_debug_flag_shows_traceback(cli, tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("not toml at all = = =")
    r = cli("--debug", "profiles", "validate", str(bad))
    assert r.returncode != 0 and "Traceback" in r.stderr and "UserError" in r.stderr


def test_validate_all_shipped(cli):
    r = cli("profiles", "validate")
    assert r.returncode == 0 and r.stdout.count("ok  ") >= 7


def test_runner_and_script_agree_on_errors():
    r = runner.invoke(app, ["profiles", "show", "no-such-profile"])
    assert r.exit_code == 2
    assert "no profile named 'no-such-profile'" in r.output


def test_user_config_dir_is_searched(cli, tmp_path):
    cfg = tmp_path / "xdg"
    d = cfg / "clusterctl" / "profiles"
    d.mkdir(parents=True)
    src = (cli.__globals__["REPO"] / "cluster_profiles" / "local.toml").read_text()
    (d / "mybox.toml").write_text(src.replace('name = "local"', 'name = "mybox"'))
    r = cli("profiles", "show", "mybox", "--json", env={"XDG_CONFIG_HOME": str(cfg)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "mybox"


import pytest  # noqa: E402


@pytest.mark.parametrize(
    "prog, args, names",
    [
        ("clusterctl", ["watch", "--interval", "0", "x"], "'--interval'"),
        ("clusterctl", ["status", "--bogus"], "--bogus"),
        ("clusterctl", ["statu"], "'status'"),  # with the suggestion
        ("clusterctl", ["logs"], "'run'"),
        ("clusterctl", ["plan", "--profile", "a100x64", "--global-batch", "many"], "'--global-batch'"),
        ("vltrain", ["train", "--bogus"], "--bogus"),
    ],
)
def test_usage_errors_are_one_line_naming_the_flag(cli, prog, args, names):
    """Parse errors read like every other bad input: one line on stderr, exit 2, no framed block."""
    r = cli(*args, prog=prog)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and names in r.stderr, r.stderr
    assert f"(see '{prog}" in r.stderr and "--help')" in r.stderr


def test_no_arguments_still_print_the_help(cli):
    r = cli("profiles")
    assert r.returncode == 2 and "list" in r.stdout and "validate" in r.stdout and "error" not in r.stderr
