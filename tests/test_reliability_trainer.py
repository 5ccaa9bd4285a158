"""The trainer's reliability guarantees, without training: a run that stops learning fails (and is not
retried), a damaged newest checkpoint is moved aside and the one before it resumes, a full disk is
one line naming the filesystem and the sizes, and bad input (a directory as --config, a newline in a
--set, a float that is not finite) is one line. The same guarantees with real training on CPU are in
tests/test_trainer_run.py (slow)."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import types
import typing
import zlib
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from vltrain import checkpoint, diskspace
from vltrain.common.errors import UserError
from vltrain.config import TrainConfig, load_train_config, parse_overrides
from vltrain.rundir import RunDir

NAN, INF = float("nan"), float("inf")


# ================================================================ 1. divergence


def _losses(loss=2.0, itc=1.0, mlm=0.5, caption=0.5):
    return {"loss": loss, "itc": itc, "mlm": mlm, "caption": caption}


@pytest.mark.parametrize(
    ("losses", "shown"),
    [
        (_losses(loss=NAN, itc=NAN), "loss is nan at step 12 (itc nan, mlm 0.5, caption 0.5)"),
        (_losses(loss=INF, mlm=INF), "loss is inf at step 12 (itc 1, mlm inf, caption 0.5)"),
        (_losses(loss=-INF, caption=-INF), "loss is -inf at step 12"),
        (_losses(loss=NAN), "loss is nan at step 12"),  # the weighted sum alone (a weight times inf)
    ],
)
def test_a_loss_that_is_not_finite_is_divergence(losses, shown):
    from vltrain.divergence import non_finite_loss

    line = non_finite_loss(12, losses, TrainConfig())
    assert line is not None and line.startswith("training diverged: ") and shown in line
    assert "allowed: a lower optim.lr (now 0.0001)" in line and "\n" not in line


def test_a_finite_loss_is_not_divergence():
    from vltrain.divergence import non_finite_loss

    assert non_finite_loss(3, _losses(loss=1e30), TrainConfig()) is None


@pytest.mark.parametrize(
    ("precision", "max_skipped", "interval_steps", "interval_skipped", "in_a_row", "fails"),
    [
        ("fp32", -1, 1, 1, 1, True),  # fp32 and bf16 skip nothing legitimately
        ("bf16", -1, 1, 1, 1, True),
        ("fp32", -1, 10, 10, 10, True),  # a whole logging interval skipped
        ("fp32", -1, 10, 9, 9, False),  # one step of the interval applied: reported, not fatal
        ("fp32", -1, 10, 0, 0, False),
        ("fp16", -1, 1, 1, 17, False),  # fp16's loss scaler settling from 2^16: 17 overflows in a row at most
        ("fp16", -1, 1, 1, 18, True),
        ("fp16", -1, 10, 10, 10, False),
        ("fp16", -1, 20, 20, 20, True),
        ("fp16", 0, 1, 1, 1, True),  # the tolerance is configurable
        ("fp32", 5, 1, 1, 5, False),
        ("fp32", 5, 1, 1, 6, True),
    ],
)
def test_skipped_steps_fail_the_run_when_a_whole_interval_is_skipped_beyond_the_tolerance(
    precision, max_skipped, interval_steps, interval_skipped, in_a_row, fails
):
    from vltrain.divergence import skipped_interval

    cfg = TrainConfig(precision=precision, max_skipped_steps=max_skipped)
    line = skipped_interval(40, interval_steps, interval_skipped, in_a_row, INF, 7.25, cfg)
    assert (line is not None) == fails
    if fails:
        assert line.startswith("training diverged: the optimizer skipped ")
        assert "(gradient norm inf, loss 7.25;" in line and f"{precision} tolerates" in line and "allowed:" in line


def test_the_skip_tolerance_defaults_by_precision_and_is_validated():
    from vltrain.config import FP16_SKIP_TOLERANCE

    assert TrainConfig().max_skipped_steps == -1
    assert [TrainConfig(precision=p).skip_tolerance() for p in ("bf16", "fp32", "fp16")] == [0, 0, 17]
    assert FP16_SKIP_TOLERANCE == 1 + 16  # DeepSpeed's hysteresis 2, then halving 2^16 down to 1
    assert load_train_config(None, {"max_skipped_steps": 3}).skip_tolerance() == 3
    with pytest.raises(UserError, match=r"--set max_skipped_steps: -2 is out of range; allowed: an integer from -1"):
        load_train_config(None, {"max_skipped_steps": -2})
    assert "max_skipped_steps" not in json.dumps(TrainConfig().config_hash())  # not part of what must match


def test_the_skip_tolerance_of_fp16_is_what_its_loss_scaler_needs_to_reach_its_floor(monkeypatch):
    """Replays DeepSpeed's own DynamicLossScaler with the trainer's fp16 settings: from 2^16 it skips
    17 steps in a row before it is at its floor, and raises at the 18th."""
    from deepspeed.runtime.fp16 import loss_scaler

    from vltrain.config import FP16_SKIP_TOLERANCE
    from vltrain.dsconfig import deepspeed_config

    fp16 = deepspeed_config(TrainConfig(precision="fp16"), 8, 1, 1)["fp16"]
    scaler = loss_scaler.DynamicLossScaler(
        init_scale=2 ** fp16["initial_scale_power"],
        scale_window=1000,
        min_scale=1,
        delayed_shift=2,
        consecutive_hysteresis=False,
    )
    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 1)  # its log line asks for the rank
    skipped = 0
    with pytest.raises(Exception, match="loss scale already at minimum"):
        while True:
            scaler.update_scale(True)
            skipped += 1
    assert skipped == FP16_SKIP_TOLERANCE


class _Engine:
    skipped_steps = 0
    module = types.SimpleNamespace(loss_cfg=None)  # the loop sets the stage's loss weights on it

    def set_loss_config(self, loss):
        self.module.loss_cfg = loss

    def close(self):
        pass

    def get_global_grad_norm(self):
        return INF

    def get_lr(self):
        return [1e-3]


def _session(tmp_path, cfg, steps):
    """A Session whose train_step returns the given (losses, skipped) per step: the loop's decisions
    (log, divergence, checkpoint) without a model."""
    from vltrain import distenv
    from vltrain.collectives import Collectives
    from vltrain.engines.common import RankLayout
    from vltrain.loop import Session, batch_split
    from vltrain.metrics import EventLog, JsonlSink
    from vltrain.signals import StopRequests
    from vltrain.stepstats import StepNumbers

    s = object.__new__(Session)
    s.cfg, s.run_dir, s.dist = cfg, tmp_path, distenv.detect({})
    s.events, s.stops = EventLog(tmp_path, True, 0), StopRequests()
    s.step = s.samples = 0
    s.saved_step, s.energy, s.peak, s.watchdog, s.stage_index, s.mim_ratio = -1, None, None, None, None, 0.0
    s.split, s.comm = batch_split(cfg, 1), Collectives(torch.device("cpu"), 1)
    s.layout = RankLayout.of(0, 1)
    s.loader, s.engine, s.device = [], _Engine(), torch.device("cpu")
    s.metrics = JsonlSink(RunDir(tmp_path).metrics, True)
    s.saves = []
    s.save = lambda reason: s.saves.append((s.step, reason))
    s.evaluate = lambda: None
    it = iter(steps)

    def train_step(batches):
        loss, skipped = next(it)
        sums = torch.tensor([loss, loss / 2, loss / 4, loss / 4, 0.0]) * s.split.accumulation  # Session.LOSSES
        numbers = StepNumbers(losses=tuple(sums.double().tolist()), micro=s.split.accumulation, seconds=0.1)
        numbers.wait_s, numbers.skipped = 0.01, skipped
        return numbers, 1e-3

    s.train_step = train_step
    return s


@pytest.mark.parametrize(
    ("precision", "log_every", "steps", "fails_at", "saved", "needle"),
    [
        ("bf16", 1, [(3.0, 0), (2.9, 0), (NAN, 0), (2.5, 0)], 3, [2], "loss is nan at step 3"),
        ("bf16", 4, [(3.0, 0), (INF, 0), (2.9, 0), (2.5, 0)], 2, [], "loss is inf at step 2"),  # not at the log
        ("fp32", 1, [(3.0, 0), (2.9, 0), (2.8, 1), (2.5, 0)], 3, [2], "skipped step 3"),
        ("fp32", 2, [(3.0, 0), (2.9, 1), (2.8, 1), (2.7, 1), (2.6, 0), (2.5, 0)], 4, [2], "the last 3 steps"),
        ("fp16", 1, [(3.0, 1)] * 17 + [(3.0, 0)] * 3, None, [2, 4, 6, 8, 10, 12, 14, 16, 18, 20], None),
        ("fp16", 1, [(3.0, 1)] * 19, 18, [2, 4, 6, 8, 10, 12, 14, 16], "the last 18 steps"),
    ],
)
def test_the_loop_fails_at_the_diverged_step_before_any_checkpoint_of_it(
    tmp_path, precision, log_every, steps, fails_at, saved, needle
):
    from vltrain.divergence import TrainingDiverged

    cfg = TrainConfig(
        precision=precision, steps=len(steps), log_every=log_every, checkpoint_every=2, global_batch=8, micro_batch=8
    )
    s = _session(tmp_path, cfg, steps)
    if fails_at is None:
        s.run(None)
    else:
        with pytest.raises(TrainingDiverged, match=needle) as e:
            s.run(None)
        assert s.step == fails_at and "\n" not in str(e.value)
        lines = [json.loads(x) for x in RunDir(tmp_path).metrics.read_text().splitlines()]
        assert lines[-1]["step"] == fails_at  # the diverged step is logged, so the user sees it
    assert [step for step, reason in s.saves if reason == "periodic"] == saved
    s.close()


def test_a_diverged_run_is_recorded_as_its_failure_and_not_retried(tmp_path):
    from clusterctl.runs.retry import cluster_failure
    from clusterctl.specs import JobRecord, RunState
    from vltrain.divergence import TrainingDiverged
    from vltrain.failures import record_failure

    err = TrainingDiverged("training diverged: loss is nan at step 12 (itc nan, mlm 3.2, caption 4.1); allowed: x")
    assert isinstance(err, UserError) and err.exit_code == 2
    record_failure(tmp_path, err, "user", rank=0)
    rec = json.loads(RunDir(tmp_path).failure_file(0).read_text())
    assert rec["kind"] == "user" and rec["reason"] == str(err)  # no class name in front: the line says it all
    for code in ("2:0", "1:0"):  # the CLI's user error, submitit's failed job
        assert not cluster_failure(JobRecord("1", "r", 1, "submit", 0.0, RunState.FAILED, exit_code=code))
    assert cluster_failure(JobRecord("1", "r", 1, "submit", 0.0, RunState.FAILED, exit_code="75:0"))


# ================================================================ 2. checkpoints that verify


def ds_engine(fake):
    """A fake of DeepSpeed's own engine behind vltrain's DeepSpeed engine (its checkpoint I/O runs; nothing is built)."""
    from torch import nn

    from vltrain.engines.deepspeed import DeepSpeedEngine

    engine = object.__new__(DeepSpeedEngine)
    engine.ds, engine.module = fake, getattr(fake, "module", nn.Module())
    return engine


class _FakeEngine:
    """Writes DeepSpeed-like files through a checkpoint engine (as DeepSpeed does), and records that it
    reached its closing barrier."""

    def __init__(self, fail=None, module=None):
        self.checkpoint_engine = _CkptEngine(fail)
        self.reached_barrier = 0
        if module is not None:
            self.module = module

    def save_checkpoint(self, path, tag, save_latest):
        ds = Path(path) / tag
        ds.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"w": torch.arange(1000.0)}, str(ds / "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"m": torch.ones(3000)}, str(ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        self.reached_barrier += 1  # DeepSpeed's dist.barrier() at the end of save_checkpoint


class _CkptEngine:
    def __init__(self, fail):
        self.fail = fail

    def save(self, state, path):
        if self.fail is not None and "optim" in path:
            raise self.fail() if callable(self.fail) else self.fail
        torch.save(state, path)


def _save(run_dir, step, engine=None, **kw):
    return checkpoint.save(
        ds_engine(engine or _FakeEngine()),
        run_dir,
        step=step,
        samples=step * 8,
        rank=kw.pop("rank", 0),
        world_size=kw.pop("world_size", 1),
        config_hash="h",
        trainer_state={"loader": {"epoch": 0, "position": step}},
        keep=kw.pop("keep", 3),
        barrier=kw.pop("barrier", lambda: None),
        **kw,
    )


def test_a_checkpoint_records_the_size_and_crc32_of_every_file(tmp_path):
    path = _save(tmp_path, 10)
    meta = checkpoint.read_meta(path)
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert set(meta["files"]) == names - {"meta.json", "COMPLETE"}
    assert set(meta["files"]) == {
        "ds/mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "trainer_rank00000.pt",
    }  # each rank's file list was merged into meta.json and removed
    for rel, entry in meta["files"].items():
        data = (path / rel).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}", "rank": 0}
    raw = (path / "meta.json").read_bytes()
    assert (path / "COMPLETE").read_text() == f"10\nmeta.json {len(raw)} {zlib.crc32(raw):08x}\n"
    assert checkpoint.verify(path) is None


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated optimizer shard": (
        lambda d: _truncate(d / "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt: 100 bytes, ",
    ),
    "one flipped bit in the module": (
        lambda d: _flip(d / "ds/mp_rank_00_model_states.pt"),
        "ds/mp_rank_00_model_states.pt: CRC-32 ",
    ),
    "missing trainer state": (lambda d: (d / "trainer_rank00000.pt").unlink(), "trainer_rank00000.pt: missing"),
    "garbage meta.json": (lambda d: (d / "meta.json").write_bytes(os.urandom(300)), "meta.json: "),
    "meta.json cut short": (lambda d: _truncate(d / "meta.json"), "meta.json: 100 bytes"),
    "meta.json edited": (
        lambda d: (d / "meta.json").write_text(
            (d / "meta.json").read_text().replace('"samples": 160', '"samples": 16')
        ),
        "but COMPLETE records",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_verify_names_the_damaged_file_and_what_is_wrong(tmp_path, case):
    corrupt, needle = CORRUPTIONS[case]
    path = _save(tmp_path, 20)
    corrupt(path)
    problem = checkpoint.verify(path)
    assert problem is not None and needle in problem and "\n" not in problem


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_resume_moves_a_damaged_newest_checkpoint_aside_and_takes_the_one_before(tmp_path, case):
    corrupt, needle = CORRUPTIONS[case]
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    corrupt(newest)
    warnings = []
    path, moved = checkpoint.select(tmp_path, warn=warnings.append)
    assert path.name == "step_0000010"
    assert len(moved) == 1 and moved[0].startswith("step_0000020: ") and needle in moved[0]
    (line,) = warnings
    assert line.startswith("vltrain: warning: checkpoint step_0000020 is damaged (") and needle in line
    assert "moved it to checkpoints/.bad-step_0000020" in line
    bad = tmp_path / "checkpoints" / ".bad-step_0000020"
    assert bad.is_dir() and (bad / "COMPLETE").exists()  # kept whole, for whoever wants to look
    # latest, prune and the run-directory listing ignore it; the next save of step 20 does not touch it
    assert checkpoint.latest(tmp_path).name == "step_0000010"
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [10]
    assert [p.name for p in RunDir(tmp_path).checkpoint_dirs()] == ["step_0000010"]
    _save(tmp_path, 20, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".bad-step_0000020", "step_0000020"]
    assert checkpoint.select(tmp_path, warn=warnings.append) == (tmp_path / "checkpoints" / "step_0000020", [])


def test_every_damaged_checkpoint_is_moved_aside_and_the_run_starts_over(tmp_path):
    for step in (10, 20):
        _truncate(_save(tmp_path, step) / "trainer_rank00000.pt")
    path, moved = checkpoint.select(tmp_path, warn=lambda line: None)
    assert path is None and [m.split(":")[0] for m in moved] == ["step_0000020", "step_0000010"]
    _truncate(_save(tmp_path, 20) / "trainer_rank00000.pt")  # damaged again: a second name, nothing replaced
    checkpoint.select(tmp_path, warn=lambda line: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        ".bad-step_0000010",
        ".bad-step_0000020",
        ".bad-step_0000020-1",
    ]


def test_a_checkpoint_written_before_manifests_loads_unverified(tmp_path):
    path = _save(tmp_path, 10)
    meta = checkpoint.read_meta(path)
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "COMPLETE").write_text("10\n")
    assert checkpoint.verify(path) is None


def test_each_rank_checks_the_files_it_wrote(tmp_path):
    path = _save(tmp_path, 10)
    meta = checkpoint.read_meta(path)
    meta["files"]["ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"]["rank"] = 1  # as if rank 1 had written it
    raw = json.dumps(meta).encode()
    (path / "meta.json").write_bytes(raw)
    (path / "COMPLETE").write_text(f"10\nmeta.json {len(raw)} {zlib.crc32(raw):08x}\n")
    _truncate(path / "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert checkpoint.verify(path, rank=0, world_size=2) is None
    assert "optim_states.pt: 100 bytes" in checkpoint.verify(path, rank=1, world_size=2)


class _Comm:
    """Stands in for vltrain.collectives.Collectives on rank 0 of 2: at the agreement numbered `at`
    (1-based), rank 1 reports `line`."""

    active = True

    def __init__(self, at: int, line: str) -> None:
        self.at, self.line, self.calls, self.barriers = at, line, 0, 0

    def all_reduce_sum(self, t):
        self.calls += 1
        out = t.clone()
        if self.calls == self.at:
            out[1] = 1.0
        return out

    def broadcast_objects(self, objects, src=0):
        assert src == 1
        objects[0] = self.line
        return objects

    def barrier(self):
        self.barriers += 1


def test_the_ranks_agree_a_checkpoint_is_damaged_when_only_one_of_them_sees_it(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20)
    warnings = []
    comm = _Comm(1, "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt: 100 bytes, 9,000 written")
    path, moved = checkpoint.select(tmp_path, rank=0, world_size=2, comm=comm, warn=warnings.append)
    assert path.name == "step_0000010"  # rank 0's own files were sound; rank 1's verdict holds for both
    assert moved == ["step_0000020: ds/zero_pp_rank_1_mp_rank_00_optim_states.pt: 100 bytes, 9,000 written"]
    assert (tmp_path / "checkpoints" / ".bad-step_0000020").is_dir() and len(warnings) == 1


def test_eval_skips_a_checkpoint_whose_module_file_is_damaged(tmp_path, capsys):
    from vltrain.evaluate import newest_sound_checkpoint

    _save(tmp_path, 10)
    _flip(_save(tmp_path, 20) / "ds/mp_rank_00_model_states.pt")
    assert newest_sound_checkpoint(tmp_path).name == "step_0000010"
    assert "checkpoint step_0000020 is damaged (ds/mp_rank_00_model_states.pt: CRC-32" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "step_0000020").is_dir()  # evaluation only reads


# ================================================================ 3. a full disk


TORCH_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def _full(monkeypatch, free: int) -> None:
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: free)


def _dev_full_save(state, path):
    torch.save(state, "/dev/full")  # a real failed write: ENOSPC, which torch reports without errno


DISK_CASES = {
    "ENOSPC from DeepSpeed's writes": (lambda: OSError(errno.ENOSPC, "No space left on device"), 12_000_000, "ds"),
    "torch's errno-less write failure": (lambda: RuntimeError(TORCH_WRITE), 400_000, "ds"),
    "a real write to /dev/full": (None, 400_000, "dev-full"),
    "EDQUOT": (lambda: OSError(errno.EDQUOT, "Disk quota exceeded"), 12_000_000, "ds"),
    "ENOSPC writing the trainer state": (lambda: OSError(errno.ENOSPC, "No space left on device"), 5_000, "trainer"),
    "ENOSPC writing meta.json": (lambda: OSError(errno.ENOSPC, "No space left on device"), 5_000, "meta"),
}


@pytest.mark.parametrize("case", list(DISK_CASES))
def test_a_full_disk_is_one_line_naming_the_filesystem_and_the_sizes(tmp_path, monkeypatch, case):
    make, free, where = DISK_CASES[case]
    previous = _save(tmp_path, 10)
    size_mb = checkpoint.checkpoint_bytes(previous) / 1e6
    _full(monkeypatch, free)
    engine = _FakeEngine()
    if where == "ds":
        engine = _FakeEngine(fail=make)
    elif where == "dev-full":
        engine.checkpoint_engine.save = _dev_full_save
    elif where == "trainer":
        real = torch.save

        def save(obj, f, *a, **k):
            if "rng" in obj:
                raise make()
            return real(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)
    else:
        real_write = checkpoint._write_durable

        def write(path, data):
            if path.name == "meta.json":
                raise make()
            return real_write(path, data)

        monkeypatch.setattr(checkpoint, "_write_durable", write)
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        _save(tmp_path, 20, engine=engine)
    line = str(e.value)
    head = "disk quota exceeded on " if case == "EDQUOT" else "no space left on "
    assert line.startswith(head) and "\n" not in line
    assert " mounted at /" in line and f"({tmp_path / 'checkpoints'}): " in line
    assert f"{diskspace._mb(free)} MB free, checkpoint step_0000020 needs ~{size_mb:.1f} MB; allowed: " in line
    assert isinstance(e.value, UserError) and e.value.exit_code == 2
    # the half-written checkpoint is gone; the previous one is still the newest and still sound
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000010"]
    assert checkpoint.latest(tmp_path) == previous and checkpoint.verify(previous) is None
    if where == "ds":
        assert engine.reached_barrier == 1  # DeepSpeed went on to its barrier: no rank is left waiting


def test_a_write_error_with_room_on_the_disk_is_not_called_a_full_disk(tmp_path, monkeypatch):
    _full(monkeypatch, 50_000_000_000)
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        _save(tmp_path, 20, engine=_FakeEngine(fail=lambda: RuntimeError(TORCH_WRITE)))
    line = str(e.value)
    assert line.startswith(f"cannot write checkpoint step_0000020 to {tmp_path / 'checkpoints'} (RuntimeError: ")
    assert "50,000 MB free on " in line and "allowed: a writable run directory" in line


def test_the_first_checkpoint_is_estimated_from_the_model_and_its_optimizer(tmp_path, monkeypatch):
    _full(monkeypatch, 1_000_000)
    engine = _FakeEngine(
        fail=lambda: OSError(errno.ENOSPC, "No space left on device"), module=torch.nn.Linear(999, 1000)
    )
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"1.0 MB free, checkpoint step_0000005 needs ~16 MB"):
        _save(tmp_path, 5, engine=engine)  # 1.0M fp32 parameters: 4 bytes + 12 of master weights and moments


def test_another_ranks_full_disk_fails_this_rank_with_the_same_line(tmp_path):
    line = "no space left on /dev/sdb1 mounted at /scratch (/scratch/run/checkpoints): 3 MB free, ..."
    comm = _Comm(2, line)  # agreement 2: after every rank wrote its files
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        _save(tmp_path, 20, rank=0, world_size=2, comm=comm, barrier=None)
    assert str(e.value) == line
    assert not (tmp_path / "checkpoints" / ".tmp-step_0000020").exists() and comm.barriers == 1


def test_a_lost_peer_while_saving_is_not_taken_for_a_write_error(tmp_path):
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        _save(tmp_path, 20, engine=_FakeEngine(fail=lambda: RuntimeError("[gloo] Connection closed by peer")))
    assert not diskspace.is_write_error(ConnectionResetError(104, "reset"))
    assert diskspace.is_write_error(OSError(errno.EIO, "Input/output error"))


def test_filesystem_names_the_device_and_mount_point():
    assert diskspace.filesystem("/").endswith(" mounted at /")
    assert diskspace.filesystem("/proc/self").endswith(" mounted at /proc")
    assert diskspace.free_bytes("/nonexistent/deeper") == diskspace.free_bytes("/")


# ================================================================ 4. input


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: d, "is a directory; allowed: a TOML train config file"),
        (lambda d: _write(d / "b.toml", b"\x00\x01\xff\xfe"), "is a binary file, not text (byte 0: NUL byte)"),
        (lambda d: _write(d / "c.toml", b"steps = 5\n\xff\xfe"), "is a binary file, not text (byte 10: invalid"),
        (lambda d: Path("/dev/zero"), "is not a regular file (a device, FIFO or socket)"),
        (lambda d: _fifo(d / "fifo.toml"), "is not a regular file"),
        (lambda d: _write(d / "big.toml", b"# x\n" * 300_000), "larger than 1 MiB, not a config"),
        (lambda d: d / "missing.toml", "no such file; allowed: a TOML train config file"),
    ],
    ids=["directory", "binary", "not-utf8", "dev-zero", "fifo", "huge", "missing"],
)
def test_a_config_that_is_not_a_toml_file_is_one_line(tmp_path, make, needle):
    path = make(tmp_path)
    with pytest.raises(UserError) as e:
        load_train_config(path)
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value) and "\n" not in str(e.value)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_a_directory_or_binary_file_as_config_is_one_line_from_the_cli(tmp_path):
    for path in (tmp_path, _write(tmp_path / "b.toml", os.urandom(64) + b"\x00")):
        r = run_cli("train", "--config", str(path), "--run-dir", str(tmp_path / "run"), prog="vltrain")
        assert r.returncode == 2 and r.stderr.startswith(f"error: {path}: ") and r.stderr.count("\n") == 1


@pytest.mark.parametrize("item", ["optim.lr=1e-3\nsteps=5", "steps=5\n", "steps=5\r", 'data.shards="a\nb"', "a=1\x00"])
def test_a_set_value_with_a_newline_is_one_line_not_a_silent_drop(item):
    with pytest.raises(UserError) as e:
        parse_overrides([item])
    key = item.partition("=")[0]
    assert str(e.value).startswith(f"--set {key}: ") and "allowed: one key=value on one line per --set" in str(e.value)
    assert "\n" not in str(e.value)


def test_set_values_on_one_line_still_parse():
    assert parse_overrides(["optim.lr=1e-3", 'data.shards="a\\nb"', "x=a b"]) == {
        "optim.lr": 1e-3,
        "data.shards": "a\nb",  # a TOML escape, not a line break in the argument
        "x": "a b",
    }


def test_a_newline_in_set_is_one_line_from_the_cli(tmp_path):
    r = run_cli("train", "--run-dir", str(tmp_path), "--set", "optim.lr=1e-3\nsteps=5", prog="vltrain")
    assert r.returncode == 2 and r.stderr.startswith("error: --set optim.lr: ") and r.stderr.count("\n") == 1


def _float_fields(cls, prefix="") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _float_fields(tp, f"{prefix}{f.name}.")
        elif tp is float:
            out.append(prefix + f.name)
        elif typing.get_origin(tp) is list and typing.get_args(tp) == (float,):
            out.append(prefix + f.name + "[]")
    return out


FLOAT_FIELDS = [*_float_fields(TrainConfig), "model.mlp_ratio"]


def test_every_float_field_is_listed():
    assert {"optim.lr", "optim.betas[]", "loss.itc", "loss.init_temperature", "model.mlp_ratio"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_every_float_of_a_train_config_is_finite(name, value, tmp_path):
    key = name.removesuffix("[]")
    override = [value, 0.9] if name.endswith("[]") else value
    with pytest.raises(UserError) as e:
        load_train_config(None, {key: override})
    msg = str(e.value)
    assert msg.startswith(f"--set {key}") and "allowed:" in msg and "\n" not in msg
    # and in a file (TOML spells them nan, inf, -inf)
    import tomli_w

    from vltrain.config import expand_preset

    table, _, leaf = key.rpartition(".")
    data = {table: expand_preset("tiny", "model")} if table == "model" else {table: {}} if table else {}
    (data[table] if table else data)[leaf] = override
    path = tmp_path / "cfg.toml"
    path.write_text(tomli_w.dumps(data))
    assert ("nan" if math.isnan(value) else "inf") in path.read_text()
    with pytest.raises(UserError) as e:
        load_train_config(path)
    assert str(e.value).startswith(f"{path}: {key}") and "allowed:" in str(e.value)


def test_a_full_disk_under_the_metrics_warns_once_and_leaves_the_failure_to_the_checkpoint(tmp_path, capsys):
    """Only rank 0 writes metrics and events: failing there alone would leave the other ranks in the
    next collective until the time-out (exit 75, retried). The next checkpoint fails on every rank."""
    from vltrain.metrics import JsonlSink

    sink = JsonlSink(tmp_path / "metrics.jsonl", True)

    class Full:
        def write(self, text):
            return len(text)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.flush()

    sink._f = Full()
    sink.write({"step": 1})
    sink.write({"step": 2})
    err = capsys.readouterr().err
    assert err.count("vltrain: warning: cannot append to ") == 1 and "(No space left on device)" in err
    sink.close()

    class Broken(Full):
        def flush(self):
            raise OSError(errno.EIO, "Input/output error")

    sink._f = Broken()
    with pytest.raises(OSError, match="Input/output"):  # anything but a full disk is still an error
        sink.write({"step": 3})


def test_the_quick_config_check_before_start_skips_a_damaged_meta_json(tmp_path):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    meta = newest / "meta.json"
    meta.write_text(meta.read_text().replace('"config_hash": "h"', '"config_hash": "x"'))  # valid JSON, wrong bytes
    checkpoint.check_newest(tmp_path, "h", 1)  # not refused as "another config": it is damaged, select() decides
    with pytest.raises(UserError, match="written by config h but this run's config is other"):
        checkpoint.check_newest(tmp_path, "other", 1)  # the sound one before it is of another config
