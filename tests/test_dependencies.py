"""Runs that wait for runs (`submit --after RUN[:ok|any]`, clusterctl.runs.dependencies) and the final
evaluation as its own job (`eval_after = "job"`, clusterctl.runs.evaljob): the parsing and the
sbatch options (fast), the refusals through the real CLI, re-pointing and cancelling dependents
against fake scontrol/scancel, and on the local Slurm cluster (slow, slurm): a dependent that waits
for its run, follows its retry, runs after :any or is cancelled after :ok; an evaluation job that
writes the figures `vltrain eval` gives."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from clusterctl.runs.registry import Registry
from clusterctl.specs import RunRecord, RunState
from tests.conftest import (
    cancel_slurm_jobs_under,
    deadline,
    run_cli,
    slurm_up,
    tar_that_ends_after_one_member,
    tiny_data,
    wait_until,
)
from vltrain.common.errors import UserError

# --- pure ---------------------------------------------------------------------------------------


def test_after_is_parsed_and_rendered_as_slurm_dependencies():
    from clusterctl.runs.dependencies import dependency, parse_after, waiting_words

    assert parse_after("tiny-20261207-0102-ab12") == ("tiny-20261207-0102-ab12", "ok")
    assert parse_after("a:any") == ("a", "any") and parse_after("a:ok") == ("a", "ok")
    for bad in ("a:later", ":ok", "a:"):
        with pytest.raises(UserError, match=r"^--after: .* allowed: "):
            parse_after(bad)
    after = [
        {"run_id": "a", "condition": "ok", "job_id": "12"},
        {"run_id": "b", "condition": "any", "job_id": "13"},
        {"run_id": "c", "condition": "ok", "job_id": None},  # completed already: nothing to wait for
    ]
    assert dependency(after) == "afterok:12,afterany:13"
    assert dependency(after[2:]) is None
    assert waiting_words(after[:2]) == "waiting for run a to complete and run b to end"


def test_attempts_follow_retries_and_side_jobs_die_with_their_dependency():
    """An attempt's dependency (submit --after) must survive the failure of the job it waits for (a
    retry re-points it); a side job (evaluation, follow-up) is cancelled by Slurm instead."""
    from clusterctl.backends.slurm.backend import BACKEND
    from clusterctl.planning.profiles import load_profile

    prof = load_profile("slurm-local")
    attempt = BACKEND.launch_spec(prof, Path("/r/run"), "b", dependency="afterok:12")
    assert attempt.params["additional_parameters"]["dependency"] == "afterok:12"
    assert attempt.params["additional_parameters"]["kill_on_invalid_dep"] == "no"
    assert "--kill-on-invalid-dep=no" in BACKEND.dryrun(attempt)
    side = BACKEND.side_spec(prof, Path("/r/run"), "b-eval", "eval", "afterok:12", gpus=1)
    assert side.params["additional_parameters"]["kill_on_invalid_dep"] == "yes"
    assert side.params["gpus_per_node"] == 1 and side.folder == "/r/run/side/eval"
    assert "dependency" not in BACKEND.launch_spec(prof, Path("/r/run"), "b").params["additional_parameters"]


def test_eval_after_is_a_validated_choice_and_skips_only_the_final_evaluation():
    from clusterctl.planning.profiles import load_profile
    from clusterctl.runs.evaljob import problems
    from vltrain.config import TrainConfig, load_train_config

    assert TrainConfig().final_eval_in_training() and not TrainConfig(eval_after="job").final_eval_in_training()
    with pytest.raises(UserError, match=r"^--set eval_after: 'later' .*allowed: train, job"):
        load_train_config(None, None, ("--set", {"eval_after": "later"}))
    (line,) = problems(load_profile("local"), {"eval_after": "job"})
    assert line.startswith("eval_after: ") and "allowed: " in line and "\n" not in line
    assert problems(load_profile("slurm-local"), {"eval_after": "job"}) == []
    assert problems(load_profile("local"), {"eval_after": "train"}) == []


# --- registry + fake Slurm tools ----------------------------------------------------------------


def _run(reg: Registry, root: Path, name: str, state: str, job_state: str, job_id: str, **plan) -> RunRecord:
    run = RunRecord(
        run_id=f"{name}-20261207-000000-0000",
        name=name,
        profile="slurm-local",
        executor="slurm",
        run_dir=str(root / name),
        created_at=time.time(),
        user="u",
        gpus=2,
        total_steps=10,
        state=state,
        plan={"max_retries": 0} | plan,
    )
    Path(run.run_dir).mkdir(parents=True)
    reg.add_run(run)
    reg.add_job(run.run_id, job_id, "submit")
    reg.update_job(job_id, state=job_state, exit_code="1:0" if job_state == RunState.FAILED else None)
    return run


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """scontrol and scancel that record their arguments (one line per call) and succeed."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("scontrol", "scancel"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return lambda: log.read_text().splitlines() if log.exists() else []


