"""[tracking]: TensorBoard, W&B (offline) and MLflow (file store) fed what metrics.jsonl gets, one
tracker run per run across attempts, steps monotone after a rollback, a failing sink never fatal."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import tomli_w

from tests.conftest import run_cli, trainer_shards
from vltrain.common.errors import UserError
from vltrain.config import TrackingConfig, load_train_config
from vltrain.rundir import RunDir
from vltrain.tracking import Trackers, scalars

STEPS = 4
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return trainer_shards(tmp_path_factory.mktemp("tracking-data"), holdout=16)


def write_config(path: Path, data_dir: Path, tracking: dict) -> Path:
    cfg = {
        "model": "tiny",
        "global_batch": 8,
        "accumulation": 1,
        "steps": STEPS,
        "log_every": 1,
        "checkpoint_every": 2,
        "keep_checkpoints": 3,
        "data": {"shards": str(data_dir / "shards"), "tokenizer": str(data_dir / "tok.model"), "shuffle_buffer": 16},
        "tracking": tracking,
    }
    path.write_text(tomli_w.dumps(cfg))
    return path


def train(cfg: Path, run: Path, env: dict[str, str]):
    r = run_cli("train", "--config", str(cfg), "--run-dir", str(run), prog="vltrain", env=ENV | env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def last_per_step(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in RunDir(run).metrics.read_text().splitlines()]
    return {rec["step"]: rec["loss"] for rec in lines}  # readers keep the last line per step


def tb_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(run).tensorboard))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def tb_purge_steps(run: Path) -> list[int]:
    """The steps at which an attempt's writer told TensorBoard to drop what came before (raw events)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for f in sorted(RunDir(run).tensorboard.glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(f)).Load():
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                out.append(ev.step)
    return out


@pytest.mark.slow
def test_two_attempts_with_a_rollback_continue_one_tracker_run_each(data, tmp_path, monkeypatch):
    """Attempt 1 trains to the end; its newer checkpoints are removed (a rollback to step 2); attempt 2
    re-logs steps 3.. . TensorBoard shows each step once with attempt 2's values (as metrics.jsonl's
    readers do), W&B writes both attempts under the run id, MLflow continues the one tagged run."""
    wandb_dir, mlruns = tmp_path / "wandb", tmp_path / "mlruns"
    wandb_dir.mkdir()
    # MLflow 3's file store is in maintenance mode: allowed by this variable (a real site runs a server)
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_SILENT": "true",
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the store back
    tracking = {"tensorboard": True, "wandb": True, "mlflow": True, "mlflow_tracking_uri": mlruns.as_uri()}
    cfg = write_config(tmp_path / "c.toml", data, tracking)
    run = tmp_path / "run-tracked-1"
    train(cfg, run, env)
    first = last_per_step(run)
    for ckpt in RunDir(run).checkpoint_dirs()[1:]:  # keep step 2 only: the next attempt rolls back
        shutil.rmtree(ckpt)
    train(cfg, run, env)
    final = last_per_step(run)
    assert sorted(final) == list(range(1, STEPS + 1))

    loss = tb_scalars(run, "loss")
    steps = [s for s, _ in loss]
    assert steps == sorted(set(steps)) == list(range(1, STEPS + 1))  # monotone: each step once
    assert [v for _, v in loss] == pytest.approx([final[s] for s in steps], rel=1e-6)
    assert tb_purge_steps(run)[-1] == 3  # attempt 2 purged from its first step on
    assert first[1] == pytest.approx(final[1], rel=1e-6)

    offline = sorted(p.name for p in (wandb_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{run.name}") for name in offline), offline

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlruns.as_uri())
    exp = client.get_experiment_by_name("vltrain")
    runs = client.search_runs([exp.experiment_id])
    assert [r.data.tags["clusterctl.run_id"] for r in runs] == [run.name]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, STEPS + 1))
    assert len(history) == STEPS + 2  # steps 3 and 4 from both attempts: MLflow keeps both
    assert runs[0].info.status == "FINISHED"


