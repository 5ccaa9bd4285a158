"""Trainer pieces that need no training: schedule, launcher detection, metrics maths, retrieval and
CIDEr-D, checkpoint discovery and refusal, parameter groups, and config errors from the CLI."""

from __future__ import annotations

import json
import math
import signal

import pytest

from tests.conftest import run_cli
from vltrain import checkpoint, distenv, metrics
from vltrain.common.errors import UserError
from vltrain.schedule import lr_at

# ---------------------------------------------------------------- schedule


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    kw = dict(peak=1e-3, min_lr=1e-5, warmup=10, total=110)
    lrs = [lr_at(s, **kw) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4)  # the first step already moves
    assert all(b - a == pytest.approx(1e-4) for a, b in zip(lrs[:9], lrs[1:10]))  # linear ramp
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)  # peak at the end of warm-up
    decay = lrs[10:110]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing
    assert lrs[109] == pytest.approx(1e-5) and lrs[119] == pytest.approx(1e-5)  # floor, and it stays there
    mid = 10 + (109 - 10) / 2
    assert lr_at(int(mid), **kw) == pytest.approx(
        1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (int(mid) - 10) / 99))
    )


def test_schedule_without_warmup_starts_at_peak_and_decays_to_zero():
    lrs = [lr_at(s, peak=0.1, min_lr=0.0, warmup=0, total=5) for s in range(5)]
    assert lrs[0] == 0.1 and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[2] == pytest.approx(0.05)  # cosine midpoint


# ---------------------------------------------------------------- launcher detection


def test_detect_torchrun():
    d = distenv.detect(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "1",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "29400",
        }
    )
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (3, 8, 1, 2, 1)
    assert (d.master_addr, d.master_port, d.source) == ("node7", 29400, "torchrun")


def test_detect_slurm_under_submitit_and_plain_srun():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "4242",
    }
    d = distenv.detect(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.node_rank) == (5, 16, 1, 8, 1)
    assert d.master_addr == "gpu07" and d.source == "slurm"
    assert d.master_port == distenv.port_for_job("4242")
    assert distenv.detect(env | {"SUBMITIT_EXECUTOR": "slurm"}).source == "submitit-slurm"
    # every rank of a job and its requeued attempts agree on the port; other jobs get another one
    assert distenv.port_for_job("4242") != distenv.port_for_job("4243")


def test_detect_submitit_local_and_single_process():
    env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_NODEID": "0",
        "SUBMITIT_LOCAL_JOB_ID": "31337",
    }
    d = distenv.detect(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.source) == (1, 2, 1, "127.0.0.1", "submitit-local")
    s = distenv.detect({}, free_port=45678)
    assert (s.rank, s.world_size, s.master_port, s.source) == (0, 1, 45678, "single")


def test_export_sets_what_init_distributed_reads():
    env: dict[str, str] = {}
    distenv.export(distenv.detect({}, free_port=40001), "cpu", env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "40001",
    }
    assert env["DS_ACCELERATOR"] == "cpu"  # no CUDA on the test machines


def test_each_environment_builds_extensions_in_its_own_cache(tmp_path, monkeypatch):
    """DeepSpeed's CPU comm op is JIT-built by torch into TORCH_EXTENSIONS_DIR: each interpreter prefix
    (venv) gets its own directory under the user's cache, so two environments stop rebuilding over each
    other's build; a TORCH_EXTENSIONS_DIR the user set is kept; torch's loader builds where it says."""
    import sys

    from torch.utils import cpp_extension

    home = {"HOME": str(tmp_path)}
    a, b = distenv.extensions_dir("/opt/venv-a", home), distenv.extensions_dir("/opt/venv-b", home)
    assert a != b and a == distenv.extensions_dir("/opt/venv-a", home)
    assert a.startswith(f"{tmp_path}/.cache/torch_extensions/py3") and a.rsplit("_", 1)[1].startswith("cpu-")
    assert distenv.extensions_dir("/opt/venv-a", {"XDG_CACHE_HOME": "/c"}).startswith("/c/torch_extensions/")

    env: dict[str, str] = {"HOME": str(tmp_path)}
    distenv.export(distenv.detect({}, free_port=40001), "cpu", env)
    assert env["TORCH_EXTENSIONS_DIR"] == distenv.extensions_dir(sys.prefix, env)
    mine = {"TORCH_EXTENSIONS_DIR": "/scratch/ext"}
    distenv.export(distenv.detect({}, free_port=40001), "cpu", mine)
    assert mine["TORCH_EXTENSIONS_DIR"] == "/scratch/ext"

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
    built = cpp_extension._get_build_directory("deepspeed_shm_comm", verbose=False)
    assert built == f"{env['TORCH_EXTENSIONS_DIR']}/deepspeed_shm_comm"


# ---------------------------------------------------------------- metrics