def test_a_new_attempt_repoints_the_runs_waiting_for_it(tmp_path, fake_slurm):
    from clusterctl.runs.dependencies import on_new_attempt

    reg = Registry(tmp_path / "reg.db")
    a = _run(reg, tmp_path, "a", RunState.FAILED, RunState.FAILED, "100")
    other = _run(reg, tmp_path, "o", RunState.RUNNING, RunState.RUNNING, "300")
    after = [{"run_id": a.run_id, "condition": "ok", "job_id": "100"}]
    after += [{"run_id": other.run_id, "condition": "any", "job_id": "300"}]
    b = _run(reg, tmp_path, "b", RunState.PENDING, RunState.PENDING, "200", after=after)
    started = _run(reg, tmp_path, "s", RunState.RUNNING, RunState.RUNNING, "400", after=after[:1])
    reg.add_job(a.run_id, "101", "retry")  # what submit_attempt did before calling on_new_attempt
    on_new_attempt(reg, a, None, "101")  # type: ignore[arg-type]  (no eval_after: the profile is unused)
    # the pending dependent waits for the retry now; the one that started already is left alone
    assert fake_slurm() == ["scontrol update JobId=200 Dependency=afterok:101,afterany:300"]
    (ev,) = [e["data"] for e in reg.events(b.run_id) if e["kind"] == "dependency"]
    assert ev == {"job_id": "200", "dependency": "afterok:101,afterany:300"}
    assert not [e for e in reg.events(started.run_id) if e["kind"] == "dependency"]


def test_a_run_that_failed_for_good_cancels_its_ok_dependents_and_names_itself(tmp_path, fake_slurm):
    from clusterctl.runs.dependencies import settle
    from clusterctl.runs.status import Refresh

    reg = Registry(tmp_path / "reg.db")
    a = _run(reg, tmp_path, "a", RunState.FAILED, RunState.FAILED, "100")  # max_retries 0: for good
    ok = _run(reg, tmp_path, "b", RunState.PENDING, RunState.PENDING, "200", after=[_after(a, "ok")])
    anyway = _run(reg, tmp_path, "c", RunState.PENDING, RunState.PENDING, "300", after=[_after(a, "any")])
    waiting = {r.run_id: {"reason": "DependencyNeverSatisfied", "detail": "x"} for r in (ok, anyway)}
    fresh = Refresh(states={}, jobs={}, waiting=waiting)
    notes = settle(reg, [a, ok, anyway], fresh)
    assert fake_slurm() == ["scancel 200"]
    assert reg.get_run(ok.run_id).state == RunState.CANCELLED and reg.jobs(ok.run_id)[0].state == RunState.CANCELLED
    (cancel,) = [e["data"] for e in reg.events(ok.run_id) if e["kind"] == "cancel"]
    assert a.run_id in cancel["reason"] and "FAILED" in cancel["reason"] and cancel["job_id"] == "200"
    assert notes == [f"{ok.run_id}: cancelled: {cancel['reason']}"]
    assert reg.get_run(anyway.run_id).state == RunState.PENDING  # :any starts once a ended, however
    assert waiting[anyway.run_id]["detail"] == f"waiting for run {a.run_id} to end"


