"""Pipeline parallel (and tensor x pipeline) inside the fsdp engine, for real on CPU (gloo, torchrun
subprocesses, fp32): the same losses as DeepSpeed on one rank (the same data-parallel degree, 1), exact
resume, a tp 2 x pp 2 checkpoint resumed by plain FSDP on one rank, `vltrain eval` of a pipelined run.

Padding: pipeline stages exchange activations of one shape, so under pp > 1 the loader pads text to
model.max_text_len (vltrain.loop.pad_text_to_max). The MLM mask draws one random number per text
position, so the runs compared with a pipelined one pad the same way: they run the trainer through
PADDED, which only sets pad_text_to_max to "always" before the CLI starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, deadline, trainer_shards
from tests.test_fsdp_engine import KEYS, assert_close_runs, config, train, values
from tests.test_trainer_run import (
    ENV,
    _free_port,
    assert_same_weights,
    final_weights,
    jsonl,
    trajectory,
    vltrain,
)

STEPS = 4  # tests.test_fsdp_engine's (assert_close_runs checks steps 1..4)
SMALL = {"global_batch": 8}  # x accumulation 2 (write_config's): microbatches of 4, two per step
PADDED = """
import sys
import vltrain.loop
vltrain.loop.pad_text_to_max = lambda cfg: True  # as a pipelined run pads (tests/test_pp_engine.py)
from vltrain.cli import main
sys.argv[0] = "vltrain"
main()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return trainer_shards(tmp_path_factory.mktemp("pp-data"))


