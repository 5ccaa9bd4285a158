"""Pipeline parallelism (vltrain.parallel.pipeline): the stages are pruned copies of VLModel running its
own forward (same names, same losses), and multi-process runs (gloo, CPU, fp32) that must match a
single-process model with accumulation. Masked image modelling under a pipeline is refused by the layout
alone (tests/test_layout.py); the split itself is stage_split.stage_blocks (tests/test_dp_mixed_parallel.py).

The multi-process harness here (`run_layout`) is shared with tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from vltrain.config import LossConfig
from vltrain.model import VLModel, losses
from vltrain.parallel.layout import microbatch_problem
from vltrain.parallel.pipeline import make_loss_fn, split_stages, tied_copies
from vltrain.presets import get_preset

PAD, BOS, EOS, MASK = 0, 2, 3, 4
LOSS = LossConfig(itc=0.5, mlm=2.0, caption=1.0)  # unequal weights, so a mix-up of the parts shows


def tiny_model(**overrides) -> VLModel:
    torch.manual_seed(0)
    return VLModel(dataclasses.replace(get_preset("tiny"), **overrides), LOSS)


def make_batch(cfg, n: int = 8, seed: int = 1):
    """Loader-like batch: bos + tokens + eos, right-padded to a fixed T (pipelines need fixed shapes)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 17, (n,), generator=g).tolist()
    ids = torch.randint(5, cfg.vocab_size, (n, 16), generator=g)
    mask = torch.zeros(n, 16, dtype=torch.bool)
    for i, k in enumerate(lengths):
        ids[i, 0], ids[i, k - 1], ids[i, k:] = BOS, EOS, PAD
        mask[i, :k] = True
    return torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g), ids, mask


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, floor: float = 1e-8) -> None:
    """|got - want| <= rel x the tensor's largest |entry| + floor: rounding relative to the tensor's scale."""
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rel * scale + floor, f"{what}: max error {err:.3g}, largest entry {scale:.3g}"


def run_stages(stages, images, ids, mask):
    """All stages in one process, as the pipeline runtime would chain them, masking as pipeline_step does."""
    m = stages[0]
    masked, labels = losses.mask_tokens(
        ids, mask, mask_prob=m.loss_cfg.mask_prob, mask_id=MASK, vocab_size=m.cfg.vocab_size, special_ids=(0, 2, 3, 4)
    )
    x = (images,)
    for s in stages:
        x = s(*x, input_ids=ids, attention_mask=mask, masked=masked, labels=labels)
    return x


def test_stages_keep_original_names_and_share_only_the_tied_weight():
    model = tiny_model()
    stages = [m for _, m in split_stages(model, 0, 1, 4)]
    assert all(type(s) is VLModel and s.pipeline_stage for s in stages)  # the model's own forward, pruned
    names = [set(dict(s.named_parameters())) for s in stages]
    union = set().union(*names)
    assert union == set(dict(model.named_parameters()))
    shared = {n for n in union if sum(n in s for s in names) > 1}
    assert shared == {"embed.tok.weight"}
    # 5 blocks over 4 stages: [vision 0, 1], [text 0], [fusion 0], [decoder 0]
    assert {"vision.blocks.1.attn.q.weight", "vision.patch_embed.weight"} <= names[0]
    assert "text.blocks.0.attn.q.weight" in names[1] and "text.blocks.0.attn.q.weight" not in names[0]
    assert "text.norm.weight" in names[2] and "logit_scale" in names[3] and "logit_scale" not in names[2]
    assert [p.shape for p in tied_copies(stages)] == [model.embed.tok.weight.shape]
    # The stage modules load the full model's checkpoint keys (strict=False: each holds a subset).
    sd = model.state_dict()
    for s in stages:
        missing, _ = s.load_state_dict(sd, strict=False)
        assert missing == []


