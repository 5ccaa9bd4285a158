"""Cost in money (issue 28 point 5): a profile's optional [cost] prices, planning.cost.money, the money
row of `plan` / `estimate` / the stored estimate, and `submit --budget`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterctl.planning.cost import Cost, amount_text, budget_problem, money
from clusterctl.planning.iso4217 import CODES
from clusterctl.planning.profiles import builtin_dir, read_profile
from tests.conftest import run_cli, trainer_shards
from vltrain.common.errors import UserError

PRICES = '\n[cost]\ncurrency = "EUR"\ngpu_hour = 2.5\nkwh = 0.3\n'


def priced(tmp_path: Path, base: str = "a100x32", table: str = PRICES, name: str = "priced") -> Path:
    """A shipped profile with a [cost] table added (renamed: a profile's name is its file's)."""
    text = (builtin_dir() / f"{base}.toml").read_text().replace(f'name = "{base}"', f'name = "{name}"', 1)
    path = tmp_path / f"{name}.toml"
    path.write_text(text + table)
    return path


def _json(*args: str, env: dict | None = None) -> dict:
    r = run_cli(*args, "--json", env=env)
    assert r.returncode in (0, 2), r.stderr  # a dry run without data exits 2 and still states the plan
    return json.loads(r.stdout)


def test_money_is_the_hand_computed_sum_of_its_priced_parts():
    both = money(100.0, 40.0, Cost(currency="EUR", gpu_hour=2.5, kwh=0.3))
    assert both == {"currency": "EUR", "gpu": 250.0, "energy": 12.0, "total": 262.0}
    assert money(100.0, 40.0, Cost(gpu_hour=1.75)) == {"currency": "USD", "gpu": 175.0, "energy": None, "total": 175.0}
    assert money(100.0, 40.0, Cost(kwh=0.25))["total"] == 10.0
    # a profile's dict (as plan.json / the registry keep it) prices the same as its Cost
    assert money(100.0, 40.0, {"cost": {"currency": "EUR", "gpu_hour": 2.5, "kwh": 0.3}}) == both


def test_no_price_is_no_money_never_zero():
    assert money(100.0, 40.0, None) is None
    assert money(100.0, 40.0, {"cost": None}) is None
    assert money(100.0, 40.0, read_profile(builtin_dir() / "a100x32.toml")) is None
    assert money(None, 40.0, Cost(gpu_hour=2.0)) is None  # nothing that is priced is known
    for bad in ({"gpu_hour": "2.5"}, {"gpu_hour": -1}, {"kwh": True}, {"gpu_hour": 1, "currency": "usd"}):
        assert money(1.0, 1.0, {"cost": bad}) is None, bad  # a hand-edited profile.json prices nothing


@pytest.mark.parametrize("name", sorted(p.stem for p in builtin_dir().glob("*.toml")))
def test_shipped_profiles_state_no_price(name):
    """A price is the user's statement about their cluster; no shipped profile makes one up."""
    assert read_profile(builtin_dir() / f"{name}.toml").cost is None


