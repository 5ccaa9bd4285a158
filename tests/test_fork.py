"""Fork and extend (clusterctl.runs.fork, lifecycle.extend): `submit --from RUN[@STEP]` with a lower LR
continues from that step with the checkpoint's optimizer, `--weights-only` starts at step 0, the lineage
is in the plan and in `status`; `resume RUN --steps N` extends a completed run to N. Real tiny runs on
the local profile (slow); the parsing and refusals are fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, trainer_shards, wait_until
from tests.test_trainer_run import write_config
from vltrain.common.errors import UserError
from vltrain.schedule import lr_at


def test_from_is_run_or_run_at_step():
    from clusterctl.runs.fork import parse_from

    assert parse_from("tiny-1") == ("tiny-1", None) and parse_from("tiny-1@40") == ("tiny-1", 40)
    for bad in ("@3", "run@", "run@x"):
        with pytest.raises(UserError, match=r"^--from: .* allowed: "):
            parse_from(bad)


def test_from_an_unknown_run_and_weights_only_alone_are_one_line(env):
    for args, words in (
        (("--from", "nope"), "error: --from: no run matches 'nope'; allowed: "),
        (("--weights-only",), "error: --weights-only: only with --from; allowed: "),
    ):
        r = run_cli("submit", "--profile", "local", *args, "--dry-run", env=env)
        assert r.returncode == 2 and r.stderr.startswith(words) and len(r.stderr.splitlines()) == 1, r.stderr


def test_a_step_before_every_checkpoint_is_one_line(tmp_path):
    from clusterctl.runs.fork import pick

    (tmp_path / "checkpoints" / "step_0000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000004" / "COMPLETE").write_text("4\n")
    assert pick(tmp_path, None, "r")[0] == 4 and pick(tmp_path, 9, "r")[0] == 4
    with pytest.raises(UserError, match=r"^--from r@3: no complete checkpoint at or under step 3; .*has: 4\)$"):
        pick(tmp_path, 3, "r@3")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_and(run_dir: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in jsonl(run_dir / "metrics.jsonl") if "loss" in m}


def status(run: str, env: dict) -> dict:
    r = run_cli("status", run, "--json", env=env)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["runs"]
    return row


@pytest.mark.slow
def test_fork_with_a_lower_lr_weights_only_and_extend(tmp_path, env):
    data = trainer_shards(tmp_path / "d")
    cfg = write_config(tmp_path / "a.toml", data, steps=6, checkpoint_every=2, keep_checkpoints=5, precision="fp32")
    base = run_cli("submit", "--profile", "local", "--config", str(cfg), "--name", "base", "--json", env=env)
    assert base.returncode == 0, base.stderr
    base_id, base_dir = json.loads(base.stdout)["run_id"], Path(json.loads(base.stdout)["run_dir"])
    wait_until(lambda: status(base_id, env)["state"] == "COMPLETED", 120, "the base run completes")
    base_loss = steps_and(base_dir, "loss")

    # roll back to step 4 (the newest checkpoint at or under 5) and lower the LR
    r = run_cli("submit", "--profile", "local", "--from", f"{base_id}@5", "--set", "optim.lr=1e-3", "--name",
                "fork", "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    fork_id, fork_dir = json.loads(r.stdout)["run_id"], Path(json.loads(r.stdout)["run_dir"])
    wait_until(lambda: status(fork_id, env)["state"] == "COMPLETED", 120, "the fork completes")
    lrs, losses = steps_and(fork_dir, "lr"), steps_and(fork_dir, "loss")
    first = min(losses)
    assert first > 4 and max(losses) == 6  # it continued at the checkpoint's step
    # step s logs the LR of optimizer step s - 1: the new peak on the old schedule's shape
    assert lrs[first] == pytest.approx(lr_at(first - 1, peak=1e-3, min_lr=1e-4, warmup=2, total=6), rel=1e-6)
    assert abs(losses[first] - base_loss[first]) < 0.2 * base_loss[min(base_loss)]  # the loss continues
    row = status(fork_id, env)
    assert row["lineage"] == {"from_run": base_id, "from_step": 4, "weights_only": False}
    text = run_cli("status", fork_id, env=env)
    assert f"forked from {base_id} at step 4 (weights and optimizer)" in " ".join(text.stdout.split())

    # weights only: step 0, a fresh optimizer
    r = run_cli("submit", "--profile", "local", "--from", base_id, "--weights-only", "--steps", "2", "--name",
                "wo", "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    wo_id, wo_dir = json.loads(r.stdout)["run_id"], Path(json.loads(r.stdout)["run_dir"])
    wait_until(lambda: status(wo_id, env)["state"] == "COMPLETED", 120, "the weights-only fork completes")
    wo_loss = steps_and(wo_dir, "loss")
    assert min(wo_loss) <= 1 and wo_loss[min(wo_loss)] < base_loss[min(base_loss)]  # step 0, trained weights
    assert status(wo_id, env)["lineage"]["weights_only"] is True

    # extend the base run from 6 to 8 steps; 6 is refused in one line
    r = run_cli("resume", base_id, "--steps", "6", env=env)
    assert r.returncode != 0 and "--steps: 6 does not extend" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("resume", base_id, "--steps", "8", env=env)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: status(base_id, env)["state"] == "COMPLETED", 120, "the extended run completes")
    after = steps_and(base_dir, "loss")
    assert max(after) == 8 and status(base_id, env)["total_steps"] == 8
    lr8 = steps_and(base_dir, "lr")
    assert lr8[8] == pytest.approx(1e-4, rel=1e-6)  # the decay re-planned: min_lr at the new last step


def test_a_full_fork_is_refused_across_rank_count_engine_model_and_zero_stage(tmp_path):
    """The trainer's own rules (vltrain.checkpoint.check_compatible), checked at submit: a DeepSpeed
    checkpoint of 2 ranks does not resume on 1; another engine or model or ZeRO stage is one line."""
    from types import SimpleNamespace

    from clusterctl.runs.fork import Source, check
    from vltrain.config import load_train_config, write_resolved_config

    cfg = load_train_config(None, {"steps": 10})
    write_resolved_config(tmp_path / "config.toml", cfg)
    ckpt = tmp_path / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    meta = {"schema": 1, "step": 4, "world_size": 2, "format": "ds", "config_hash": cfg.config_hash()}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    run = SimpleNamespace(run_id="base-1", run_dir=str(tmp_path))
    full, weights = Source(run, 4, ckpt, False), Source(run, 4, ckpt, True)  # type: ignore[arg-type]
    two, one = SimpleNamespace(world_size=2), SimpleNamespace(world_size=1)
    check(full, load_train_config(None, {"steps": 10, "optim.lr": 1e-4}), two)  # a lower LR: fine
    cases = [
        (full, {}, one, r"written by 2 ranks but this run has 1"),
        (full, {"parallel.strategy": "fsdp"}, two, r"written under parallel.strategy 'deepspeed'"),
        (full, {"zero_stage": 1}, two, r"^--from: zero_stage 1 differs from base-1's 2; allowed: "),
        (weights, {"model.text_layers": 2}, one, r"^--from: base-1 trained another model; allowed: "),
        (full, {"steps": 4}, two, r"^--steps: 4 ends at or before step 4; allowed: more than 4$"),
    ]
    for src, change, prof, words in cases:
        with pytest.raises(UserError, match=words) as e:
            check(src, load_train_config(None, {"steps": 10} | change), prof)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    check(weights, load_train_config(None, {"steps": 2, "zero_stage": 1}), one)  # type: ignore[arg-type]