@pytest.mark.slow
def test_a_failing_sink_is_logged_once_and_training_completes(data, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # MLflow cannot create its store under a regular file
    tracking = {"tensorboard": True, "mlflow": True, "mlflow_tracking_uri": (blocker / "mlruns").as_uri()}
    run = tmp_path / "run-failing-sink"
    r = train(write_config(tmp_path / "c.toml", data, tracking), run, {"MLFLOW_ALLOW_FILE_STORE": "true"})
    warnings = [x for x in r.stderr.splitlines() if "tracking." in x]
    assert len(warnings) == 1 and "tracking.mlflow failed" in warnings[0], r.stderr[-2000:]
    assert sorted(last_per_step(run)) == list(range(1, STEPS + 1))
    assert [s for s, _ in tb_scalars(run, "loss")] == list(range(1, STEPS + 1))  # the other sink goes on


class Raising:
    name = "raising"

    def __init__(self) -> None:
        self.calls = 0

    def write(self, *a) -> None:
        self.calls += 1
        raise RuntimeError("dashboard down\nsecond line")

    def close(self) -> None:
        raise RuntimeError("still down")


def test_a_sink_raising_on_write_is_disabled_after_one_line(tmp_path, capsys):
    t = Trackers(tmp_path, TrackingConfig())
    sink = Raising()
    t.wanted, t.sinks = ["tensorboard"], {"tensorboard": sink}
    for step in (1, 2, 3):
        t.write({"step": step, "loss": 1.0})
    t.close()
    err = capsys.readouterr().err.splitlines()
    assert sink.calls == 1 and len(err) == 1
    assert "tracking.tensorboard failed (RuntimeError: dashboard down)" in err[0]


def test_scalars_keep_finite_numbers_but_step_and_time():
    rec = {"step": 3, "time": 1e9, "loss": 2.5, "mfu": None, "lr": 1e-3, "x": float("nan"), "ok": True, "n": 7}
    assert scalars(rec) == {"loss": 2.5, "lr": 1e-3, "n": 7.0}


def test_a_sink_whose_package_is_missing_is_one_line_at_config_check(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then reports it missing
    path = tmp_path / "c.toml"
    path.write_text("[tracking]\nwandb = true\n")
    with pytest.raises(UserError) as e:
        load_train_config(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: tracking.wandb:") and "'.[tracking]'" in msg
    path.write_text("[tracking]\ntensorboard = true\n")
    assert load_train_config(path).tracking.sinks() == ["tensorboard"]
    with pytest.raises(UserError, match=r"^--set tracking.wandb: true but the wandb package"):
        load_train_config(path, {"tracking.wandb": True})


def test_wandb_mode_is_validated(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[tracking]\nwandb_mode = "cloud"\n')
    with pytest.raises(UserError, match="tracking.wandb_mode"):
        load_train_config(path)


def test_other_ranks_open_no_sink(tmp_path):
    from vltrain.metrics import MetricsLog

    log = MetricsLog(tmp_path, False, TrackingConfig(tensorboard=True))
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert log.trackers.wanted == [] and not RunDir(tmp_path).tensorboard.exists()
    assert not RunDir(tmp_path).metrics.exists()


def test_wandb_skips_the_steps_it_has_seen():
    """After a rollback W&B gets only steps above those it holds (its resumed run.step, then its own)."""
    from vltrain.tracking import WandbSink

    class Run:
        step = 5  # a resumed online run: steps 1..4 are on the server

        def __init__(self) -> None:
            self.logged: list[int] = []

        def log(self, values, step):
            self.logged.append(step)

    sink = object.__new__(WandbSink)
    sink.run, sink.seen = Run(), -1
    for step in (3, 4, 5, 6, 6):
        sink.write(step, {"loss": 1.0}, None)
    assert sink.run.logged == [5, 6]