def test_currency_list_matches_pycountry():
    pycountry = pytest.importorskip("pycountry")
    assert {c.alpha_3 for c in pycountry.currencies} == CODES


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('\n[cost]\ncurrency = "XYZ"\ngpu_hour = 1\n', "cost.currency: 'XYZ' is not an ISO 4217 currency code"),
        ('\n[cost]\ncurrency = "usd"\ngpu_hour = 1\n', "cost.currency: 'usd' is not an ISO 4217 currency code"),
        ("\n[cost]\ngpu_hour = -1\n", "cost.gpu_hour: -1"),
        ('\n[cost]\ngpu_hour = "cheap"\n', "cost.gpu_hour: "),
        ("\n[cost]\nkwh = 1e9\n", "cost.kwh: "),
        ("\n[cost]\nprice = 3\n", "cost.price: unknown key; allowed: currency, gpu_hour, kwh"),
        ('\n[cost]\ncurrency = "EUR"\n', "cost: no price; allowed: gpu_hour = PRICE and/or kwh = PRICE"),
    ],
)
def test_bad_cost_table_is_one_line_naming_the_field(tmp_path, table, expected):
    path = priced(tmp_path, table=table)
    with pytest.raises(UserError) as info:
        read_profile(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: {expected}"), msg
    assert "allowed" in msg
    r = run_cli("plan", "--profile", str(path))  # and the CLI: one line, no traceback, non-zero
    assert r.returncode != 0 and "Traceback" not in r.stderr and expected in r.stderr


def test_plan_and_estimate_show_money_from_the_profile_prices(tmp_path):
    path = priced(tmp_path)
    for run in (_json("plan", "--profile", str(path))["estimate"], _json("estimate", "--profile", str(path))):
        m = run["money"]
        assert m["currency"] == "EUR"
        assert m["gpu"] == pytest.approx(run["gpu_hours"] * 2.5, rel=1e-5)
        assert m["energy"] == pytest.approx(run["energy_kwh"] * 0.3, rel=1e-5)
        assert m["total"] == pytest.approx(m["gpu"] + m["energy"], rel=1e-5)
    est = _json("estimate", "--profile", str(path), "--gpu-hours", "1000")
    assert est["money"]["gpu"] == 2500.0  # 1,000 GPU-hours x 2.5 EUR
    text = run_cli("estimate", "--profile", str(path), "--gpu-hours", "1000").stdout
    assert f"cost             {amount_text(est['money']['total'], 'EUR')} (2,500 EUR GPU-hours + " in text
    plan = run_cli("plan", "--profile", str(path)).stdout
    whole = _json("plan", "--profile", str(path))["estimate"]["money"]
    assert " cost  " in plan and amount_text(whole["total"], "EUR") in plan


def test_without_a_price_nothing_is_said_about_money(tmp_path):
    assert _json("plan", "--profile", "a100x32")["estimate"]["money"] is None
    assert _json("estimate", "--profile", "a100x32")["money"] is None
    for args in (("plan", "--profile", "a100x32"), ("estimate", "--profile", "a100x32", "--gpu-hours", "10")):
        out = run_cli(*args).stdout
        assert " cost " not in out and "USD" not in out and "$" not in out


def test_budget_refusal_names_the_flag_the_estimate_and_the_price(tmp_path, env):
    path = priced(tmp_path)
    est = _json("plan", "--profile", str(path))["estimate"]
    low = est["money"]["total"] / 2
    r = run_cli("submit", "--profile", str(path), "--dry-run", "--budget", f"{low}", env=env)
    assert r.returncode == 2
    line = " ".join(r.stdout.split())  # the dry run folds its lines to the terminal's width
    assert "submit would refuse: --budget: " in line
    assert f"the run's estimate {amount_text(est['money']['total'], 'EUR')}" in line
    assert "x 2.5 EUR/GPU-hour" in line and "x 0.3 EUR/kWh" in line and f"exceeds {amount_text(low, 'EUR')}" in line
    r = run_cli("submit", "--profile", str(path), "--budget", f"{low}", env=env)  # the real submit refuses first
    assert r.returncode != 0 and r.stderr.startswith("error: --budget: the run's estimate"), r.stderr
    assert not list((tmp_path / "runs").glob("*/plan.json"))  # nothing submitted


def test_budget_without_a_price_or_not_positive_is_a_usage_error(tmp_path, env):
    for args, expected in (
        (("--profile", "a100x32", "--budget", "100"), "error: --budget: profile 'a100x32' sets no price; allowed:"),
        (("--profile", str(priced(tmp_path)), "--budget", "0"), "error: --budget: 0 is not valid; allowed:"),
    ):
        r = run_cli("submit", *args, "--dry-run", env=env)
        assert r.returncode != 0 and r.stderr.startswith(expected) and r.stderr.count("\n") == 1, r.stderr


def test_amounts_read_as_the_other_figures():
    from clusterctl.render.plan_view import money_text

    for x, text in ((12480.4, "12,480"), (262.0, "262"), (0.18, "0.18"), (0.0123456, "0.0123"), (5.8e-05, "5.8e-05")):
        assert amount_text(x, "EUR") == money_text(x, "EUR") == f"{text} EUR"


def test_budget_pure_check():
    est = {"gpu_hours": 10.0, "energy_kwh": 4.0}
    prices = Cost(currency="JPY", gpu_hour=300.0)
    assert budget_problem(3000, est, prices, "p") is None  # exactly the budget fits
    assert "estimate 3,000 JPY (10 GPU-hours x 300 JPY/GPU-hour) exceeds 2,999 JPY" in budget_problem(
        2999, est, prices, "p"
    )


@pytest.mark.slow
def test_budget_that_covers_the_run_passes_and_the_stored_estimate_is_priced(tmp_path, env):
    """A dry run that the budget covers exits 0 (the local profile, real data), and the plan it stores
    carries the same money as `plan`."""
    data = trainer_shards(tmp_path / "d")
    path = priced(tmp_path, base="local", table="\n[cost]\ngpu_hour = 0.5\n", name="local-priced")
    total = _json("plan", "--profile", str(path))["estimate"]["money"]["total"]
    data_flags = ("--set", f"data.shards={data}/shards", "--set", f"data.tokenizer={data}/tok.model")
    r = run_cli("submit", "--profile", str(path), *data_flags, "--dry-run", "--budget", f"{total * 1.01}", env=env)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr
    d = _json("submit", "--profile", str(path), *data_flags, "--dry-run", "--budget", f"{total * 1.01}", env=env)
    assert not d["checks"]["problems"]
    assert d["plan"]["estimate"]["money"] == {"currency": "USD", "gpu": total, "energy": None, "total": total}


def _usage_world(tmp_path: Path) -> dict[str, str]:
    """Three ended runs (8 GPUs x 1 h each by the registry's start/end): two on the priced profile
    'priced' (CLUSTERCTL_PROFILES), one on a100x32 (no price)."""
    from clusterctl.runs.registry import Registry
    from clusterctl.specs import JobRecord, RunRecord

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    priced(profiles)
    items = []
    for i, prof in enumerate(("priced", "priced", "a100x32")):
        t = 1_780_000_000.0 + i * 7200
        run = RunRecord(f"r{i}", "n", prof, "slurm", str(tmp_path / f"r{i}"), t, "ann", 8, 100, "COMPLETED")
        job = JobRecord(str(100 + i), run.run_id, 1, "submit", t, "COMPLETED", started_at=t)
        job.ended_at, job.exit_code = t + 3600, "0:0"
        items.append((run, [job]))
    reg = Registry(tmp_path / "reg.db")
    reg.insert_runs(items)
    reg.close()
    return {
        "CLUSTERCTL_REGISTRY": str(tmp_path / "reg.db"),
        "CLUSTERCTL_PROFILES": str(profiles),
        "PATH": "/nonexistent",
    }


def test_report_prices_runs_and_profiles_that_have_a_price(tmp_path):
    env = _usage_world(tmp_path)
    rows = {r["key"]: r for r in _json("report", "gpu-hours", "--by", "run", env=env)["rows"]}
    assert rows["r0"]["gpu_hours"] == 8.0 and rows["r0"]["cost"] == 20.0  # 8 GPU-hours x 2.5 EUR
    assert rows["r0"]["currency"] == "EUR" and rows["r1"]["cost"] == 20.0
    assert rows["r2"]["cost"] is None and rows["r2"]["currency"] is None  # a100x32 sets no price: no 0
    by_profile = {r["key"]: r for r in _json("report", "gpu-hours", "--by", "profile", env=env)["rows"]}
    assert by_profile["priced"]["cost"] == 40.0 and by_profile["a100x32"]["cost"] is None
    text = run_cli("report", "gpu-hours", "--by", "run", env=env).stdout
    assert "cost" in text and "EUR" in text
    r0 = next(line for line in text.splitlines() if line.split()[:1] == ["r0"])
    assert r0.split()[-1] == "20", text
    r2 = next(line for line in text.splitlines() if line.split()[:1] == ["r2"])
    assert r2.split()[-1] == "-", text


def test_report_without_any_price_has_no_cost(tmp_path):
    env = _usage_world(tmp_path) | {"CLUSTERCTL_PROFILES": str(tmp_path / "none")}
    rows = _json("report", "energy", "--by", "run", env=env)["rows"]
    assert rows and all("cost" not in r for r in rows)
    assert "cost" not in run_cli("report", "energy", "--by", "run", env=env).stdout


def test_profiles_show_states_the_prices(tmp_path):
    path = priced(tmp_path)
    text = run_cli("profiles", "show", str(path)).stdout
    assert "2.5 EUR per GPU-hour, 0.3 EUR per kWh" in " ".join(text.split())
    assert _json("profiles", "show", str(path))["cost"] == {"currency": "EUR", "gpu_hour": 2.5, "kwh": 0.3}
    assert "cost" not in run_cli("profiles", "show", "a100x32").stdout