def train_padded(nproc: int, cfg: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    """The trainer with text padded to model.max_text_len whatever the layout (see the module docstring)."""
    script = run.parent / f"{run.name}-padded.py"
    script.write_text(PADDED)
    args = ["train", "--config", str(cfg), "--run-dir", str(run), *extra]
    launcher = [sys.executable] if nproc == 1 else [str(BIN / "torchrun"), "--nproc_per_node", str(nproc)]
    if nproc > 1:
        launcher += ["--master_port", str(_free_port())]
    r = subprocess.run(
        [*launcher, str(script), *args],
        cwd=REPO,
        env=os.environ | ENV,
        capture_output=True,
        text=True,
        timeout=deadline(300),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def pp_config(path: Path, data: Path, **parallel) -> Path:
    return config(path, data, parallel=parallel, **SMALL)


@pytest.fixture(scope="module")
def deepspeed_one(data, tmp_path_factory) -> Path:
    """The reference: DeepSpeed on one rank (data-parallel degree 1, as every layout below), padded."""
    d = tmp_path_factory.mktemp("ds1")
    train_padded(1, config(d / "cfg.toml", data, "deepspeed", **SMALL), d / "run")
    return d / "run"


@pytest.fixture(scope="module")
def pp_run(data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pp2")
    r = train(2, pp_config(d / "cfg.toml", data, pp=2), d / "run")
    assert "fsdp tp 1 x pp 2 x dp 1" in r.stdout and "eval step 4: i2t R@1" in r.stdout
    return d / "run"


@pytest.fixture(scope="module")
def tp_pp_run(data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tp2pp2")
    r = train(4, pp_config(d / "cfg.toml", data, tp=2, pp=2), d / "run")
    assert "fsdp tp 2 x pp 2 x dp 1" in r.stdout
    return d / "run"


def test_text_is_padded_to_the_longest_caption_unless_pipelined(data):
    from vltrain.config import ParallelConfig, TrainConfig
    from vltrain.data.loader import ShardLoader
    from vltrain.loop import pad_text_to_max
    from vltrain.tokenizer import Tokenizer

    assert not pad_text_to_max(TrainConfig(parallel=ParallelConfig(strategy="fsdp", tp=2)))
    assert pad_text_to_max(TrainConfig(parallel=ParallelConfig(strategy="fsdp", pp=2)))
    tok = Tokenizer.load(data / "tok.model")

    def first(pad: bool):
        loader = ShardLoader(
            str(data / "shards"), rank=0, world_size=1, batch_size=4, seed=0, image_size=32, tokenizer=tok,
            max_len=48, train=True, pad_to_max=pad,
        )  # fmt: skip
        return next(iter(loader))

    free, fixed = first(False), first(True)
    longest = int(free["attention_mask"].sum(1).max())
    assert free["input_ids"].shape[1] == longest < 48 and fixed["input_ids"].shape[1] == 48
    assert fixed["input_ids"][:, :longest].equal(free["input_ids"]) and not fixed["attention_mask"][:, longest:].any()


@pytest.mark.slow
def test_pp2_trains_as_deepspeed_on_one_rank(pp_run, deepspeed_one):
    """1F1B over 2 stages on 2 ranks = the same sums as one process: the stages run the model's blocks
    in its order, the microbatches are DeepSpeed's micro steps (same samples, same MLM draws, loss /
    accumulation). Measured: losses equal to <= 1.5e-7 relative (the tied embedding's gradient is the
    sum of the two stages' parts, added in another order), gradient norms <= 1.3e-6 (a sum of
    per-group squares over the stages vs DeepSpeed's norm of its flat buffer). 1e-5 as for FSDP vs
    DeepSpeed (tests/test_fsdp_engine.py): far below what a real difference (a lost tied gradient, an
    unscaled microbatch, a clip) makes, >= 1e-3."""
    worst = assert_close_runs(pp_run, deepspeed_one, rel=1e-5)
    print(f"worst relative difference PP=2 vs DeepSpeed: {worst:.2e}")
    start = jsonl(pp_run / "events.jsonl")[0]
    assert (start["strategy"], start["tp"], start["pp"], start["dp"]) == ("fsdp", 1, 2, 1)
    import torch

    # The stages' DCP checkpoint holds the whole model under DeepSpeed's names (one tied embedding);
    # every weight within 1e-5 (1% of one AdamW step at this LR)
    a, b = final_weights(pp_run), final_weights(deepspeed_one)
    assert a.keys() == b.keys()
    far = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=1e-5)}
    assert not far, far
    meta = json.loads((pp_run / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(meta["files"])


@pytest.mark.slow
def test_tp2_x_pp2_trains_as_deepspeed_on_one_rank(tp_pp_run, deepspeed_one):
    """4 ranks: 2 stages, each split over 2 tensor-parallel ranks. TP adds the row-parallel partial
    products by all-reduce (fp32 sums in another order): measured <= 1.4e-6 relative on the losses,
    2e-6 on the gradient norm; 1e-5 as above."""
    worst = assert_close_runs(tp_pp_run, deepspeed_one, rel=1e-5)
    print(f"worst relative difference TP=2 x PP=2 vs DeepSpeed: {worst:.2e}")


@pytest.mark.slow
def test_interleaved_1f1b_trains_as_deepspeed_on_one_rank(data, deepspeed_one, tmp_path):
    """Two virtual stages per rank (4 stages of the 5 blocks): the same sums as 1F1B (measured <= 1.5e-7)."""
    run = tmp_path / "run"
    train(2, pp_config(tmp_path / "cfg.toml", data, pp=2, pp_schedule="interleaved1f1b"), run)
    assert_close_runs(run, deepspeed_one, rel=1e-5)


@pytest.mark.slow
def test_pp_stop_and_resume_is_exact(pp_run, data, tmp_path):
    cfg = pp_config(tmp_path / "cfg.toml", data, pp=2)
    run = tmp_path / "run"
    train(2, cfg, run, "--stop-after", "1")
    second = train(2, cfg, run)
    assert "resuming from step_0000001 at step 1/4" in second.stdout
    assert trajectory(run) == trajectory(pp_run)  # bit-identical: stages, AdamW, schedule, masking RNG, data
    assert_same_weights(final_weights(run), final_weights(pp_run))


@pytest.mark.slow
def test_a_tp2_x_pp2_checkpoint_resumes_under_plain_fsdp_on_one_rank(tp_pp_run, deepspeed_one, data, tmp_path):
    """DCP keys are the parameter names under every layout: 4 ranks (tp 2 x pp 2) stop at step 2 and
    one rank (plain FSDP, padded as they were) resumes. The data position (dp 1 both times) and the
    masking RNG (stage 0's, rank 0's file) carry over, so steps 3-4 follow the uninterrupted run up
    to the TP rounding above (measured <= 1e-6 relative vs either reference; 1e-5)."""
    run = tmp_path / "run"
    train(4, pp_config(tmp_path / "tp_pp.toml", data, tp=2, pp=2), run, "--stop-after", "2")
    resumed = train_padded(1, config(tmp_path / "fsdp.toml", data, **SMALL), run)
    assert "fsdp tp 1 x pp 1 x dp 1" in resumed.stdout and "resuming from step_0000002 at step 2/4" in resumed.stdout
    got, want = values(run), values(tp_pp_run)
    assert got[1] == want[1] and got[2] == want[2]  # written by the 4-rank attempt
    for reference in (tp_pp_run, deepspeed_one):
        ref = values(reference)
        for s in (3, 4):
            for k in KEYS:
                assert got[s][k] == pytest.approx(ref[s][k], rel=1e-5), (s, k)


@pytest.mark.slow
def test_vltrain_eval_reads_a_pipelined_checkpoint_as_training_did(pp_run):
    in_training = json.loads((pp_run / "eval.json").read_text())
    assert in_training["step"] == STEPS
    r = vltrain("eval", "--run-dir", str(pp_run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 4 (step_0000004), 48 held-out pairs" in r.stdout
    again = json.loads((pp_run / "eval.json").read_text())
    for k in ("i2t", "t2i", "cider", "n"):  # fp32 both times, the same weights
        assert again[k] == in_training[k], k
