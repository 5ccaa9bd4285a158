"""Layout rules (vltrain.parallel.layout) and what one GPU holds under tp x pp (clusterctl.planning.stages,
fsdp), checked against an independent count: the model's own parameters on the meta device."""

from __future__ import annotations

import dataclasses

import pytest

from clusterctl.planning import fsdp
from clusterctl.planning.memory import GIB
from clusterctl.planning.stages import in_flight, rank_shares
from vltrain.config import LossConfig, ParallelConfig, TrainConfig
from vltrain.model_math import activation_bytes_per_sample, forward_flops_per_sample, param_count
from vltrain.parallel.layout import (
    data_parallel,
    layout_problems,
    microbatch_problem,
    pipeline_blocks,
)
from vltrain.parallel.stage_split import stage_blocks, stage_ranges
from vltrain.presets import get_preset


def _cfg(model="base", strategy="fsdp", tp=1, pp=1, zero_stage=2, schedule="1f1b", accumulation=0, mim=0.0):
    return TrainConfig(
        model=model,
        zero_stage=zero_stage,
        accumulation=accumulation,
        parallel=ParallelConfig(strategy=strategy, tp=tp, pp=pp, pp_schedule=schedule),
        loss=LossConfig(mim=mim),
    )


# --- the rules -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, world, gpn, start",
    [
        (_cfg("vl-22b", tp=3), 96, 8, "parallel.tp: 3 does not divide model.vision_heads 32"),
        (_cfg("vl-22b", tp=16), 128, 16, "parallel.tp: 16 does not divide model.text_heads 40"),
        (_cfg("vl-30b", tp=16), 128, 8, "parallel.tp: 16 does not divide a node's 8 GPUs"),
        (_cfg("base", tp=4, pp=3), 64, 8, "parallel.pp: 3 does not divide the 16 ranks left by parallel.tp 4"),
        (_cfg("tiny", pp=8), 64, 8, "parallel.pp: 8 stages is more than the model's 5 pipeline blocks"),
        (_cfg("tiny", pp=4, schedule="interleaved1f1b"), 64, 8, "parallel.pp: 4 stages x 2 virtual stages"),
        (_cfg("base", strategy="deepspeed", tp=2), 64, 8, 'parallel.tp: 2 needs parallel.strategy = "fsdp"'),
        (_cfg("base", zero_stage=1), 64, 8, "zero_stage: 1 is not an FSDP layout"),
        (_cfg("base", pp=2, mim=1.0), 64, 8, "loss.mim: masked image modelling is not supported with pipeline"),
        (_cfg("base", pp=4, accumulation=2), 64, 8, "accumulation: 2 microbatches are fewer than the parallel.pp 4"),
    ],
)
def test_layouts_the_model_cannot_take_are_one_line_naming_the_field(cfg, world, gpn, start):
    problems = layout_problems(cfg, world, gpn)
    assert problems and problems[0].startswith(start), problems
    assert all("\n" not in p and "allowed:" in p for p in problems)


def test_valid_layouts_have_no_problems_and_allowed_lists_are_valid():
    assert layout_problems(_cfg("vl-22b", tp=4, pp=2, accumulation=16), 128, 8) == []
    assert layout_problems(_cfg("base", strategy="deepspeed", zero_stage=1), 64, 8) == []
    # every value an error offers as allowed passes
    (msg,) = layout_problems(_cfg("vl-22b", tp=3), 128, 8)
    for tp in map(int, msg.rpartition("allowed: ")[2].split(", ")):
        assert layout_problems(_cfg("vl-22b", tp=tp), 128, 8) == [], tp
    # the trainer does not know the node: the node rule is skipped, the others kept
    assert layout_problems(_cfg("vl-30b", tp=16), 128, None) == []


def test_microbatch_rules_are_torchs():
    """Schedule1F1B raises when n_microbatches < stages; ScheduleInterleaved1F1B when n is not a multiple of
    max(1, n // pp) (torch/distributed/pipelining/schedules.py); GPipe takes any number."""
    assert microbatch_problem(3, 4, "1f1b") and microbatch_problem(4, 4, "1f1b") is None
    assert microbatch_problem(1, 4, "gpipe") is None
    for n, ok in ((3, True), (7, True), (10, True), (8, True), (9, False), (11, False)):  # pp = 4: rounds n // 4
        assert (microbatch_problem(n, 4, "interleaved1f1b") is None) is ok, n
    assert microbatch_problem(1, 1, "1f1b") is None