def test_mfu_and_peak():
    assert metrics.peak_tflops("NVIDIA A100-SXM4-80GB", env={}) == 312.0
    assert metrics.peak_tflops("NVIDIA H100 80GB HBM3", env={"VLTRAIN_PEAK_TFLOPS": "500"}) == 500.0
    assert metrics.peak_tflops(None, env={}) is None  # CPU without a stated peak: MFU is not reported
    # 8 devices at 100 TFLOP/s peak, 4e14 FLOPs per step in 1 s -> 50 TFLOP/s each -> 0.5
    assert metrics.mfu(4e14, 1.0, 8, 100.0) == pytest.approx(0.5)
    assert metrics.mfu(4e14, 1.0, 8, None) is None


def test_attempt_number_counts_starts_and_resumes(tmp_path):
    assert metrics.attempt_number(tmp_path, env={}) == 0
    ev = metrics.EventLog(tmp_path, True, 0)
    ev.emit("start", 0)
    ev.emit("checkpoint", 5)
    ev.emit("resume", 5)
    ev.close()
    (tmp_path / "events.jsonl").open("a").write('{"event": "resu')  # a line cut by a kill
    assert metrics.attempt_number(tmp_path, env={}) == 2
    assert metrics.attempt_number(tmp_path, env={"SLURM_RESTART_COUNT": "4"}) == 4
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()[:3]]
    assert [x["event"] for x in lines] == ["start", "checkpoint", "resume"]
    assert all({"event", "step", "time", "attempt"} <= x.keys() for x in lines)


def test_non_zero_ranks_write_nothing(tmp_path):
    sink = metrics.JsonlSink(tmp_path / "metrics.jsonl", enabled=False)
    sink.write({"step": 1})
    assert not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------- evaluation maths


def test_recall_at_k_counts_the_rank_of_the_true_match():
    import torch

    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # row 0: true match best -> rank 0
            [0.8, 0.5, 0.1],  # row 1: one candidate above -> rank 1
            [0.9, 0.8, 0.1],
        ]
    )  # row 2: two above -> rank 2
    r = __import__("vltrain.evaluate", fromlist=["recall_at_k"]).recall_at_k(sim, ks=(1, 2, 3))
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": pytest.approx(1.0)}
    tie = torch.ones(3, 3)  # ties with the true match do not count against it
    assert __import__("vltrain.evaluate", fromlist=["recall_at_k"]).recall_at_k(tie, ks=(1,))["R@1"] == 1.0


def test_cider_d():
    from vltrain.evaluate import cider_d, cider_tokenize

    # Two images with disjoint two-word references: every n-gram has idf log(2) and a perfect
    # candidate has cosine 1 for unigrams and bigrams, 0 for the absent 3- and 4-grams: 10 * 2/4.
    mean, per = cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert per == pytest.approx([5.0, 5.0]) and mean == pytest.approx(5.0)
    wrong, _ = cider_d(["c d", "a b"], [["a b"], ["c d"]])
    assert wrong == 0.0
    longer, _ = cider_d(["a b a b a b a b a b a b a b a b", "c d"], [["a b"], ["c d"]])
    assert longer < mean  # the Gaussian length penalty of CIDEr-D
    assert cider_tokenize("Two RED disks, on the left!") == "two red disks on the left"


# ---------------------------------------------------------------- checkpoints


def _fake_checkpoint(root, step, complete=True, config_hash="abc", world=1):
    d = root / "checkpoints" / checkpoint.step_dir_name(step)
    d.mkdir(parents=True)
    (d / "meta.json").write_text(
        json.dumps(
            {
                "schema": checkpoint.SCHEMA_VERSION,
                "step": step,
                "samples": step,
                "world_size": world,
                "config_hash": config_hash,
            }
        )
    )
    if complete:
        (d / checkpoint.MARKER).write_text(f"{step}\n")
    return d


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 30)
    _fake_checkpoint(tmp_path, 40, complete=False)  # no marker: renamed by hand or a broken copy
    (tmp_path / "checkpoints" / ".tmp-step_0000050").mkdir()  # killed while writing
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [10, 30]
    assert checkpoint.latest(tmp_path).name == "step_0000030"
    checkpoint.prune(tmp_path, keep=1)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [30]
    assert not (tmp_path / "checkpoints" / ".tmp-step_0000050").exists()
    assert checkpoint.latest(tmp_path / "nothing-here") is None


def test_checkpoint_from_another_config_or_world_size_is_refused(tmp_path):
    d = _fake_checkpoint(tmp_path, 10, config_hash="aaaa", world=2)
    assert checkpoint.check_compatible(d, "aaaa", 2)["step"] == 10
    with pytest.raises(UserError, match="written by config aaaa but this run's config is bbbb") as e:
        checkpoint.check_compatible(d, "bbbb", 2)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="written by 2 ranks but this run has 4"):
        checkpoint.check_compatible(d, "aaaa", 4)


# ---------------------------------------------------------------- engine pieces


