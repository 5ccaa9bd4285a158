"""Metrics sinks beyond metrics.jsonl: TensorBoard, Weights & Biases, MLflow ([tracking] in a config).

metrics.jsonl stays the source of truth (clusterctl reads it); these get the same records, on rank 0
only, for the dashboards people already use. Each is keyed on the clusterctl run id (the run
directory's name), so every attempt of a run (a requeue, a retry, a resume) continues ONE tracker
run: W&B resumes the id, MLflow finds its run by a tag, TensorBoard writes one directory. A resume
from an older checkpoint logs steps again: TensorBoard purges the events from the first re-logged
step on (purge_step), so its steps stay monotone; W&B drops steps below what it has seen; MLflow
keeps both (its metric history is a list of (step, value)).

A sink is opened at the first record (an attempt that dies before step 1 opens none) and a sink
that raises, opening or writing, is logged once on stderr and disabled: a dashboard never stops
training. Each library is imported only when its sink is on.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any

from vltrain.config import TrackingConfig
from vltrain.rundir import RunDir

RUN_ID_TAG = "clusterctl.run_id"  # the MLflow tag that finds a run's tracker run again
# Record keys that are no metric: the step is the x axis, the time the event's wall time.
NOT_METRICS = ("step", "time")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers by key, the step and time left out (pure): what every sink logs."""
    out = {}
    for key, value in record.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardSink:
    """Event files in <run_dir>/tb/; the first record of an attempt purges what an earlier attempt
    logged from that step on (SummaryWriter's purge_step: TensorBoard drops those events on reading)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(RunDir(run_dir).tensorboard), purge_step=first_step)

    def write(self, step: int, values: dict[str, float], wall_time: float | None) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step, walltime=wall_time)
        self.writer.flush()  # a killed attempt keeps what it logged, like metrics.jsonl

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per clusterctl run: id = the run id, resume="allow" (offline: each attempt writes
    an offline-run-*-<id> directory that `wandb sync` merges into that one run)."""

    name = "wandb"

    def __init__(self, run_dir: Path, cfg: TrackingConfig) -> None:
        import wandb

        run_id = Path(run_dir).name
        self.run = wandb.init(
            id=run_id,
            name=run_id,
            resume="allow",
            project=cfg.wandb_project or "vltrain",
            entity=cfg.wandb_entity or None,
            mode="online" if cfg.wandb_mode == "online" else "offline",
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),  # beside the run's other files
        )
        self.seen = -1

    def write(self, step: int, values: dict[str, float], wall_time: float | None) -> None:
        last = max(self.seen, getattr(self.run, "step", 0) - 1)
        if step <= last:  # W&B steps only grow: a rolled-back attempt logs from where W&B left off
            return
        self.run.log(values, step=step)
        self.seen = step

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """The MLflow run tagged with the run id in the experiment (created by the first attempt,
    continued by the others); metrics are logged with their step."""

    name = "mlflow"

    def __init__(self, run_dir: Path, cfg: TrackingConfig) -> None:
        from mlflow.tracking import MlflowClient

        run_id = Path(run_dir).name
        self.client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri or None)
        name = cfg.mlflow_experiment or "vltrain"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_id, tags={RUN_ID_TAG: run_id}).info.run_id

    def write(self, step: int, values: dict[str, float], wall_time: float | None) -> None:
        from mlflow.entities import Metric

        ms = int((wall_time or 0.0) * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """The sinks [tracking] turns on, fed each metrics record; none when `cfg` is None (other ranks)."""

    def __init__(self, run_dir: Path, cfg: TrackingConfig | None) -> None:
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.wanted = [] if cfg is None else cfg.sinks()
        self.sinks: dict[str, Any] = {}

    def _open(self, name: str, first_step: int) -> Any:
        assert self.cfg is not None
        if name == "tensorboard":
            return TensorBoardSink(self.run_dir, first_step)
        return WandbSink(self.run_dir, self.cfg) if name == "wandb" else MlflowSink(self.run_dir, self.cfg)

    def write(self, record: dict[str, Any]) -> None:
        step, values = int(record.get("step", 0)), scalars(record)
        for name in list(self.wanted):
            try:
                if name not in self.sinks:
                    self.sinks[name] = self._open(name, step)
                self.sinks[name].write(step, values, record.get("time"))
            except Exception as e:  # any library's error: the dashboard goes, training stays
                self.wanted.remove(name)
                self._warn(name, e, self.sinks.pop(name, None))

    @staticmethod
    def _warn(name: str, err: BaseException, sink: Any) -> None:
        """The one line a failing sink gets, then its close (which may fail too: silently)."""
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"vltrain: warning: tracking.{name} failed ({type(err).__name__}: {first[:200]}); it is off for the "
            "rest of this attempt (metrics.jsonl has every record)",
            file=sys.stderr,
            flush=True,
        )
        if sink is not None:
            with contextlib.suppress(Exception):  # already failing: its one line is out
                sink.close()

    def close(self) -> None:
        for name in list(self.sinks):
            try:
                self.sinks.pop(name).close()
            except Exception as e:
                self._warn(name, e, None)
