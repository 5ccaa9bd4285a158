"""The training loop and its submitit entry point, `TrainJob(run_dir)`.

Preemption and time-out. submitit installs a SIGUSR2 handler that checkpoints and requeues at
once, in the middle of whatever the process is doing. `TrainJob` replaces it (and SIGTERM's) with a
handler that only records the signal; at each optimizer-step boundary all ranks sum the records
(one all_reduce shared with the loss averages), and if any rank got one they all write a checkpoint,
log `preempt` or `timeout`, and then run submitit's own handler, whose `checkpoint()` returns the
resubmission and whose rank 0 requeues (scontrol requeue on Slurm, exit 144 for the local executor).
SIGTERM (scancel, Slurm preemption without USR2) writes the checkpoint and exits 143; Slurm's own
preempt-requeue or clusterctl decides what comes next. The requeued job resumes from the newest
complete checkpoint. A lost peer or communicator error exits 75, which clusterctl retries.
Divergence: vltrain.divergence. The per-step numbers the ranks sum: vltrain.stepstats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from vltrain.common.errors import UserError
from vltrain.config import TrainConfig, load_train_config, write_resolved_config
from vltrain.divergence import TrainingDiverged, non_finite_loss, remedies, skipped_interval
from vltrain.engines.common import RankLayout
from vltrain.failures import is_comm_error, record_failure
from vltrain.presets import resolve_model
from vltrain.rundir import EXIT_COMM_ERROR, STALL_TIMEOUT_S, JobEnv, RunDir, scheduler_job_id
from vltrain.signals import CONTINUE, StopRequests, has_timed_out, preempt_signal, run_original_handler
from vltrain.startup import finish, log_line, mark
from vltrain.stepstats import LOSSES, Interval, StepNumbers, flops_per_sample
from vltrain.teardown import NativeTeardown
from vltrain.watchdog import Watchdog

if TYPE_CHECKING:
    from vltrain.batching import BatchSplit
    from vltrain.data.loader import ShardLoader
    from vltrain.distenv import DistEnv
    from vltrain.energy import StartingEnergy
    from vltrain.metrics import EventLog
    from vltrain.tokenizer import Tokenizer


class TrainJob(submitit.helpers.Checkpointable):
    """What clusterctl submits: trains the run in `run_dir` (config.toml there), resuming if it can."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = str(run_dir)

    def __call__(self) -> dict[str, Any]:
        try:
            cfg = load_train_config(RunDir(self.run_dir).config)
        except BaseException as e:  # train() records its own failures; this is the one before it
            record_failure(self.run_dir, e, "user" if isinstance(e, UserError) else type(e).__name__)
            raise
        return train(cfg, self.run_dir)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The checkpoint itself was written at the step boundary before submitit's handler ran;
        # the resubmitted job finds it in the run directory.
        return submitit.helpers.DelayedSubmission(TrainJob(self.run_dir))