@pytest.mark.parametrize("n_stages", [1, 2, 5])
def test_composed_stages_match_model_forward(n_stages):
    """Loss bit-identical; gradients within fp32 rounding (measured: 8e-7 of each tensor's largest entry).

    The image features feed ITC, fusion and decoder; the stages use them in another order, so autograd
    sums their three gradients in another order. k biases have a true gradient of exactly zero (softmax
    is shift-invariant), so theirs is rounding noise (~1e-9): the 1e-8 floor.
    """
    model = tiny_model()
    images, ids, mask = make_batch(model.cfg)
    stages = [m for _, m in split_stages(model, 0, 1, n_stages)]
    torch.manual_seed(7)
    ref = model(images, ids, mask)
    ref["loss"].backward()
    torch.manual_seed(7)
    parts = run_stages(stages, images, ids, mask)
    loss = make_loss_fn(LOSS)(parts, None)
    loss.backward()
    assert torch.equal(loss, ref["loss"])
    assert torch.equal(parts[0], torch.stack([ref["itc"], ref["mlm"], ref["caption"]]))
    grads: dict[str, torch.Tensor] = {}
    for s in stages:
        for name, p in s.named_parameters():
            grads[name] = grads[name] + p.grad if name in grads else p.grad
    for name, p in model.named_parameters():
        assert_close_scaled(grads[name], p.grad, 1e-5, name)


# ---------------------------------------------------------------- multi-process equivalence harness
LR, MAX_NORM, STEPS, GLOBAL, N_MB = 1e-3, 0.5, 2, 8, 2


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _optimizer(params):
    # foreach=False: under tensor parallelism alone the list mixes DTensors and plain tensors, which the
    # foreach kernels refuse (FSDP makes every parameter a DTensor, so the engine can keep foreach).
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)


def _record_grads(modules) -> dict[str, torch.Tensor]:
    out = {}
    for m in modules:
        for name, p in m.named_parameters():
            out[name] = _full(p.grad)
    return out


