"""Staged recipes ([[stages]]): parsing and one-line errors, which stage a step is in (vltrain.stages),
the shipped curricula, and for real on CPU: masked image modelling learning in a `vltrain train` run,
and a run stopped inside its first stage that resumes across the stage boundaries bit-identically."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
import tomli_w

from tests.conftest import REPO, run_cli, trainer_shards
from tests.test_trainer_run import jsonl, write_config
from vltrain.common.errors import UserError
from vltrain.config import LossConfig, load_train_config, parse_train_config
from vltrain.stages import stage_at, stage_bounds, stage_name


def _cfg(steps=8, stages=(), **top):
    return parse_train_config({"steps": steps, "stages": list(stages), **top}, "f.toml")


# ---------------------------------------------------------------- parsing
def test_stage_at_follows_the_stage_lengths_and_the_last_takes_the_rest():
    cfg = _cfg(
        10,
        [
            {"name": "warm", "steps": 3, "loss": {"mim": 1.0, "itc": 0.5}},
            {"steps": 4, "loss": {"mim": 0.0}},
            {"loss": {"caption": 2.0, "mim_mask_ratio": 0.5}},
        ],
        loss={"mim": 0.25},
    )
    assert stage_bounds(cfg) == [(1, 3), (4, 7), (8, 10)]
    assert [stage_at(cfg, s)[0] for s in range(0, 12)] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert stage_at(cfg, 2)[1] == LossConfig(mim=1.0, itc=0.5)  # the run's [loss] under the stage's overrides
    assert stage_at(cfg, 5)[1] == LossConfig(mim=0.0)
    assert stage_at(cfg, 9)[1] == LossConfig(mim=0.25, caption=2.0, mim_mask_ratio=0.5)
    assert [stage_name(cfg, i) for i in range(3)] == ["warm", "stage 2", "stage 3"]


def test_without_stages_every_step_has_the_runs_loss():
    cfg = _cfg(5, loss={"itc": 2.0})
    assert stage_bounds(cfg) == [(1, 5)] and stage_at(cfg, 3) == (0, cfg.loss)


def test_uses_mim_sees_every_stage():
    assert not _cfg().uses_mim()
    assert _cfg(loss={"mim": 1.0}).uses_mim()
    assert _cfg(4, [{"steps": 2}, {"loss": {"mim": 0.5}}]).uses_mim()  # off, then on: built from the start
    assert not _cfg(4, [{"steps": 2, "loss": {"mim": 0.0}}, {}], loss={"mim": 0.0}).uses_mim()


@pytest.mark.parametrize(
    "stages, msg",
    [
        ([{"steps": 3}, {"steps": 4}], "stages: their steps sum to 7 but the run has steps = 8; allowed: a sum equal"),
        ([{"steps": 8}, {}], "stages: the stages before the last take 8 of the run's 8 steps; allowed: fewer"),
        ([{}, {"steps": 3}], "stages[0].steps: missing; allowed: an integer >= 1 (only the last stage"),
        ([{"steps": -1}], "stages[0].steps: -1 is out of range; allowed: an integer from 0"),
        (
            [{"steps": 8, "loss": {"mim": -1}}],
            "stages[0].loss.mim: -1 is out of range; allowed: a number from 0 to 100",
        ),
        ([{"steps": 2}, {"loss": {"mim_mask_ratio": 1.0}}], "stages[1].loss.mim_mask_ratio: 1 is out of range"),
        (
            [{"loss": {"mask_prob": 0.2}}],
            "stages[0].loss.mask_prob: unknown key; allowed: itc, mlm, caption, mim, mim_",
        ),
        ([{"loss": {"mim": "a"}}], "stages[0].loss.mim: 'a' is not a number"),
        ([{"loss": {"mim": float("nan")}}], "stages[0].loss.mim: nan is not a finite number"),
        ([{"lr": 1e-3}], "stages[0].lr: unknown key; allowed: name, steps, loss"),
        ([{"loss": 1.0}], "stages[0].loss: 1 is not a table"),
        ([3], "stages[0]: 3 is not a table"),
    ],
)
def test_bad_stages_are_one_line_naming_the_field(stages, msg):
    with pytest.raises(UserError) as e:
        _cfg(8, stages)
    assert str(e.value).startswith("f.toml: " + msg), str(e.value)
    assert "\n" not in str(e.value)


def test_the_stages_resolve_in_a_config_file_and_survive_its_round_trip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('steps = 6\n[[stages]]\nsteps = 2\nloss = { mim = 1.0 }\n[[stages]]\nname = "b"\n')
    cfg = load_train_config(path)
    again = parse_train_config(tomllib.loads(tomli_w.dumps(cfg.to_dict())), "again")
    assert again == cfg and again.config_hash() == cfg.config_hash()
    r = run_cli("train", "--config", str(path), "--set", "steps=2", "--run-dir", str(tmp_path / "r"), prog="vltrain")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: --set stages: the stages before the last take 2 of the run's 2")


def test_config_hash_follows_the_stages_and_the_mim_decoder_only_when_it_is_built():
    staged = _cfg(8, [{"steps": 4}, {"loss": {"mim": 1.0}}])
    assert _cfg(8, [{"steps": 5}, {"loss": {"mim": 1.0}}]).config_hash() != staged.config_hash()
    assert _cfg(8, [{"steps": 4}, {"loss": {"mim": 0.5}}]).config_hash() != staged.config_hash()
    # the decoder's size counts only when the run builds it (older runs' hashes hold without MIM)
    plain = load_train_config(None)
    assert load_train_config(None, {"model.mim_decoder_layers": 2}).config_hash() == plain.config_hash()
    with_mim = load_train_config(None, {"loss.mim": 1.0})
    bigger = load_train_config(None, {"loss.mim": 1.0, "model.mim_decoder_layers": 2})
    assert bigger.config_hash() != with_mim.config_hash() != plain.config_hash()


# ---------------------------------------------------------------- the shipped curricula
def test_seed_001_begins_with_mim_and_contrastive_then_instruction_tuning():
    cfg = load_train_config(REPO / "configs" / "seed-001.toml")
    (first, last), (start2, end) = stage_bounds(cfg)
    assert first == 1 and end == cfg.steps and start2 == last + 1
    first_loss, second_loss = stage_at(cfg, 1)[1], stage_at(cfg, cfg.steps)[1]
    assert first_loss.mim > 0 and first_loss.itc > 0 and first_loss.caption == 0
    assert second_loss.mim == 0 and second_loss.caption > 0
    twin = load_train_config(REPO / "configs" / "seed-001-tiny.toml")
    assert [s.name for s in twin.stages] == [s.name for s in cfg.stages] and stage_bounds(twin)[-1][
        1
    ] == twin.steps == 8
    assert [stage_at(twin, s)[1] for s in (1, 8)] == [first_loss, second_loss]  # the recipe's weights, shorter


def test_seed_004_and_its_twin_run_mim():
    for name in ("seed-004.toml", "seed-004-tiny.toml"):
        cfg = load_train_config(REPO / "configs" / name)
        assert cfg.loss.mim == 1.0 and cfg.loss.mim_mask_ratio == 0.75 and not cfg.stages


# ---------------------------------------------------------------- for real on CPU
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return trainer_shards(tmp_path_factory.mktemp("stages-data"))


def _write(path: Path, data: Path, **top) -> Path:
    """test_trainer_run's tiny config, in fp32 and checkpointed only where the test stops or ends."""
    return write_config(path, data, precision="fp32", checkpoint_every=0, **top)