def test_a_run_that_will_be_retried_keeps_its_dependents(tmp_path, fake_slurm):
    from clusterctl.runs.dependencies import settle
    from clusterctl.runs.status import Refresh

    reg = Registry(tmp_path / "reg.db")
    a = _run(reg, tmp_path, "a", RunState.FAILED, RunState.FAILED, "100", max_retries=2)
    reg.update_job("100", exit_code="137:0")  # killed: the cluster's failure, a retry comes
    b = _run(reg, tmp_path, "b", RunState.PENDING, RunState.PENDING, "200", after=[_after(a, "ok")])
    a = reg.get_run(a.run_id)
    assert settle(reg, [a, b], Refresh(states={}, jobs={})) == []
    reg.update_job("100", exit_code="")  # FAILED, and accounting has no exit code yet: wait for it
    assert settle(reg, [a, b], Refresh(states={}, jobs={})) == []
    assert fake_slurm() == [] and reg.get_run(b.run_id).state == RunState.PENDING
    reg.update_job("100", exit_code="1:0")  # the code's failure, not the cluster's: no retry comes
    assert settle(reg, [b], Refresh(states={}, jobs={}))[0].startswith(f"{b.run_id}: cancelled: run {a.run_id}")
    assert fake_slurm() == ["scancel 200"] and reg.get_run(b.run_id).state == RunState.CANCELLED


def _after(run: RunRecord, cond: str) -> dict:
    return {"run_id": run.run_id, "name": run.name, "condition": cond, "job_id": "100"}


# --- the CLI's refusals: one line, exit 2, nothing written ---------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("deps")
    shards, tok = tiny_data(root, n=400)
    cfg = root / "train.toml"
    cfg.write_text(
        f'model = "tiny"\nglobal_batch = 16\nsteps = 6\nprecision = "fp32"\nlog_every = 1\n'
        f'checkpoint_every = 3\nkeep_checkpoints = 2\n[data]\nshards = "{shards}"\ntokenizer = "{tok}"\n'
        f"[optim]\nlr = 1e-3\nwarmup_steps = 2\n"
    )
    bad = root / "bad"  # shards only the trainer finds empty: a run that fails on the user's account
    bad.mkdir()
    tar_that_ends_after_one_member(bad / "00000.tar")
    return {"root": root, "cfg": cfg, "bad": bad}