def reference_run(n_mb: int = N_MB, global_batch: int = GLOBAL) -> dict:
    """Single process: accumulation over n_mb microbatches (loss / n_mb), clip, AdamW, as DeepSpeed does."""
    model = tiny_model()
    opt = _optimizer(model.parameters())
    rec: dict = {"loss": [], "norm": []}
    for step in range(STEPS):
        images, ids, mask = make_batch(model.cfg, global_batch, seed=10 + step)
        opt.zero_grad()
        torch.manual_seed(100 + step)
        total = 0.0
        for im, i, m in zip(images.chunk(n_mb), ids.chunk(n_mb), mask.chunk(n_mb), strict=True):
            out = model(im, i, m)
            (out["loss"] / n_mb).backward()
            total += out["loss"].item() / n_mb
        rec["loss"].append(total)
        if step == 0:
            rec["grads"] = _record_grads([model])
        rec["norm"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
    rec["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return rec


def _layout_worker(
    rank: int, world: int, tp: int, pp: int, schedule: str, init_file: str, out_dir: str, n_mb: int, global_batch: int
) -> None:
    from vltrain.parallel import mesh as pmesh
    from vltrain.parallel.pipeline import build_schedule, pipeline_step, virtual_stages
    from vltrain.parallel.tensor_parallel import apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = pmesh.build_mesh(world, tp, pp, "cpu")
        losses.set_data_parallel_group(pmesh.dp_group(mesh))
        model = tiny_model()
        parts = split_stages(model, pmesh.pp_rank(mesh), pp, virtual_stages(schedule)) if pp > 1 else [(0, model)]
        for _, m in parts:
            apply_tensor_parallel(m, mesh["tp"])
        modules = [m for _, m in parts]
        params = [p for m in modules for p in m.parameters()]
        opt = _optimizer(params)
        if pp > 1:
            pipe = build_schedule(parts, pmesh.pp_group(mesh), n_mb, schedule, make_loss_fn(LOSS), torch.device("cpu"))
        rec: dict = {"loss": [], "norm": []}
        for step in range(STEPS):
            images, ids, mask = make_batch(model.cfg, global_batch, seed=10 + step)
            opt.zero_grad()
            torch.manual_seed(100 + step)
            if pp > 1:
                out = pipeline_step(pipe, images, ids, mask)
                rec["loss"].append(out["loss"].mean().item() if out is not None else None)
            else:
                total = 0.0
                for im, i, m in zip(images.chunk(n_mb), ids.chunk(n_mb), mask.chunk(n_mb), strict=True):
                    o = model(im, i, m)
                    (o["loss"] / n_mb).backward()
                    total += o["loss"].item() / n_mb
                rec["loss"].append(total)
            if step == 0:
                rec["grads"] = _record_grads(modules)
            pp_group = pmesh.pp_group(mesh) if pp > 1 else None
            rec["norm"].append(
                pmesh.clip_grad_norm_(params, MAX_NORM, pp_group, tied_copies(modules) if pp > 1 else ())
            )
            opt.step()
        rec["params"] = {n: _full(p) for m in modules for n, p in m.named_parameters()}
        torch.save(rec, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_layout(
    tmp_path, world: int, tp: int, pp: int, schedule: str = "1f1b", n_mb: int = N_MB, global_batch: int = GLOBAL
) -> list[dict]:
    args = (world, tp, pp, schedule, str(tmp_path / "init"), str(tmp_path), n_mb, global_batch)
    mp.spawn(_layout_worker, args=args, nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


# Tolerances (fp32). Losses and the grad norm: 1e-5 relative; tensor parallelism sums partial products
# in another order (all-reduce) and the pipeline sums the tied gradient across stages. Gradients:
# 1e-5 of each tensor's largest entry + 1e-8 (the k biases' true gradient is zero, theirs is rounding
# noise ~1e-9). Parameters after 2 AdamW steps: 1e-4 absolute = 10% of one step at lr 1e-3, because
# Adam divides each gradient by its own running RMS: a coordinate whose gradient is ~1e-8 (rounding
# level) moves by a noisy fraction of lr (measured worst: 2.7e-5, vision fc1 at gradient 9e-9).
def assert_matches_reference(results: list[dict], ref: dict) -> None:
    losses_seen = [r["loss"] for r in results if r["loss"][0] is not None]
    assert losses_seen
    for seen in losses_seen:
        torch.testing.assert_close(torch.tensor(seen), torch.tensor(ref["loss"]), rtol=1e-5, atol=0)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["norm"]), torch.tensor(ref["norm"]), rtol=1e-5, atol=0)
    for key, rel, floor in (("grads", 1e-5, 1e-8), ("params", 0.0, 1e-4)):
        merged = {}
        for r in results:
            for name, t in r[key].items():
                if name in merged:  # every holder of a parameter (tp peers, tied copies) agrees exactly
                    assert torch.equal(merged[name], t), name
                merged[name] = t
        assert merged.keys() == ref[key].keys()
        for name, t in merged.items():
            assert_close_scaled(t, ref[key][name], rel, f"{key} {name}", floor)


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_run()


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved1f1b", "gpipe"])
def test_pp2_matches_single_process(tmp_path, reference, schedule):
    assert_matches_reference(run_layout(tmp_path, world=2, tp=1, pp=2, schedule=schedule), reference)


@pytest.mark.slow
def test_pp2_x_tp2_matches_single_process(tmp_path, reference):
    assert_matches_reference(run_layout(tmp_path, world=4, tp=2, pp=2), reference)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, n_mb, global_batch", [("gpipe", 1, 8), ("interleaved1f1b", 3, 6)])
def test_microbatch_counts_the_layout_allows_run(tmp_path, schedule, n_mb, global_batch):
    """build_schedule applies layout.microbatch_problem, the rule plan and the trainer's start apply (it
    had its own, stricter one: these counts passed both checks, then the engine refused them)."""
    assert microbatch_problem(n_mb, 2, schedule) is None
    results = run_layout(tmp_path, world=2, tp=1, pp=2, schedule=schedule, n_mb=n_mb, global_batch=global_batch)
    assert_matches_reference(results, reference_run(n_mb, global_batch))