def _train(cfg: Path, run: Path, *args: str) -> subprocess.CompletedProcess:
    r = run_cli("train", "--config", str(cfg), "--run-dir", str(run), *args, prog="vltrain", env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_mim_loss_is_logged_and_falls_in_a_real_run(data, tmp_path):
    run = tmp_path / "run"
    _train(_write(tmp_path / "c.toml", data, steps=8, loss={"mim": 1.0}), run)
    mim = [m["mim"] for m in jsonl(run / "metrics.jsonl")]
    assert len(mim) == 8 and all(0 < v < 2 for v in mim)
    assert sum(mim[-3:]) < sum(mim[:3]) and mim[-1] < mim[0], mim
    start = next(e for e in jsonl(run / "events.jsonl") if e["event"] == "start")
    from vltrain.model_math import param_count
    from vltrain.presets import get_preset

    assert start["params"] == param_count(get_preset("tiny"), mim=True)


STAGES = [
    {"name": "mim", "steps": 2},  # [loss] mim 1.0
    {"name": "no-mim", "steps": 2, "loss": {"mim": 0.0, "caption": 2.0}},  # MIM off ...
    {"name": "mim-again", "loss": {"mim_mask_ratio": 0.5}},  # ... and on again
]


@pytest.mark.slow
def test_a_run_stopped_in_its_first_stage_resumes_across_the_boundaries_bit_identically(data, tmp_path):
    import torch

    from vltrain import checkpoint

    cfg = _write(tmp_path / "c.toml", data, loss={"mim": 1.0}, stages=STAGES)
    full, parts = tmp_path / "full", tmp_path / "parts"
    _train(cfg, full)
    first = _train(cfg, parts, "--stop-after", "1")
    assert "vltrain: mim (1/3) from step 1: itc 1, mlm 1, caption 1, mim 1, mim_mask_ratio 0.75" in first.stdout
    second = _train(cfg, parts)
    assert "resuming from step_0000001 at step 1/6" in second.stdout

    def trajectory(run):
        return [
            (m["step"], m["loss"], m["itc"], m["mlm"], m["caption"], m["mim"]) for m in jsonl(run / "metrics.jsonl")
        ]

    assert trajectory(parts) == trajectory(full)
    steps = jsonl(full / "metrics.jsonl")
    assert [m["mim"] > 0 for m in steps] == [True, True, False, False, True, True]
    for m in steps:  # the logged loss is the stage's weighted sum
        w = stage_at(load_train_config(cfg), m["step"])[1]
        parts_sum = w.itc * m["itc"] + w.mlm * m["mlm"] + w.caption * m["caption"] + w.mim * m["mim"]
        assert m["loss"] == pytest.approx(parts_sum, rel=1e-5)
    a, b = (checkpoint.module_state(checkpoint.latest(r)) for r in (full, parts))
    assert a.keys() == b.keys() and any(k.startswith("mim_decoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    stage_events = [(e["step"], e["name"]) for e in jsonl(parts / "events.jsonl") if e["event"] == "stage"]
    assert stage_events == [(0, "mim"), (1, "mim"), (2, "no-mim"), (4, "mim-again")]  # the resume re-enters its stage