def test_weight_decay_only_on_linear_and_conv_weights():
    from torch import nn

    from vltrain.config import TrainConfig
    from vltrain.engines.common import build_model, param_groups

    model = build_model(TrainConfig())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"logit_scale", "vision.cls", "vision.pos", "embed.pos", "embed.tok.weight"} <= kept
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    assert "vision.blocks.0.attn.q.weight" in decayed and "vision.patch_embed.weight" in decayed
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for n, m in model.named_modules() if n + ".weight" in decayed)


def test_stop_requests_only_record_signals():
    from vltrain.signals import StopRequests, preempt_signal

    stops = StopRequests()
    stops.install()
    try:
        signal.raise_signal(preempt_signal())
        assert stops.flags() == [1.0, 0.0]  # recorded, the process is still here
        signal.raise_signal(signal.SIGTERM)
        assert stops.flags() == [1.0, 1.0]
    finally:
        stops.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_parse_overrides():
    from vltrain.cli import parse_overrides

    assert parse_overrides(
        ["optim.lr=3e-4", "data.shards=/x/y", "optim.betas=[0.9, 0.99]", "activation_checkpointing=true"]
    ) == {"optim.lr": 3e-4, "data.shards": "/x/y", "optim.betas": [0.9, 0.99], "activation_checkpointing": True}
    with pytest.raises(UserError, match="not key=value"):
        parse_overrides(["lr"])


# ---------------------------------------------------------------- config errors, before any training


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "model=huge"], "unknown preset 'huge'; allowed: tiny"),
        (["--set", "optim.lr=-0.001"], "optim.lr"),
        (
            [
                "--set",
                "model={image_size=30, patch_size=4, vision_width=32, vision_layers=1, vision_heads=2, "
                "text_width=32, text_layers=1, fusion_layers=1, text_heads=2, decoder_layers=1, vocab_size=64}",
            ],
            "not divisible by model.patch_size",
        ),
        (["--set", "global_batch=10", "--set", "accumulation=4"], "accumulation: 4 does not divide"),
        (["--set", "data.shards=/nonexistent/shards"], "data.shards"),
    ],
)
def test_bad_config_values_give_one_line_errors(tmp_path, args, needle):
    r = run_cli("train", "--run-dir", str(tmp_path / "run"), *args, prog="vltrain")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_energy_flushes_first_soon_then_every_interval(tmp_path, monkeypatch):
    """The first total lands FIRST_FLUSH_S after the start, then one every flush_every_s."""
    from vltrain import energy

    clock = [1000.0]
    monkeypatch.setattr(energy.time, "monotonic", lambda: clock[0])
    flushes = []

    class Tracker:
        def start(self):
            pass

        def flush(self):
            flushes.append(clock[0])

    ne = energy.NodeEnergy(tmp_path, local_rank=1, node_rank=0, country="FRA", flush_every_s=60.0, tag="t")
    assert not ne.enabled
    ne._tracker = Tracker()  # a stand-in for codecarbon's, to drive the schedule alone
    ne.start()
    for t in range(0, 200):
        clock[0] = 1000.0 + t
        ne.maybe_flush()
    assert flushes == [1020.0, 1080.0, 1140.0]


def test_zero2_reduces_once_per_step_only_where_the_sum_is_as_exact():
    """Coalesced reduction on CPU in fp32 at ZeRO-2; per micro step under bf16/fp16 (param.grad is 16-bit
    and the fp32 accumulation would be lost), on CUDA (overlap_comm hides each reduction) and at
    stages 0-1 (they reduce once anyway); VLTRAIN_GRAD_REDUCTION chooses, refused when unknown."""
    from vltrain.config import TrainConfig
    from vltrain.engines.deepspeed import grad_reduction

    def cfg(**kw):
        return TrainConfig(**({"model": "tiny", "global_batch": 8, "precision": "fp32"} | kw))

    assert grad_reduction(cfg(), "cpu") == "coalesced"
    assert grad_reduction(cfg(precision="bf16"), "cpu") == "per_micro_step"
    assert grad_reduction(cfg(), "cuda") == "per_micro_step"
    assert grad_reduction(cfg(zero_stage=1), "cpu") == "per_micro_step"
    assert grad_reduction(cfg(), "cpu", "per_micro_step") == "per_micro_step"
    assert grad_reduction(cfg(precision="bf16"), "cuda", "coalesced") == "coalesced"
    assert grad_reduction(cfg(zero_stage=0), "cpu", "coalesced") == "per_micro_step"
    # the stage DeepSpeed runs decides, not the config's: one fp32 rank runs ZeRO-2 as stage 1
    assert (
        grad_reduction(cfg(), "cpu", stage=1) == grad_reduction(cfg(), "cpu", "coalesced", stage=1) == "per_micro_step"
    )
    assert grad_reduction(cfg(zero_stage=1), "cpu", stage=2) == "coalesced"
    with pytest.raises(UserError, match="VLTRAIN_GRAD_REDUCTION: 'once' is not valid; allowed: auto, coalesced"):
        grad_reduction(cfg(), "cpu", "once")