def test_stage_blocks_are_contiguous_and_in_forward_order():
    """The (tower, block) pairs of each stage: the split the pipeline runs (vltrain.parallel.pipeline)."""
    cfg = dataclasses.replace(get_preset("tiny"), vision_layers=3, text_layers=2, decoder_layers=2)  # 8 blocks
    plan = stage_blocks(cfg, 3)
    assert len(plan) == 3 and all(plan)
    flat = [b for p in plan for b in p]
    assert flat == [(t, i) for t, n in (("vision", 3), ("text", 2), ("fusion", 1), ("decoder", 2)) for i in range(n)]
    with pytest.raises(ValueError, match="9 stages over 8 blocks"):
        stage_blocks(cfg, 9)


def test_stage_ranges_cover_every_block_once_with_at_least_one_each():
    for name in ("tiny", "base", "vl-22b"):
        cfg = get_preset(name)
        blocks = pipeline_blocks(cfg)
        for stages in sorted({1, 2, 3, 4, blocks // 2, blocks}):
            for tp in (1, 4):
                r = stage_ranges(cfg, stages, tp)
                assert [i for x in r for i in x] == list(range(blocks)) and all(len(x) >= 1 for x in r)
    assert data_parallel(128, 4, 2) == 16
    with pytest.raises(ValueError):
        data_parallel(128, 3, 1)


# --- what one GPU holds, against the model itself on the meta device --------------------------------------
COLWISE = ("q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "fc1.weight", "fc1.bias")
ROWWISE = ("out.weight", "fc2.weight")  # their biases stay replicated


def _meta_counts(name: str, tp: int, pp: int, schedule: str) -> list[float]:
    """Parameters per pipeline rank on one tp rank, summed over the real module tree by names."""
    import torch

    from vltrain.model import VLModel

    cfg = get_preset(name)
    with torch.device("meta"):
        model = VLModel(cfg)
    offsets = {
        "vision.blocks": 0,
        "text.blocks": cfg.vision_layers,
        "text.fusion": cfg.vision_layers + cfg.text_layers,
        "decoder.blocks": cfg.vision_layers + cfg.text_layers + cfg.fusion_layers,
    }
    v = 2 if schedule == "interleaved1f1b" else 1
    owner = {i: c % pp for c, r in enumerate(stage_ranges(cfg, pp * v, tp)) for i in r}
    counts = [0.0] * pp
    for pname, p in model.named_parameters():
        block = next(((k, off) for k, off in offsets.items() if pname.startswith(k + ".")), None)
        if block:
            idx = int(pname[len(block[0]) + 1 :].split(".")[0]) + block[1]
            sharded = pname.endswith(COLWISE) or pname.endswith(ROWWISE)
            counts[owner[idx]] += p.numel() / tp if sharded else p.numel()
        elif pname.startswith(("vision.patch_embed", "vision.cls", "vision.pos", "embed.")):
            counts[0] += p.numel()
            if pname == "embed.tok.weight" and pp > 1:
                counts[pp - 1] += p.numel()  # the tied head on the last stage
        else:
            counts[pp - 1] += p.numel()
    return counts


@pytest.mark.parametrize(
    "name, tp, pp, schedule",
    [
        ("tiny", 1, 1, "1f1b"),
        ("tiny", 2, 2, "1f1b"),
        ("tiny", 4, 5, "1f1b"),
        ("base", 4, 4, "interleaved1f1b"),
        ("base", 3, 3, "gpipe"),
    ],
)
def test_per_rank_parameters_match_the_model_on_the_meta_device(name, tp, pp, schedule):
    expected = _meta_counts(name, tp, pp, schedule)
    got = [s.params for s in rank_shares(get_preset(name), tp, pp, schedule)]
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["tiny", "base", "vl-22b", "vl-30b"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_one_rank_is_model_maths_totals(name, ckpt):
    """tp = pp = 1: the per-stage sums are model_math's whole-model figures, so the two cannot drift."""
    cfg = get_preset(name)
    (s,) = rank_shares(cfg, 1, 1, checkpointing=ckpt)
    assert s.params == param_count(cfg)
    assert s.act_per_sample == pytest.approx(activation_bytes_per_sample(cfg, ckpt))
    assert s.flops_per_sample == pytest.approx(forward_flops_per_sample(cfg))


def test_tensor_parallel_shards_only_what_it_should():
    """Korthikanti et al.: without sequence parallel 10 sbh of a self-attention layer's 34 stay whole."""
    cfg = get_preset("vl-22b")
    (one,), (four,) = rank_shares(cfg, 1, 1), rank_shares(cfg, 4, 1)
    assert cfg.vocab_size * cfg.text_width < four.params < one.params / 4 + cfg.vocab_size * cfg.text_width * 1.1
    assert one.act_per_sample / 4 < four.act_per_sample < one.act_per_sample


def test_fsdp_memory_by_hand():
    """One GPU of base at dp 8, tp 2, pp 2, zero_stage 2, micro batch 4, 8 microbatches (1F1B)."""
    cfg = get_preset("base")
    lay = fsdp.ParallelLayout(tp=2, pp=2, dp=8, zero_stage=2)
    shares = rank_shares(cfg, 2, 2)
    m, worst = fsdp.memory(cfg, lay, 4, 8, 80)
    s = shares[worst]
    states = 2 * s.params + 4 * s.params + 4 * s.params / 8 + 12 * s.params / 8  # gathered, no-sync grads, shards
    acts = s.act_per_sample * 4 * in_flight(worst, 2, 8, "1f1b")
    assert in_flight(0, 2, 8, "1f1b") == 2 and in_flight(1, 2, 8, "1f1b") == 1
    assert m.total_gib * GIB == pytest.approx(1.1 * (states + acts) + 1.5 * GIB)
    # zero_stage 3 without a pipeline gathers two units, not the share
    m3, _ = fsdp.memory(cfg, dataclasses.replace(lay, pp=1, zero_stage=3), 4, 8, 80)
    m2, _ = fsdp.memory(cfg, dataclasses.replace(lay, pp=1, zero_stage=2), 4, 8, 80)
    assert m3.params_gib < m2.params_gib


def test_bubble_and_tensor_parallel_time():
    from clusterctl.planning import comm

    fab = comm.Fabric(450.0, 400.0, "t", "t", nodes=16, gpus_per_node=8)
    cfg = get_preset("vl-22b")
    one = fsdp.parallel_time(cfg, fsdp.ParallelLayout(1, 1, 128, 2), 1, 16, 10.0, fab)
    assert one.total_s == 0
    pt = fsdp.parallel_time(cfg, fsdp.ParallelLayout(4, 2, 16, 2), 8, 16, 10.0, fab)
    assert pt.bubble_fraction == pytest.approx(1 / 17)
    slow = max(pt.stage_flops_share) * 2 * 10.0
    assert pt.bubble_s == pytest.approx(slow / 16) and pt.imbalance_s == pytest.approx(slow - 10.0)
    inter = fsdp.parallel_time(cfg, fsdp.ParallelLayout(4, 2, 16, 2, "interleaved1f1b"), 8, 16, 10.0, fab)
    assert inter.bubble_fraction == pytest.approx(1 / 33)
    assert (
        pt.tensor_parallel_s > 0
        and fsdp.parallel_time(cfg, fsdp.ParallelLayout(8, 2, 8, 2), 8, 16, 10.0, fab).tensor_parallel_s
        > pt.tensor_parallel_s
    )


def test_masked_image_modelling_in_a_later_stage_is_refused_with_a_pipeline():
    """A staged recipe that turns MIM on only in stage 2 builds the MIM decoder from the start: the
    pipeline cannot carry it, so the layout is refused as for loss.mim itself."""
    from vltrain.config import load_train_config

    cfg = load_train_config(
        None,
        {"parallel.strategy": "fsdp", "parallel.pp": 2, "steps": 4, "stages": [{"steps": 2}, {"loss": {"mim": 1.0}}]},
    )
    assert cfg.loss.mim == 0 and cfg.uses_mim()
    problems = layout_problems(cfg, 2, None)
    assert problems and problems[0].startswith("stages[].loss.mim: masked image modelling is not supported")


def test_tensor_parallel_must_divide_the_mim_decoder_when_mim_runs():
    model = dataclasses.replace(get_preset("tiny", "t"), mim_decoder_width=48, mim_decoder_heads=3)
    on = dataclasses.replace(_cfg(model, tp=2, mim=1.0))
    assert any("MIM decoder's heads 3" in p for p in layout_problems(on, 2, None))
    off = dataclasses.replace(_cfg(model, tp=2, mim=0.0))
    assert not any("MIM decoder" in p for p in layout_problems(off, 2, None))