def _refused(r: subprocess.CompletedProcess, env: dict, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    runs = Path(env["CLUSTERCTL_RUNS_DIR"])
    assert not runs.exists() or not any(runs.iterdir())  # no run directory left


def test_after_refusals(data, env, tmp_path):
    reg = Registry(Path(env["CLUSTERCTL_REGISTRY"]))
    failed = _run(reg, tmp_path, "a", RunState.FAILED, RunState.FAILED, "100")
    before = reg.count_runs()
    common = ("submit", "--config", str(data["cfg"]), "--name", "b")
    r = run_cli(*common, "--profile", "slurm-local", "--after", "nosuchrun", env=env)
    _refused(r, env, "--after", "nosuchrun", "allowed:")
    r = run_cli(*common, "--profile", "slurm-local", "--after", f"{failed.run_id}:ok", env=env)
    _refused(r, env, "--after", failed.run_id, "FAILED", ":any")
    r = run_cli(*common, "--profile", "slurm-local", "--after", "a:soon", env=env)
    _refused(r, env, "--after", "RUN[:ok|any]")
    r = run_cli(*common, "--profile", "local", "--after", failed.run_id, env=env)
    _refused(r, env, "--after", "'local'", "allowed:")
    r = run_cli(*common, "--profile", "local", "--set", "eval_after=job", env=env)
    _refused(r, env, "eval_after", "'local'", "allowed:")
    assert Registry(Path(env["CLUSTERCTL_REGISTRY"])).count_runs() == before  # no registry row either


def test_a_local_backend_refuses_a_dependency_in_one_line():
    from clusterctl.backends.local import BACKEND
    from clusterctl.planning.profiles import load_profile

    with pytest.raises(UserError, match=r"^--after: .*allowed: --after with a Slurm profile$"):
        BACKEND.launch_spec(load_profile("local"), Path("/r/run"), "b", dependency="afterok:1")


# --- on the local Slurm cluster -----------------------------------------------------------------


@pytest.fixture
def slurm_env(env):
    if not slurm_up():
        pytest.skip("the local Slurm cluster is not running (scripts/slurm-local.sh up)")
    yield env
    cancel_slurm_jobs_under(Path(env["CLUSTERCTL_RUNS_DIR"]))


def _submit(data, env, name, *extra) -> dict:
    r = run_cli(
        "submit", "--profile", "slurm-local", "--config", str(data["cfg"]), "--name", name, "--json", *extra, env=env
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _status(env, run_id) -> dict:
    r = run_cli("status", run_id, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["runs"][0]


def _scontrol_job(job_id: str) -> str:
    return subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=deadline(30)
    ).stdout


def _ended(env, run_id, seconds=300) -> dict:
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    return wait_until(lambda: (row := _status(env, run_id))["state"] in final and row, seconds, f"{run_id} to end")


@pytest.mark.slow
@pytest.mark.slurm
def test_a_dependent_waits_follows_a_retry_and_is_cancelled_when_its_run_fails_for_good(data, slurm_env):
    """A held: B --after A waits (reason Dependency, status names A), follows A's new attempt (the
    sbatch of a retry, submitted held) and is cancelled once A failed for good (its shards hold no
    sample: the user's failure, not retried); C --after A:any starts then and completes."""
    env = slurm_env
    a = _submit(data, env, "depa", "--hold", "--set", f"data.shards={data['bad']}")
    b = _submit(data, env, "depb", "--after", a["run_id"])
    c = _submit(data, env, "depc", "--after", f"{a['run_id']}:any")
    assert f"Dependency=afterok:{a['job_id']}" in _scontrol_job(b["job_id"])
    row = wait_until(lambda: (s := _status(env, b["run_id"]))["pending_reason"] == "Dependency" and s, 60, "B held")
    assert row["state"] == "PENDING" and row["pending_detail"] == f"waiting for run {a['run_id']} to complete"

    from clusterctl.runs.submit import run_profile, submit_attempt

    reg = Registry(Path(env["CLUSTERCTL_REGISTRY"]))
    run_a = reg.get_run(a["run_id"])
    old = os.environ.get("CLUSTERCTL_RUNS_DIR")
    try:
        os.environ.update(env)  # the attempt's job environment is the submitter's
        new = submit_attempt(reg, run_a, run_profile(run_a), "retry", hold=True)
    finally:
        for k in env:
            os.environ.pop(k, None)
        if old is not None:
            os.environ["CLUSTERCTL_RUNS_DIR"] = old
    subprocess.run(["scancel", a["job_id"]], check=True, timeout=deadline(30))  # the first attempt's job
    assert f"Dependency=afterok:{new}" in _scontrol_job(b["job_id"])  # B follows A's new job
    assert f"Dependency=afterany:{new}" in _scontrol_job(c["job_id"])

    subprocess.run(["scontrol", "release", new], check=True, timeout=deadline(30))  # A runs, and fails
    assert _ended(env, a["run_id"])["state"] == "FAILED"
    # whoever refreshes A or B next cancels B: a status, or A's follow-up job (runs.followup)
    wait_until(lambda: _status(env, b["run_id"])["state"] == "CANCELLED", 120, "B cancelled")
    (why,) = [e["data"]["reason"] for e in reg.events(b["run_id"]) if e["kind"] == "cancel"]
    assert why.startswith(f"run {a['run_id']} ended FAILED and will not be retried"), why
    assert len(reg.jobs(a["run_id"])) == 2  # not retried: the user's failure
    assert not [e for e in reg.events(c["run_id"]) if e["kind"] == "cancel"]
    assert _ended(env, c["run_id"])["state"] == "COMPLETED"


@pytest.mark.slow
@pytest.mark.slurm
def test_eval_after_job_evaluates_in_its_own_job_and_a_dependent_starts_after_it_completed(data, slurm_env):
    """A with eval_after = "job": its training job evaluates nothing, its evaluation job writes the
    figures `vltrain eval` gives for the same checkpoint. B --after A starts only once A COMPLETED."""
    env = slurm_env
    sub = _submit(data, env, "evj", "--set", "eval_after=job")
    b = _submit(data, env, "okb", "--after", sub["run_id"])
    run_dir = Path(sub["run_dir"])
    reg = Registry(Path(env["CLUSTERCTL_REGISTRY"]))
    (queued,) = [e["data"] for e in reg.events(sub["run_id"]) if e["kind"] == "eval_job"]
    assert queued["after"] == sub["job_id"] and queued["job_id"] != sub["job_id"]
    assert f"Dependency=afterok:{sub['job_id']}" in _scontrol_job(queued["job_id"])
    assert _ended(env, sub["run_id"])["state"] == "COMPLETED"
    log = run_cli("logs", sub["run_id"], env=env).stdout
    finish = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if '"finish"' in x]
    assert "step 6/6" in log and "R@1" not in log  # the training job evaluated nothing
    assert finish and finish[-1].get("recall_i2t_r1") is None
    ev_path = run_dir / "eval.json"
    wait_until(ev_path.exists, 300, "the evaluation job's eval.json")
    job_eval = json.loads(ev_path.read_text())
    (log,) = (run_dir / "side" / "eval" / queued["job_id"]).glob("*_log.out")  # beside the attempts, not in them
    assert "eval step 6: " in log.read_text()
    assert _status(env, sub["run_id"])["eval"]["step"] == 6  # status shows it
    r = run_cli("eval", "--run-dir", str(run_dir), prog="vltrain", timeout=300)
    assert r.returncode == 0, r.stderr
    again = json.loads(ev_path.read_text())
    same = ("n", "i2t", "t2i", "cider", "step", "samples", "checkpoint")
    assert {k: job_eval[k] for k in same} == {k: again[k] for k in same}
    assert _ended(env, b["run_id"])["state"] == "COMPLETED"
    jobs = {j.run_id: j for r in (sub, b) for j in reg.jobs(r["run_id"])}
    assert jobs[b["run_id"]].started_at >= jobs[sub["run_id"]].ended_at  # sacct's times: B after A


class _FakeBackend:
    """What evaljob.arm asks of a backend, recorded: side jobs submitted and jobs cancelled."""

    def __init__(self, fail: bool = False) -> None:
        self.submitted: list[tuple[str, str, int]] = []
        self.cancelled: list[str] = []
        self.fail = fail

    def side_spec(self, profile, run_dir, job_name, kind, dependency, gpus=0):
        return (job_name, kind, dependency, gpus, str(run_dir))

    def submit(self, spec, fn):
        if self.fail:
            raise RuntimeError("sbatch: error: Batch job submission failed")
        name, kind, dependency, gpus, run_dir = spec
        assert kind == "eval" and fn.run_dir == run_dir and name.endswith("-eval")
        self.submitted.append((name, dependency, gpus))
        return f"e{len(self.submitted)}"

    def cancel(self, job_id):
        self.cancelled.append(job_id)


def test_the_evaluation_job_is_queued_after_each_new_attempt_once(tmp_path, monkeypatch):
    import clusterctl.backends as backends
    from clusterctl.runs import evaljob
    from clusterctl.runs.dependencies import on_new_attempt

    fake = _FakeBackend()
    monkeypatch.setattr(backends, "get_backend", lambda name: fake)
    reg = Registry(tmp_path / "reg.db")
    run = _run(reg, tmp_path, "a", RunState.PENDING, RunState.PENDING, "10")
    run.config = {"eval_after": "job"}
    assert evaljob.arm(reg, run, None, "10") == "e1"  # type: ignore[arg-type]
    assert fake.submitted == [("a-eval", "afterok:10", 1)] and evaljob.latest(reg, run.run_id) == {
        "job_id": "e1",
        "after": "10",
    }
    assert evaljob.arm(reg, run, None, "10") is None  # a requeue keeps the job id: the evaluation stays
    assert evaljob.arm(reg, run, None, "11") == "e2"  # a retry: after the new job, the old one cancelled
    assert fake.submitted[-1] == ("a-eval", "afterok:11", 1) and fake.cancelled == ["e1"]
    run.config = {"eval_after": "train"}
    assert evaljob.arm(reg, run, None, "12") is None and len(fake.submitted) == 2
    fake.fail, run.config = True, {"eval_after": "job"}
    on_new_attempt(reg, run, None, "13")  # type: ignore[arg-type]  (the attempt stands; the miss is recorded)
    assert "Batch job submission failed" in evaljob.latest(reg, run.run_id)["error"]
    fake.fail = False
    assert evaljob.arm(reg, run, None, "13") == "e3" and fake.cancelled[-1] == "e2"  # the last one queued
