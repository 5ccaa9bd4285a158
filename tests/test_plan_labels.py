"""The plan's labels follow the precision and the strategy that run (issue 25 point 9): seed 003 is fp16,
FSDP plans do not speak of DeepSpeed's staging, tensor/pipeline lines only for what runs, and small
parameter counts print readably (no "0.00B")."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def _plan(*args: str) -> tuple[dict, str]:
    r = run_cli("plan", *args, "--json")
    assert r.returncode == 0, r.stderr
    h = run_cli("plan", *args)
    assert h.returncode == 0, h.stderr
    return json.loads(r.stdout), h.stdout.replace("\n  ", " ")  # lines folded to COLUMNS, joined


def _memory_table(out: str) -> str:
    start = out.index("memory per GPU")
    return out[start : out.index(" total", start)]


def test_seed_003_is_labelled_fp16_and_fsdp_without_deepspeed_staging():
    d, out = _plan("--profile", "h100x128")
    assert d["precision"] == "fp16" and d["strategy"] == "fsdp"
    table = _memory_table(out)
    assert "fp16 + AdamW" in table and "fp16 parameters (gathered)" in table, table
    assert "bf16" not in table, table
    assert "DeepSpeed" not in out and "parameter groups" not in out, out
    assert "rank 0 builds the model on the CPU" in out  # FSDP's start-up on the host
    assert "tensor x pipeline parallel: +" in out and "bubble" in out  # tp 2 x pp 2: both run


def test_deepspeed_bf16_plan_keeps_its_labels():
    d, out = _plan("--profile", "a100x32")
    assert (d["precision"], d["strategy"]) == ("bf16", "deepspeed")
    table = _memory_table(out)
    assert "ZeRO-2, bf16 + AdamW" in table and "bf16 parameters" in table and "DeepSpeed buckets" in table
    assert "DeepSpeed flattens parameter groups" in out
    assert not [x for x in out.splitlines() if x.startswith(("tensor", "pipeline"))]  # tp = pp = 1


def test_tensor_parallel_alone_names_no_pipeline_and_tp_pp_1_no_line():
    _, out = _plan("--profile", "a100x128")  # seed 001: FSDP, tp 4 x pp 1
    line = next(x for x in out.splitlines() if x.startswith("tensor parallel: +"))
    assert "tp all-reduces" in line and "bubble" not in out and "pipeline" not in line, out
    _, out = _plan("--profile", "a100x128", "--tp", "1", "--zero-stage", "3")  # FSDP, tp = pp = 1
    lines = out.splitlines()
    assert not [x for x in lines if x.startswith(("tensor", "pipeline"))] and "+ 0.00 s" not in out, out
    assert "parallel" not in next(x for x in lines if x.startswith("step time:"))


def test_twins_print_their_parameter_count_and_their_fp32():
    for twin in ("configs/seed-001-tiny.toml", "configs/seed-000-tiny.toml"):
        d, out = _plan("--profile", "slurm-local", "--config", twin)
        assert d["params"] < 1e8 and d["precision"] == "fp32"
        first = out.splitlines()[1]
        count = f"{d['params'] / 1e6:.3g}M" if d["params"] >= 1e6 else f"{d['params'] / 1e3:.3g}K"
        assert f"({count} params)" in first and "0.00B" not in out, first
        table = _memory_table(out)
        if d["strategy"] == "fsdp":  # FSDP2 counts the fp32 weights that run
            assert "fp32 + AdamW" in table and "fp32 parameters (gathered)" in table, table
            assert "fp32 sharded parameters + Adam m, v" in table
        else:  # DeepSpeed's memory model is mixed precision's: said in the title
            assert "fp32 + AdamW (counted as bf16 mixed precision)" in table, table


def test_long_lines_fold_at_spaces_keeping_flag_groups_and_quoted_commands_whole(monkeypatch):
    from clusterctl.render.fold import fold

    monkeypatch.setenv("COLUMNS", "40")
    text = "faster: ZeRO-0, micro batch 64 x accumulation 1 (--zero-stage 0 --micro-batch 64 --accum 1); see `clusterctl estimate --claimed-energy-mwh 2.1` too"
    lines = fold(text).split("\n")
    assert " ".join(x.strip() for x in lines) == text  # nothing lost, cut only at spaces
    assert "  (--zero-stage 0 --micro-batch 64 --accum 1);" in lines  # longer than 40: whole on its own line
    assert "  `clusterctl estimate --claimed-energy-mwh 2.1`" in lines
    assert all(len(x) <= 40 for x in lines if "--" not in x)
    monkeypatch.delenv("COLUMNS")
    assert fold(text) == text  # piped, no COLUMNS: a line per fact


def test_the_mfu_warning_counts_model_flops_and_says_the_hfu_beside():
    from clusterctl.planning.advice import MFU_WARNING, plan_warnings
    from clusterctl.planning.plan import make_plan
    from clusterctl.planning.profiles import load_profile
    from vltrain.presets import get_preset

    p = make_plan(
        load_profile("a100x128"),
        get_preset("vl-30b"),
        2048,
        accumulation=8,
        zero_stage=3,
        activation_checkpointing=True,
    )
    hfu = 0.40 * p.step_time_s() / p.total_step_s()  # the FLOPs that run (4 forwards) at 40% of peak
    mfu = hfu * 3 / 4  # the model's FLOPs: 3 of the 4 forwards
    (line,) = [w for w in plan_warnings(p) if w.startswith("mfu:")]
    assert mfu < MFU_WARNING and line.startswith(f"mfu: expected MFU {mfu:.1%} ({hfu:.1%} HFU with recomputation)")
