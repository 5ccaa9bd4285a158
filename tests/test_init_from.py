"""[init_from] and `vltrain export`: a part's weights out of a real tiny run as safetensors, back in
through [init_from] bit-identical, and the one-line errors (missing file, unknown part, shape mismatch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.test_trainer_run import vltrain, write_config
from vltrain.common.errors import UserError
from vltrain.config import load_train_config
from vltrain.export import select_part
from vltrain.init_from import part_module, part_state, read_source


def test_part_state_takes_the_part_prefix_when_the_source_has_it_and_names_a_wrong_shape():
    target = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    whole = {"vision.w": torch.ones(2, 3), "vision.b": torch.ones(3), "text.w": torch.zeros(4)}
    assert torch.equal(part_state(whole, target, "vision", "")["w"], torch.ones(2, 3))
    exported = {"w": torch.full((2, 3), 5.0), "b": torch.ones(3)}  # an exported part: no prefix
    assert torch.equal(part_state(exported, target, "vision", "")["w"], torch.full((2, 3), 5.0))
    with pytest.raises(UserError, match=r"tensor vision\.w has shape \[3, 2\] in the source but \[2, 3\]"):
        part_state({"vision.w": torch.ones(3, 2), "vision.b": torch.ones(3)}, target, "vision", "")
    with pytest.raises(UserError, match=r"tensor enc\.b missing"):
        part_state({"enc.w": torch.ones(2, 3)}, target, "vision", "enc.")


def test_unknown_part_and_missing_source_are_one_line_errors(tmp_path):
    model = nn.Sequential()
    model.add_module("vision", nn.Linear(2, 2))
    assert part_module(model, "vision") is model.vision and part_module(model, "") is model
    with pytest.raises(UserError, match=r"unknown part 'image'; allowed: vision"):
        part_module(model, "image")
    with pytest.raises(UserError, match=r"init_from.path: .*nope is not a \.safetensors file"):
        read_source(tmp_path / "nope")
    with pytest.raises(UserError, match=r"--part image: no such part.*allowed: text, vision"):
        select_part({"vision.w": 1, "text.w": 2}, "image")


@pytest.mark.slow
def test_export_then_init_from_round_trip_and_a_shape_mismatch_stops_training(tmp_path):
    from safetensors import safe_open

    from tests.conftest import trainer_shards
    from vltrain import checkpoint
    from vltrain.engines.common import build_model

    data = trainer_shards(tmp_path / "d")
    cfg_path = write_config(tmp_path / "a.toml", data, steps=2, checkpoint_every=2)
    run = tmp_path / "run"
    r = vltrain("train", "--config", str(cfg_path), "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    saved = checkpoint.module_state(checkpoint.latest(run))
    out = tmp_path / "vision.safetensors"
    r = vltrain("export", str(run), "--out", str(out), "--part", "vision")
    assert r.returncode == 0 and "step 2" in r.stdout, r.stderr
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["part"] == "vision" and set(f.keys()) == {k[7:] for k in saved if k.startswith("vision.")}
    r = vltrain("export", str(run), "--out", str(tmp_path / "all.safetensors"), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    with safe_open(str(tmp_path / "all.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16} and len(f.keys()) == len(saved)  # noqa: SIM118

    fresh = dict(build_model(load_train_config(cfg_path)).state_dict())
    for source in (out, run):  # the exported part, and the run's own checkpoint
        cfg = load_train_config(cfg_path, {"init_from.path": str(source), "init_from.part": "vision"})
        state = build_model(cfg, initialise=True).state_dict()
        assert all(torch.equal(v.float(), saved[k].float()) for k, v in state.items() if k.startswith("vision."))
        assert all(torch.equal(v, fresh[k]) for k, v in state.items() if k.startswith("text."))  # only the part
        assert not torch.equal(state["vision.patch_embed.weight"], fresh["vision.patch_embed.weight"])

    from safetensors.torch import load_file, save_file

    bad = load_file(out) | {"patch_embed.weight": torch.zeros(1, 2, 3)}  # one tensor of another shape
    save_file(bad, str(tmp_path / "bad.safetensors"))
    r = vltrain(
        "train", "--config", str(cfg_path), "--run-dir", str(tmp_path / "bad"),
        "--set", f"init_from.path={tmp_path / 'bad.safetensors'}", "--set", "init_from.part=vision",
    )  # fmt: skip
    assert r.returncode == 2 and "tensor patch_embed.weight has shape [1, 2, 3]" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = vltrain(  # FSDP loads it on rank 0, before broadcasting and sharding: the same refusal
        "train", "--config", str(cfg_path), "--run-dir", str(tmp_path / "bad-fsdp"), "--set", "parallel.strategy=fsdp",
        "--set", f"init_from.path={tmp_path / 'bad.safetensors'}", "--set", "init_from.part=vision",
    )  # fmt: skip
    assert r.returncode == 2 and "tensor patch_embed.weight has shape [1, 2, 3]" in r.stderr, r.stderr


def _vision_after_build(rank: int, world: int, cfg) -> dict:
    from tests.dist_harness import build_engine, full_state

    engine = build_engine(rank, world, cfg, 1, 1)
    return {k: v for k, v in full_state(engine).items() if k.startswith("vision.")}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ("fsdp", "deepspeed"))
def test_both_engines_start_two_ranks_from_the_file(tmp_path, strategy):
    """FSDP loads on rank 0 and shards; DeepSpeed loads on every rank: either way every rank's model
    holds the file's encoder (another seed's, so it differs from this run's own init)."""
    from safetensors.torch import save_file

    from tests.dist_harness import run_ranks
    from vltrain.config import parse_train_config
    from vltrain.engines.common import build_model

    other = build_model(load_train_config(None, {"seed": 7, "precision": "fp32"}))
    part = {k[7:]: v.contiguous() for k, v in other.state_dict().items() if k.startswith("vision.")}
    save_file(part, str(tmp_path / "enc.safetensors"))
    data = {
        "model": "tiny", "global_batch": 2, "accumulation": 1, "steps": 2, "precision": "fp32", "seed": 0,
        "parallel": {"strategy": strategy}, "zero_stage": 2,
        "init_from": {"path": str(tmp_path / "enc.safetensors"), "part": "vision"},
    }  # fmt: skip
    for state in run_ranks(_vision_after_build, 2, parse_train_config(data, "test.toml")):
        assert state.keys() == {"vision." + k for k in part}
        assert all(torch.equal(state["vision." + k], v.float()) for k, v in part.items())