def batch_split(cfg: TrainConfig, world_size: int) -> BatchSplit:
    from vltrain.batching import split_batch

    return split_batch(cfg.global_batch, world_size, cfg.micro_batch or None, cfg.accumulation or None)


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank python/numpy/torch RNG (MIM's masks differ across ranks; the model init does not; MLM's
    follow the sample: the loader's "mlm_draws")."""
    import random

    import numpy as np
    import torch

    s = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def pad_text_to_max(cfg: TrainConfig) -> bool:
    """Whether training batches pad their text to model.max_text_len rather than to their longest caption:
    under pipeline parallel, whose stages exchange activations of one shape (their receive buffers are
    sized at the first step). The MLM mask does not depend on it: its numbers are drawn per real token
    (vltrain.data.loader.mlm_draws)."""
    return cfg.parallel.pp > 1


def train(cfg: TrainConfig, run_dir: str | Path, *, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; every rank calls it. Returns this rank's summary.

    stop_after: end this attempt with a checkpoint after that many optimizer steps (time slices, tests).
    """
    from vltrain import distenv
    from vltrain.metrics import EventLog, attempt_number

    mark("imports")  # the trainer's modules (torch...): vltrain.startup
    NativeTeardown.install()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stops = StopRequests()
    stops.install()  # first: a signal that arrives during the slow start-up is not lost
    dist_env = distenv.current()
    events = EventLog(run_dir, dist_env.is_main, attempt_number(run_dir))
    session: Session | None = None
    try:
        session = Session(cfg, run_dir, dist_env, events, stops)
        result = session.run(stop_after)
        NativeTeardown.decide(0)
        return result
    except (UserError, SystemExit) as e:
        if isinstance(e, UserError):
            record_failure(run_dir, e, "user", dist_env.rank)  # first: the event log may be on a full disk
            with contextlib.suppress(OSError):  # a full disk under the event log must not hide this error
                events.emit("error", session.step if session else 0, kind=getattr(e, "kind", "user"), message=str(e))
        raise
    except BaseException as e:
        step = session.step if session else 0
        if is_comm_error(e):
            events.emit("error", step, kind="communication", message=str(e)[:500])
            record_failure(run_dir, e, "communication", dist_env.rank)
            print(
                f"vltrain: lost a peer or the communicator ({type(e).__name__}: {str(e)[:300]}); "
                f"exit {EXIT_COMM_ERROR}",
                file=sys.stderr,
                flush=True,
            )
            events.close()
            os._exit(EXIT_COMM_ERROR)  # skip interpreter teardown: tearing down a broken group can hang
        events.emit("error", step, kind=type(e).__name__, message=str(e)[:500])
        record_failure(run_dir, e, type(e).__name__, dist_env.rank)
        raise
    finally:
        if session is not None:
            session.close()
        stops.restore()
        events.close()


class Session:
    """One attempt of a run on one rank: validated inputs, process group, engine, loader, sinks.

    Strategy-blind: the engine (vltrain.engines, chosen by parallel.strategy) builds, steps, saves, loads
    and gives the model to evaluate; the checkpoint protocol (vltrain.checkpoint) is the same for all."""

    LOSSES = LOSSES

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, dist_env: DistEnv, events: EventLog, stops: StopRequests
    ) -> None:
        from vltrain import checkpoint
        from vltrain.collectives import Collectives, comm_device
        from vltrain.distenv import backend
        from vltrain.engines import engine_class

        self.cfg, self.run_dir, self.dist, self.events, self.stops = cfg, run_dir, dist_env, events, stops
        self.step = self.samples = 0
        self.saved_step = -1
        self.energy: StartingEnergy | None = None
        self.watchdog: Watchdog | None = None
        self.stage_index: int | None = None  # the curriculum stage in force ([[stages]])
        self.stage_loss = cfg.loss  # the stage's [loss]: what the FLOPs of MFU and HFU count
        self.mcfg = resolve_model(cfg.model)
        self.engine_class = engine_class(cfg.parallel.strategy)
        self.layout, self.split, self.device_kind = mark("checks", self._check_inputs())
        self.config_hash = cfg.config_hash()
        if dist_env.is_main:
            write_resolved_config(
                RunDir(run_dir).config,
                dataclasses.replace(cfg, micro_batch=self.split.micro_batch, accumulation=self.split.accumulation),
            )
        # before the slow start: a checkpoint this run cannot resume from is refused now
        checkpoint.check_newest(run_dir, self.config_hash, dist_env.world_size, self.engine_class.checkpoint_format)
        rank_device = mark("process_group", self.engine_class.init_process_group(dist_env, self.device_kind))
        self.comm = Collectives(comm_device(backend(self.device_kind), dist_env.local_rank), dist_env.world_size)
        ckpt, moved_aside = mark("checkpoint", self._select_checkpoint())
        self.tokenizer = mark("tokenizer", self._tokenizer())
        self.engine = self.engine_class.build(
            cfg, self.split.micro_batch, self.split.accumulation, self.layout, rank_device, initialise=ckpt is None
        )
        self.device, self.dtype = mark("engine", (self.engine.device, self.engine.dtype))
        self.loader = mark("loader", self._make_loader())
        seed_rank(cfg.seed, self.layout.dp_rank)  # TP / PP peers mask their (same) samples alike
        self._make_sinks()
        self._resume_or_start(ckpt, moved_aside)
        mark("start")
        self.energy = mark("energy", self._start_energy())

    # ---------------------------------------------------------------- set-up
    def _check_inputs(self) -> tuple[RankLayout, BatchSplit, str]:
        """The checks before anything slow starts: the layout (those plan/submit make, but the node rule),
        the batch split, the device, the data and tokenizer paths. -> (this rank's layout, the batch
        split, "cuda" or "cpu")."""
        import torch

        from vltrain.data.shards import resolve_shards
        from vltrain.distenv import resolve_device
        from vltrain.parallel.layout import layout_problems, microbatch_problem
        from vltrain.support import not_run_yet

        cfg, d, p = self.cfg, self.dist, self.cfg.parallel
        if problems := layout_problems(cfg, d.world_size, None) + not_run_yet(cfg):
            raise UserError(problems[0])
        layout = RankLayout.of(d.rank, d.world_size, p.tp, p.pp)
        split = batch_split(cfg, layout.dp)
        if problem := microbatch_problem(split.accumulation, p.pp, p.pp_schedule):
            raise UserError(problem)
        device_kind = resolve_device(JobEnv.from_env().device, torch.cuda.is_available(), socket.gethostname())
        if not cfg.data.shards:
            raise UserError("data.shards: not set; allowed: a directory of .tar shards, a brace pattern or a tar file")
        resolve_shards(cfg.data.shards)
        if cfg.data.tokenizer and not Path(cfg.data.tokenizer).is_file():
            raise UserError(
                f"data.tokenizer: {cfg.data.tokenizer} does not exist; allowed: a model from "
                f"`vltrain tokenizer train`, or empty to train one on data.shards into the run directory"
            )
        return layout, split, device_kind

    def _select_checkpoint(self) -> tuple[Path | None, list[str]]:
        """Collective: the newest checkpoint whose files verify (the ranks agree; damaged ones are moved
        aside, listed), checked against this run."""
        from vltrain import checkpoint

        d = self.dist
        ckpt, moved_aside = checkpoint.select(self.run_dir, d.rank, d.world_size, self.comm)
        if ckpt is not None:
            checkpoint.check_compatible(ckpt, self.config_hash, d.world_size, self.engine_class.checkpoint_format)
        return ckpt, moved_aside

    def _make_loader(self) -> ShardLoader:
        """The data-parallel rank and size's shards: tensor- and pipeline-parallel peers read the same samples."""
        from vltrain.data.loader import ShardLoader, loader_settings

        cfg = self.cfg
        return ShardLoader(
            cfg.data.shards,
            rank=self.layout.dp_rank,
            world_size=self.layout.dp,
            batch_size=self.split.micro_batch,
            seed=cfg.seed,
            image_size=self.mcfg.image_size,
            tokenizer=self.tokenizer,
            max_len=self.mcfg.max_text_len,
            train=True,
            data_cfg=cfg.data,
            pad_to_max=pad_text_to_max(cfg),
            **loader_settings(cfg.data.workers, self.device_kind, self.dist.local_world_size),
        )

    def _make_sinks(self) -> None:
        """metrics.jsonl and [tracking] (rank 0), the GPU's peak for MFU, the FLOPs a sample costs."""
        import torch

        from vltrain.metrics import MetricsLog, peak_tflops

        self.metrics = MetricsLog(self.run_dir, self.dist.is_main, self.cfg.tracking)
        dev_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.peak = peak_tflops(dev_name)
        self.params = self.engine.num_params()
        self.flops_per_sample: dict[int, tuple[float, float]] = {}  # (model, hardware) by padded text length

    def _start_info(self, moved_aside: list[str]) -> dict[str, Any]:
        """The start / resume event's fields: the layout, the batch split, what the engine says of itself."""
        cfg, d, p = self.cfg, self.dist, self.cfg.parallel
        info = {
            "world_size": d.world_size,
            "strategy": p.strategy,
            "tp": p.tp,
            "pp": p.pp,
            "dp": self.layout.dp,
            "micro_batch": self.split.micro_batch,
            "accumulation": self.split.accumulation,
            "global_batch": cfg.global_batch,
            "steps": cfg.steps,
            "params": self.params,
            "config_hash": self.config_hash,
            "launcher": d.source,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": scheduler_job_id(os.environ),
        }
        info |= self.engine.describe()
        if moved_aside:
            info["moved_aside"] = moved_aside
        return info

    def _resume_or_start(self, ckpt: Path | None, moved_aside: list[str]) -> None:
        """Restore the engine, loader position, counters and RNG from `ckpt` (or start at step 0); log it."""
        from vltrain import checkpoint

        cfg, d = self.cfg, self.dist
        info = self._start_info(moved_aside)
        if ckpt is not None:
            state = checkpoint.load(self.engine, ckpt, d.rank)
            self.loader.load_state_dict(
                checkpoint.remap_loader_state(state["loader"], self.layout.dp_rank, self.layout.dp)
            )
            self.step, self.samples, self.saved_step = state["step"], state["samples"], state["step"]
            checkpoint.set_rng_state(state["rng"])
            self.events.emit("resume", self.step, checkpoint=ckpt.name, **info)
        else:
            self.events.emit("start", 0, **info)
        self._say(
            f"vltrain: {self.mcfg.name} {self.params / 1e6:.2f}M params | {d.world_size} rank(s) via "
            f"{d.source}{self.engine.banner()} | global batch {cfg.global_batch} = {self.split.micro_batch} x "
            f"{self.split.accumulation} accum x {self.layout.dp} | "
            f"{'resuming from ' + ckpt.name if ckpt else 'starting'} at step {self.step}/{cfg.steps}"
        )

    def _start_energy(self) -> StartingEnergy | None:
        """One codecarbon tracker per node when clusterctl set the site's country, set up on a thread (vltrain.energy)."""
        from vltrain.energy import start_node_energy

        return start_node_energy(self.run_dir, self.dist, JobEnv.from_env())

    def _alive(self) -> None:
        """A checkpoint or an evaluation finished: not a stall, though no step did."""
        if self.watchdog is not None:
            self.watchdog.progress()

    def _say(self, line: str) -> None:
        if self.dist.is_main:
            print(line, flush=True)

    def _tokenizer(self) -> Tokenizer:
        from vltrain.tokenizer import tokenizer_for_run

        path = Path(self.cfg.data.tokenizer or RunDir(self.run_dir).tokenizer)
        return tokenizer_for_run(
            path, self.cfg.data.shards, self.mcfg.vocab_size, self.cfg.seed, self.dist.is_main, self.comm
        )

    # ---------------------------------------------------------------- the loop
    def run(self, stop_after: int | None) -> dict[str, Any]:
        from vltrain.engines.process_group import shorten_timeout

        cfg = self.cfg
        interval = Interval()
        batches = iter(self.loader)
        first_step = self.step
        self.watchdog = Watchdog(float(os.environ.get(STALL_TIMEOUT_S, 1800)), self.run_dir).start()
        while self.step < cfg.steps:
            self._enter_stage()
            mine, lr = self.train_step(batches)
            summed = StepNumbers.from_tensor(self.comm.all_reduce_sum(mine.to_tensor()))  # one collective a step
            self.step += 1
            self.watchdog.progress()
            if self.step == first_step + 1:
                shorten_timeout()
                self.events.emit("startup", self.step, **(startup := finish("first_step")))  # vltrain.startup
                self._say(log_line(startup))
            self.samples += cfg.global_batch
            interval.add(summed)
            self._log_or_stop_diverged(summed, interval, lr)
            if self.energy is not None:
                self.energy.maybe_flush()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.evaluate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save("periodic")
            if summed.stop:
                self._stop(int(summed.preempt > 0))
            if stop_after is not None and self.step - first_step >= stop_after and self.step < cfg.steps:
                self.save("stop_after")
                return {"step": self.step, "samples": self.samples, "finished": False}
        self.save("final")
        result = self.evaluate() if cfg.final_eval_in_training() else None
        self.events.emit(
            "finish", self.step, samples=self.samples, recall_i2t_r1=result["i2t"]["R@1"] if result else None
        )
        return {"step": self.step, "samples": self.samples, "finished": True, "eval": result}

    def _log_or_stop_diverged(self, summed: StepNumbers, interval: Interval, lr: float) -> None:
        """Log the interval when it ends (every log_every steps, the last, a stop, a divergence); end the
        run on every rank at the same step when it diverged (the same sums everywhere: the same verdict),
        before any checkpoint, so that the diverged state is not saved."""
        cfg = self.cfg
        losses = summed.mean_losses()
        diverged = non_finite_loss(self.step, losses, cfg)
        if self.step % cfg.log_every == 0 or self.step == cfg.steps or summed.stop or diverged:
            self._log(interval, lr)
            grad_norm = self.engine.get_global_grad_norm()
            diverged = diverged or skipped_interval(
                self.step, interval.steps, interval.skipped, interval.in_a_row, grad_norm, losses["loss"], cfg
            )
            if interval.skipped and not diverged:
                self._say(
                    f"vltrain: the optimizer skipped {interval.skipped} of the last {interval.steps} steps "
                    f"(gradient not finite); {interval.in_a_row} in a row now, at most {cfg.skip_tolerance()} tolerated"
                )
            interval.reset()
        if diverged:
            self._say(f"vltrain: {diverged}")
            raise TrainingDiverged(diverged)

    def _enter_stage(self) -> None:
        """Set the loss weights of the stage the next step is in ([[stages]], vltrain.stages) on the model,
        which reads them at each forward. The step alone decides the stage, so a resumed run lands in
        its stage; a `stage` event and a line mark each stage entered (and the one a resume starts in)."""
        from vltrain.stages import stage_at, stage_name

        index, loss = stage_at(self.cfg, self.step + 1)
        if index == self.stage_index:
            return
        self.stage_index = index
        self.stage_loss, self.flops_per_sample = loss, {}  # the FLOPs of MFU and HFU
        self.engine.set_loss_config(loss)
        if self.cfg.stages:
            weights = {k: getattr(loss, k) for k in ("itc", "mlm", "caption", "mim", "mim_mask_ratio")}
            name = stage_name(self.cfg, index)
            self.events.emit("stage", self.step, index=index, name=name, **weights)
            self._say(
                f"vltrain: {name} ({index + 1}/{len(self.cfg.stages)}) from step {self.step + 1}: "
                + ", ".join(f"{k} {v:g}" for k, v in weights.items())
            )

    def train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[StepNumbers, float]:
        """One optimizer step (accumulation micro steps) -> (this rank's numbers to sum over ranks, its LR).

        The numbers (vltrain.stepstats.StepNumbers): stop flags, loss sums, micro steps, real text tokens,
        model and hardware FLOPs, seconds, seconds of those blocked waiting for the loader's batches (in next()), and
        whether the optimizer skipped the step (a gradient not finite)."""
        from vltrain.engines.common import LossScaleAtMinimum

        eng, accumulation = self.engine, self.split.accumulation
        t0 = time.perf_counter()
        skipped_before = eng.skipped_steps
        waiting = time.perf_counter()
        micro_batches = [next(batches) for _ in range(accumulation)]
        wait_s = time.perf_counter() - waiting  # data wait: the step's time blocked on the loader
        tokens, flops, hw_flops = self._count(micro_batches)
        try:
            losses, lr = eng.train_step(micro_batches, self.LOSSES)
        except LossScaleAtMinimum:  # fp16: the loss scale cannot go lower
            raise TrainingDiverged(
                f"training diverged: fp16's loss scale reached its minimum at step {self.step + 1}, every "
                f"gradient overflowing; {remedies(self.cfg)}"
            ) from None
        seconds = time.perf_counter() - t0
        preempt, terminate = self.stops.flags()
        numbers = StepNumbers(
            preempt=preempt,
            terminate=terminate,
            losses=tuple(losses.sum(0).double().tolist()),
            micro=float(accumulation),
            tokens=tokens,
            flops=flops,
            hw_flops=hw_flops,
            seconds=seconds,
            wait_s=wait_s,
            skipped=float(eng.skipped_steps - skipped_before),  # 1 when the optimizer skipped this step
        )
        return (numbers if eng.layout.reporter else numbers.only_flags()), lr

    def _count(self, micro_batches: list[dict[str, Any]]) -> tuple[float, float, float]:
        """(real text tokens, model FLOPs, hardware FLOPs) of a step's micro batches (stepstats.flops_per_sample)."""
        tokens = flops = hw_flops = 0.0
        for batch in micro_batches:
            mask = batch["attention_mask"]
            t = mask.shape[1]
            if t not in self.flops_per_sample:
                ckpt, pp = self.cfg.activation_checkpointing, self.layout.pp > 1
                self.flops_per_sample[t] = flops_per_sample(self.mcfg, t, self.stage_loss, ckpt, pp)
            tokens += int(mask.sum())
            flops += self.flops_per_sample[t][0] * mask.shape[0]
            hw_flops += self.flops_per_sample[t][1] * mask.shape[0]
        return tokens, flops, hw_flops

    def _log(self, interval: Interval, lr: float) -> None:
        from vltrain.metrics import human_line, memory_stats, mfu

        world, dp = self.dist.world_size, self.layout.dp  # the reporter ranks: one per data-parallel replica
        steps = interval.micro / (dp * self.split.accumulation)  # optimizer steps in the interval
        wall = interval.seconds / dp  # mean over the reporters
        grad_norm = self.engine.get_global_grad_norm()
        rec = {
            "step": self.step,
            **{k: interval.losses[i] / interval.micro for i, k in enumerate(self.LOSSES)},
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples_per_s": steps * self.cfg.global_batch / wall,
            "tokens_per_s": interval.tokens / wall,
            "step_time_s": wall / steps,
            "data_wait_s": interval.wait_s / dp / steps,  # of step_time_s: blocked on the loader
            "mfu": mfu(interval.flops / steps, wall / steps, world, self.peak),
            "hfu": mfu(interval.hw_flops / steps, wall / steps, world, self.peak),
            **memory_stats(self.device),
            "samples": self.samples,
            "time": time.time(),
        }
        self.metrics.write(rec)
        self._say(human_line(rec, self.cfg.steps))

    # ---------------------------------------------------------------- checkpoints, evaluation, stops
    def save(self, reason: str) -> None:
        from vltrain import checkpoint

        if self.step == self.saved_step:
            return
        t0 = time.perf_counter()
        path = checkpoint.save(
            self.engine,
            self.run_dir,
            step=self.step,
            samples=self.samples,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            config_hash=self.config_hash,
            trainer_state={"loader": self.loader.state_dict()},
            keep=self.cfg.keep_checkpoints,
            comm=self.comm,
        )
        self.saved_step = self.step
        self._alive()
        self.events.emit(
            "checkpoint",
            self.step,
            path=f"{RunDir.CHECKPOINTS}/{path.name}",
            reason=reason,
            seconds=round(time.perf_counter() - t0, 3),
        )

    def evaluate(self) -> dict[str, Any] | None:
        """Held-out retrieval and captioning, every rank its slice of the pairs, with the model the engine gives
        (its own, or one read from this step's checkpoint, saved first); rank 0 writes and prints the scores."""
        import torch

        from vltrain import checkpoint
        from vltrain.evaluate import default_eval_shards, eval_line, evaluate, write_eval

        shards = default_eval_shards(self.cfg)
        if not shards:
            return None
        if self.engine.eval_reads_checkpoint:
            self.save("eval")  # nothing when this step is saved already
        with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG stream
            m, share = self.engine.eval_model(checkpoint.latest(self.run_dir))
            result = evaluate(m, self.cfg, self.tokenizer, shards, device=self.device, dtype=self.dtype, share=share)
            self.engine.eval_finished()
        result |= {"step": self.step, "samples": self.samples, "time": time.time()}
        if self.dist.is_main:
            write_eval(self.run_dir, result)
            self._say(eval_line(self.step, result))
        self._alive()
        return result

    def _stop(self, preempt_signal_seen: int) -> None:
        """Checkpoint, log, then let submitit's own handler requeue (USR2) or exit (SIGTERM)."""
        import torch

        sig = preempt_signal() if preempt_signal_seen else signal.SIGTERM
        original = self.stops.original.get(sig)
        kind = "timeout" if sig != signal.SIGTERM and has_timed_out(original) else "preempt"
        self.save(kind)
        self.events.emit(kind, self.step, signal=signal.Signals(sig).name)
        self._say(f"vltrain: {signal.Signals(sig).name} received; checkpoint at step {self.step} written ({kind})")
        if self.energy is not None:
            self.energy.stop()
            self.energy = None
        self.stops.restore()
        code, error = run_original_handler(original, sig)
        code = int(self.comm.broadcast(torch.tensor([code], dtype=torch.int64), src=0))
        if code == CONTINUE:
            self.stops.received.clear()
            self.stops.install()
            return
        if error is not None and self.dist.is_main:
            raise error
        NativeTeardown.decide(code)
        sys.exit(code)

    def close(self) -> None:
        self.engine.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.energy is not None:
            self.energy.stop()
            self.energy = None
        self.metrics.close()
