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

Divergence. After the per-step all_reduce every rank knows the step's losses and whether any rank's
optimizer skipped it (DeepSpeed skips a step whose gradient is not finite). A loss that is NaN or
infinite, or a logging interval whose every step was skipped once more than `max_skipped_steps`
steps in a row were (fp16's loss scaler skips a few while it settles; bf16 and fp32 skip none), ends
the run on every rank at the same step with `TrainingDiverged`: one line, recorded as the run's
failure reason, exit 2 (not 75: a retry from the last checkpoint diverges again), and no checkpoint
of the diverged state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import submitit

from vltrain.common.errors import UserError
from vltrain.config import TrainConfig, load_train_config
from vltrain.presets import resolve_model
from vltrain.rundir import ENERGY_FLUSH_S, EXIT_COMM_ERROR, STALL_TIMEOUT_S, JobEnv, RunDir

_CONTINUE = -1000  # "keep training" in the stop decision that rank 0 broadcasts
COMM_ERROR_WORDS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "gloo",
    "nccl",
    "timed out",
    "socket timeout",
    "rendezvous",
    "tcpstore",
    "processgroup",
)


def preempt_signal() -> signal.Signals:
    """The signal submitit uses for preemption/time-out (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class StopRequests:
    """Records preemption/termination signals; the loop acts on them at the next step boundary."""

    def __init__(self) -> None:
        self.signals = (preempt_signal(), signal.SIGTERM)
        self.received: list[int] = []
        self.original: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; whoever runs us there handles them
        for sig in self.signals:
            self.original[sig] = signal.getsignal(sig)
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    def restore(self) -> None:
        for sig, handler in self.original.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def flags(self) -> list[float]:
        return [float(self.signals[0] in self.received), float(signal.SIGTERM in self.received)]


def is_comm_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in COMM_ERROR_WORDS)


class TrainingDiverged(UserError):
    """The loss is not finite, or the optimizer skipped every step of a logging interval (beyond
    TrainConfig.max_skipped_steps in a row): the run stopped learning. Every rank raises it at the
    same step; the run ends FAILED and is not retried."""

    kind = "diverged"


def _num(x: float) -> str:
    return f"{x:.4g}"


def _remedies(cfg: TrainConfig) -> str:
    from vltrain.dsconfig import warmup_steps

    o = cfg.optim
    parts = [f"a lower optim.lr (now {o.lr:g})", f"a longer warm-up (optim.warmup_steps, now {warmup_steps(cfg)})"]
    if o.grad_clip == 0:
        parts.append("gradient clipping (optim.grad_clip 1.0)")
    if cfg.precision == "fp16":
        parts.append("precision bf16, or a larger max_skipped_steps if the loss scale is still settling")
    return "allowed: " + ", ".join(parts) + ", in a new run directory (a checkpoint resumes only its own settings)"


def non_finite_loss(step: int, losses: dict[str, float], cfg: TrainConfig) -> str | None:
    """The divergence line when a loss of this step (mean over micro steps and ranks) is NaN or infinite."""
    import math

    if all(math.isfinite(v) for v in losses.values()):
        return None
    parts = ", ".join(f"{k} {_num(v)}" for k, v in losses.items() if k != "loss")
    return f"training diverged: loss is {_num(losses['loss'])} at step {step} ({parts}); {_remedies(cfg)}"


def skipped_interval(
    step: int, interval_steps: int, interval_skipped: int, in_a_row: int, grad_norm, loss: float, cfg: TrainConfig
) -> str | None:
    """The divergence line when the optimizer skipped every step of the logging interval that ends
    at `step` and more than the tolerated steps in a row (cfg.skip_tolerance(): fp16's settling loss
    scale; none under bf16 and fp32)."""
    tolerance = cfg.skip_tolerance()
    if interval_steps <= 0 or interval_skipped < interval_steps or in_a_row <= tolerance:
        return None
    gn = "unknown" if grad_norm is None else _num(float(grad_norm))
    steps = f"step {step}" if in_a_row == 1 else f"the last {in_a_row} steps (to step {step})"
    return (
        f"training diverged: the optimizer skipped {steps} (gradient norm {gn}, loss {_num(loss)}; "
        f"{cfg.precision} tolerates {tolerance} skipped in a row, max_skipped_steps); {_remedies(cfg)}"
    )


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


def batch_split(cfg: TrainConfig, world_size: int):
    from vltrain.batching import split_batch

    return split_batch(cfg.global_batch, world_size, cfg.micro_batch or None, cfg.accumulation or None)


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    """<run_dir>/config.toml: the resolved config this attempt trains with (what `vltrain eval` reads).

    Left alone when it already says the same (clusterctl writes it before submitting).
    """
    import tomllib

    import tomli_w

    from vltrain.common.atomic import atomic_write

    path = RunDir(run_dir).config
    try:
        if tomllib.loads(path.read_text(encoding="utf-8")) == cfg.to_dict():
            return
    except (OSError, tomllib.TOMLDecodeError):
        pass
    atomic_write(path, tomli_w.dumps(cfg.to_dict()), mode=None)


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


class NativeTeardown:
    """Skip C++ static destruction at the end of a process that trained (either engine).

    Measured here: about 1 in 6-8 pipelined attempts that had ended cleanly (checkpoint complete, every
    file closed) died at interpreter exit with "terminate called without an active exception" (SIGABRT,
    exit 134: a joinable native thread destroyed during static destruction, with no Python frame left;
    destroy_process_group() first did not prevent it; cf. pytorch/pytorch#179291). clusterctl reads 134 as
    an NCCL abort and retries, and torchrun reports the run failed. The same abort ended a DeepSpeed
    two-process stop/resume test in CI once (after ~1,200 clean ones), so every run installs it. So once the attempt has decided its exit
    code, the last atexit handler (registered first: atexit runs last-in first-out, so every other handler,
    submitit's result file included, has run) flushes and leaves with that code through os._exit."""

    code: int | None = None
    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            import atexit

            atexit.register(cls._exit)
            cls._installed = True

    @classmethod
    def decide(cls, code: int) -> None:
        cls.code = code

    @classmethod
    def _exit(cls) -> None:
        if cls.code is None:
            return  # not decided (a failure): the usual teardown
        code = 1 if getattr(sys, "last_value", None) is not None else cls.code  # the caller failed after us
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def train(cfg: TrainConfig, run_dir: str | Path, *, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; every rank calls it. Returns this rank's summary.

    stop_after: end this attempt with a checkpoint after that many optimizer steps (time slices, tests).
    """
    from vltrain import distenv
    from vltrain.metrics import EventLog, attempt_number

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


def loader_settings(
    workers: int, device: str, local_world_size: int, env: dict[str, str] | None = None, cpus: int | None = None
) -> dict[str, Any]:
    """Data-loader workers and pinned memory for a rank (pure but for the CPU count). On GPUs the
    loader must keep up with the model: workers from the CPUs per task (Slurm's, else the node's
    share), one CPU left for the rank itself, at most 8; batches in pinned memory for async copies.
    On CPU runs the cores are the model's: no workers. `workers` >= 0 in the config wins."""
    pin = device == "cuda"
    if workers >= 0:
        return {"workers": workers, "pin_memory": pin}
    if device != "cuda":
        return {"workers": 0, "pin_memory": False}
    env = dict(os.environ) if env is None else env
    per_task = int(env.get("SLURM_CPUS_PER_TASK", "0") or 0)
    if not per_task:
        total = cpus if cpus is not None else len(os.sched_getaffinity(0))
        per_task = max(1, total // max(1, local_world_size))
    return {"workers": min(8, max(1, per_task - 1)), "pin_memory": pin}


class Watchdog:
    """Exit 75 (cluster failure: clusterctl requeues the run) when no optimizer step has finished for
    too long. NCCL's timeout catches a rank waiting inside a collective for a lost peer; a rank hung
    outside one (a stuck data loader, a dead NFS mount, a deadlock) would otherwise hold every GPU
    of the job until the time limit. The first step (compilation, data start-up, checkpoint load)
    gets twice the limit."""

    def __init__(self, limit_s: float, run_dir: str | Path = ".", on_stall=None, poll_s: float | None = None) -> None:
        self.limit_s, self.run_dir = limit_s, run_dir
        self.on_stall = on_stall or self._exit
        self.poll_s = poll_s if poll_s is not None else min(30.0, limit_s / 10)
        self.last = time.monotonic()
        self.stepped = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._watch, name="vltrain-watchdog", daemon=True)
        self._thread.start()
        return self

    def progress(self) -> None:
        self.last = time.monotonic()
        self.stepped = True

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self.last
            if idle > (self.limit_s if self.stepped else 2 * self.limit_s):
                self.on_stall(idle)
                return

    def _exit(self, idle: float) -> None:
        print(
            f"vltrain: no optimizer step for {idle:.0f} s (limit {self.limit_s:g} s, {STALL_TIMEOUT_S}); "
            f"exit {EXIT_COMM_ERROR} so that the run is requeued",
            file=sys.stderr,
            flush=True,
        )
        record_failure(self.run_dir, TimeoutError(f"no optimizer step for {idle:.0f} s"), "stall")
        os._exit(EXIT_COMM_ERROR)


def record_failure(run_dir: str | Path, exc: BaseException, kind: str, rank: int | None = None) -> None:
    """Why this rank failed, where clusterctl's status finds it (RunDir.failure_file): the UserError's
    line, or the exception's type and last line. Never raises: it runs while something else failed."""
    import json

    from vltrain.common.atomic import atomic_write

    try:
        if rank is None:
            rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
        text = str(exc).strip().splitlines()[-1:] or [""]
        plain = kind == "user" or isinstance(exc, UserError)  # its line already says what and where
        reason = text[0] if plain else f"{type(exc).__name__}: {text[0]}".rstrip(": ")
        record = {
            "kind": kind,
            "reason": reason[:500],
            "rank": rank,
            "time": time.time(),
            "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        }
        atomic_write(RunDir(run_dir).failure_file(rank), json.dumps(record) + "\n", mode=None)
    except Exception:  # a full disk or a vanished run directory must not hide the original error
        pass


class Session:
    """One attempt of a run on one rank: validated inputs, process group, engine, loader, sinks."""

    LOSSES = ("loss", "itc", "mlm", "caption", "mim")

    def __init__(self, cfg: TrainConfig, run_dir: Path, dist_env, events, stops: StopRequests) -> None:
        import torch

        from vltrain import checkpoint
        from vltrain.collectives import Collectives, comm_device
        from vltrain.data.loader import ShardLoader
        from vltrain.data.shards import resolve_shards
        from vltrain.distenv import backend, resolve_device
        from vltrain.energy import NodeEnergy, visible_gpu_ids
        from vltrain.engine import Layout, compute_dtype, init_process_group, make_engine
        from vltrain.metrics import JsonlSink, peak_tflops

        self.cfg, self.run_dir, self.dist, self.events, self.stops = cfg, run_dir, dist_env, events, stops
        self.step = self.samples = 0
        self.saved_step = -1
        self.energy = None
        self.mcfg = resolve_model(cfg.model)
        p = cfg.parallel
        from vltrain.parallel.layout import layout_problems, microbatch_problem
        from vltrain.support import not_run_yet

        # checks before anything slow starts: the layout (the ones plan/submit make, but the node rule), then the batch
        if problems := layout_problems(cfg, dist_env.world_size, None) + not_run_yet(cfg):
            raise UserError(problems[0])
        self.layout = Layout.of(dist_env.rank, dist_env.world_size, p.tp, p.pp)
        self.split = batch_split(cfg, self.layout.dp)
        if problem := microbatch_problem(self.split.accumulation, p.pp, p.pp_schedule):
            raise UserError(problem)
        self.device_kind = resolve_device(JobEnv.from_env().device, torch.cuda.is_available(), socket.gethostname())
        if not cfg.data.shards:
            raise UserError("data.shards: not set; allowed: a directory of .tar shards, a brace pattern or a tar file")
        resolve_shards(cfg.data.shards)
        if cfg.data.tokenizer and not Path(cfg.data.tokenizer).is_file():
            raise UserError(
                f"data.tokenizer: {cfg.data.tokenizer} does not exist; allowed: a model from "
                f"`vltrain tokenizer train`, or empty to train one on data.shards into the run directory"
            )
        self.config_hash = cfg.config_hash()
        if dist_env.is_main:
            write_config(
                run_dir,
                dataclasses.replace(cfg, micro_batch=self.split.micro_batch, accumulation=self.split.accumulation),
            )
        ckpt_format = "dcp" if p.strategy == "fsdp" else "ds"
        checkpoint.check_newest(run_dir, self.config_hash, dist_env.world_size, ckpt_format)  # before the slow start

        rank_device = init_process_group(dist_env, self.device_kind, p.strategy)
        self.comm = Collectives(comm_device(backend(self.device_kind), dist_env.local_rank), dist_env.world_size)
        # the newest checkpoint whose files verify (the ranks agree); damaged ones are moved aside
        ckpt, moved_aside = checkpoint.select(run_dir, dist_env.rank, dist_env.world_size, self.comm)
        if ckpt is not None:
            checkpoint.check_compatible(ckpt, self.config_hash, dist_env.world_size, ckpt_format)
        self.tokenizer = self._tokenizer()
        self.engine = make_engine(
            cfg, self.split.micro_batch, self.split.accumulation, self.layout, rank_device, initialise=ckpt is None
        )
        self.device, self.dtype = self.engine.device, compute_dtype(cfg)
        # the data-parallel rank and size: tensor- and pipeline-parallel peers read the same samples
        self.loader = ShardLoader(
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
            **loader_settings(cfg.data.workers, self.device_kind, dist_env.local_world_size),
        )
        seed_rank(cfg.seed, self.layout.dp_rank)  # TP / PP peers mask their (same) samples alike
        self.metrics = JsonlSink(RunDir(run_dir).metrics, dist_env.is_main)
        dev_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.peak = peak_tflops(dev_name)
        self.params = self.engine.num_params()
        self.flop_factor = 4 if cfg.activation_checkpointing else 3  # forward + backward (+ recompute)
        self.flops_per_sample: dict[int, float] = {}  # by padded text length
        info = {
            "world_size": dist_env.world_size,
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
            "launcher": dist_env.source,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
        }
        if hasattr(self.engine, "stage"):  # DeepSpeed: the ZeRO stage it runs and how it reduces gradients
            info |= {"zero_stage_run": self.engine.stage, "grad_reduction": self.engine.reduction}
        if moved_aside:
            info["moved_aside"] = moved_aside
        if ckpt is not None:
            state = checkpoint.load(self.engine, ckpt, dist_env.rank)
            self.loader.load_state_dict(
                checkpoint.remap_loader_state(state["loader"], self.layout.dp_rank, self.layout.dp)
            )
            self.step, self.samples, self.saved_step = state["step"], state["samples"], state["step"]
            checkpoint.set_rng_state(state["rng"])
            events.emit("resume", self.step, checkpoint=ckpt.name, **info)
        else:
            events.emit("start", 0, **info)
        self._say(
            f"vltrain: {self.mcfg.name} {self.params / 1e6:.2f}M params | {dist_env.world_size} rank(s) via "
            f"{dist_env.source}{self._layout_words()} | global batch {cfg.global_batch} = {self.split.micro_batch} x "
            f"{self.split.accumulation} accum x {self.layout.dp} | "
            f"{'resuming from ' + ckpt.name if ckpt else 'starting'} at step {self.step}/{cfg.steps}"
        )
        job_env = JobEnv.from_env()
        if job_env.country:  # clusterctl sets it from the profile's site; one tracker per node (vltrain.energy)
            self.energy = NodeEnergy(
                run_dir,
                local_rank=dist_env.local_rank,
                node_rank=dist_env.node_rank,
                country=job_env.country,
                pue=job_env.pue,
                gpu_ids=visible_gpu_ids(),
                rank=dist_env.rank,
                flush_every_s=float(os.environ.get(ENERGY_FLUSH_S, "60") or 60),
            )
            self.energy.start()

    # ---------------------------------------------------------------- set-up helpers
    def _alive(self) -> None:
        """A checkpoint or an evaluation finished: not a stall, though no step did."""
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.progress()

    def _say(self, line: str) -> None:
        if self.dist.is_main:
            print(line, flush=True)

    def _tokenizer(self):
        """data.tokenizer, or one trained by rank 0 on the shards' captions into the run directory."""
        from vltrain.tokenizer import Tokenizer, train_tokenizer_from_shards

        path = Path(self.cfg.data.tokenizer or RunDir(self.run_dir).tokenizer)
        error = [None]
        if self.dist.is_main and not path.is_file():
            try:
                train_tokenizer_from_shards(self.cfg.data.shards, self.mcfg.vocab_size, path, seed=self.cfg.seed)
            except UserError as e:  # "--vocab-size: V is too large for this corpus; allowed: at most N"
                msg = str(e).replace("--vocab-size", "model.vocab_size")
                error = [msg.replace("this corpus", f"the captions of {self.cfg.data.shards}")]
        self.comm.broadcast_objects(error, src=0)
        if error[0]:
            raise UserError(error[0])
        tok = Tokenizer.load(path)
        if tok.vocab_size != self.mcfg.vocab_size:
            raise UserError(
                f"model.vocab_size: {self.mcfg.vocab_size} but the tokenizer {path} has {tok.vocab_size} "
                f"pieces; allowed: equal sizes (vltrain tokenizer train --vocab-size {self.mcfg.vocab_size})"
            )
        return tok

    # ---------------------------------------------------------------- the loop
    def run(self, stop_after: int | None) -> dict[str, Any]:
        import torch

        cfg = self.cfg
        from vltrain.engine import shorten_timeout

        interval = torch.zeros(len(self.LOSSES) + 5, dtype=torch.float64)  # loss sums, micro, tokens, flops, s, wait s
        interval_steps = interval_skipped = in_a_row = 0  # optimizer steps skipped (gradient not finite)
        batches = iter(self.loader)
        first_step = self.step
        self.watchdog = Watchdog(float(os.environ.get(STALL_TIMEOUT_S, 1800)), self.run_dir).start()
        while self.step < cfg.steps:
            self._enter_stage()
            local, lr = self.train_step(batches)
            local = self.comm.all_reduce_sum(local)  # sums over ranks: stop flags and log values, one collective
            self.step += 1
            self.watchdog.progress()
            if self.step == first_step + 1:
                shorten_timeout()
            self.samples += cfg.global_batch
            interval += local[2:-1]
            skipped = bool(local[-1] > 0)  # on any rank (DeepSpeed's overflow check agrees across ranks anyway)
            interval_steps += 1
            interval_skipped += skipped
            in_a_row = in_a_row + 1 if skipped else 0
            stop = bool(local[:2].any())
            losses = {k: float(local[2 + i] / local[2 + len(self.LOSSES)]) for i, k in enumerate(self.LOSSES)}
            diverged = non_finite_loss(self.step, losses, cfg)  # the same sums on every rank: the same verdict
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or stop or diverged:
                self._log(interval, lr)
                grad_norm = self.engine.get_global_grad_norm()
                diverged = diverged or skipped_interval(
                    self.step, interval_steps, interval_skipped, in_a_row, grad_norm, losses["loss"], cfg
                )
                if interval_skipped and not diverged:
                    self._say(
                        f"vltrain: the optimizer skipped {interval_skipped} of the last {interval_steps} steps "
                        f"(gradient not finite); {in_a_row} in a row now, at most {cfg.skip_tolerance()} tolerated"
                    )
                interval.zero_()
                interval_steps = interval_skipped = 0
            if diverged:  # before any checkpoint: the diverged state is not saved
                self._say(f"vltrain: {diverged}")
                raise TrainingDiverged(diverged)
            if self.energy is not None:
                self.energy.maybe_flush()
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.evaluate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save("periodic")
            if stop:
                self._stop(int(local[0] > 0))
            if stop_after is not None and self.step - first_step >= stop_after and self.step < cfg.steps:
                self.save("stop_after")
                return {"step": self.step, "samples": self.samples, "finished": False}
        self.save("final")
        result = self.evaluate()
        self.events.emit(
            "finish", self.step, samples=self.samples, recall_i2t_r1=result["i2t"]["R@1"] if result else None
        )
        return {"step": self.step, "samples": self.samples, "finished": True, "eval": result}

    def _enter_stage(self) -> None:
        """Set the loss weights of the stage the next step is in ([[stages]], vltrain.stages) on the model,
        which reads them at each forward. The step alone decides the stage, so a resumed run lands in
        its stage; a `stage` event and a line mark each stage entered (and the one a resume starts in)."""
        from vltrain.stages import stage_at, stage_name

        index, loss = stage_at(self.cfg, self.step + 1)
        if index == getattr(self, "_stage", None):
            return
        self._stage = index
        self.mim_ratio, self.flops_per_sample = (loss.mim_mask_ratio if loss.mim > 0 else 0.0), {}  # MFU's FLOPs
        setter = getattr(self.engine, "set_loss_config", None)  # an engine whose modules are not one VLModel
        if setter is not None:
            setter(loss)
        else:
            self.engine.module.loss_cfg = loss
        if self.cfg.stages:
            weights = {k: getattr(loss, k) for k in ("itc", "mlm", "caption", "mim", "mim_mask_ratio")}
            name = stage_name(self.cfg, index)
            self.events.emit("stage", self.step, index=index, name=name, **weights)
            self._say(
                f"vltrain: {name} ({index + 1}/{len(self.cfg.stages)}) from step {self.step + 1}: "
                + ", ".join(f"{k} {v:g}" for k, v in weights.items())
            )

    def train_step(self, batches) -> tuple[Any, float]:
        """One optimizer step (accumulation micro steps) -> (this rank's numbers to reduce, its LR).

        The numbers: 2 stop flags, a sum per LOSSES entry, micro steps, real text tokens, model FLOPs, seconds,
        seconds of those blocked waiting for the loader's batches (in next()), and whether the optimizer
        skipped the step (a gradient not finite). Losses, micro steps, tokens, FLOPs and both times come from
        the reporter ranks only (one per data-parallel replica: the last pipeline stage at tensor rank 0), so
        that their sums over ranks count every sample once.
        """
        import torch

        from vltrain.engine import LossScaleAtMinimum
        from vltrain.model_math import forward_flops_per_sample

        eng, accumulation = self.engine, self.split.accumulation
        t0 = time.perf_counter()
        m = 2 + len(self.LOSSES)  # where the micro steps are in `local`, after the flags and the loss sums
        local = torch.zeros(m + 6, dtype=torch.float64)
        skipped_before = eng.skipped_steps
        waiting = time.perf_counter()
        micro_batches = [next(batches) for _ in range(accumulation)]
        local[m + 4] = time.perf_counter() - waiting  # data wait: the step's time blocked on the loader
        for batch in micro_batches:
            mask = batch["attention_mask"]
            t = mask.shape[1]
            if t not in self.flops_per_sample:
                flops = forward_flops_per_sample(self.mcfg, text_len=t, mim_mask_ratio=getattr(self, "mim_ratio", 0.0))
                self.flops_per_sample[t] = flops * self.flop_factor
            local[m + 1] += int(mask.sum())
            local[m + 2] += self.flops_per_sample[t] * mask.shape[0]
        try:
            losses, lr = eng.train_step(micro_batches, self.LOSSES)
        except LossScaleAtMinimum:  # fp16: the loss scale cannot go lower
            raise TrainingDiverged(
                f"training diverged: fp16's loss scale reached its minimum at step {self.step + 1}, every "
                f"gradient overflowing; {_remedies(self.cfg)}"
            ) from None
        local[2:m] = losses.sum(0).double()
        local[m] = accumulation
        local[m + 3] = time.perf_counter() - t0
        if not eng.layout.reporter:
            local[2:-1] = 0
        local[0:2] = torch.tensor(self.stops.flags(), dtype=torch.float64)
        local[-1] = eng.skipped_steps - skipped_before  # 1 when the optimizer skipped this step
        return local, lr

    def _log(self, interval, lr: float) -> None:
        from vltrain.metrics import human_line, memory_gib, mfu

        world = self.dist.world_size
        p = self.cfg.parallel
        dp = world // (p.tp * p.pp)  # the reporter ranks (train_step): one per data-parallel replica
        micro, tokens, flops, seconds, wait = (float(x) for x in interval[len(self.LOSSES) :])  # summed, reporters
        steps = micro / (dp * self.split.accumulation)  # optimizer steps in the interval
        wall = seconds / dp  # mean over the reporters
        grad_norm = self.engine.get_global_grad_norm()
        rec = {
            "step": self.step,
            **{k: float(interval[i] / micro) for i, k in enumerate(self.LOSSES)},
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples_per_s": steps * self.cfg.global_batch / wall,
            "tokens_per_s": tokens / wall,
            "step_time_s": wall / steps,
            "data_wait_s": wait / dp / steps,  # of step_time_s: blocked on the loader
            "mfu": mfu(flops / steps, wall / steps, world, self.peak),
            "mem_gib": memory_gib(self.device),
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
        """Held-out retrieval and captioning on rank 0. DeepSpeed ZeRO-2 keeps full weights on every
        rank: rank 0 evaluates its module in place. Under FSDP no rank holds them: rank 0 reads the
        module state of this step's checkpoint (written first if this step has none) into a plain
        VLModel, as `vltrain eval` does; the others wait."""
        import torch

        from vltrain.evaluate import default_eval_shards, evaluate, write_eval

        shards = default_eval_shards(self.cfg)
        result = None
        fsdp = self.engine.checkpoint_format == "dcp"
        if shards and fsdp:
            self.save("eval")  # nothing when this step is saved already
        if shards and self.dist.is_main:
            with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG stream
                model = self._checkpointed_model() if fsdp else self.engine.module
                result = evaluate(model, self.cfg, self.tokenizer, shards, device=self.device, dtype=self.dtype)
            result |= {"step": self.step, "samples": self.samples, "time": time.time()}
            write_eval(self.run_dir, result)
            self._say(
                f"eval step {self.step}: i2t R@1 {result['i2t']['R@1']:.3f} R@5 {result['i2t']['R@5']:.3f} "
                f"R@10 {result['i2t']['R@10']:.3f} | t2i R@1 {result['t2i']['R@1']:.3f} R@5 {result['t2i']['R@5']:.3f} "
                f"R@10 {result['t2i']['R@10']:.3f} | CIDEr-D {result['cider']:.3f} | "
                f"{result['n']} pairs (chance R@1 {result['chance_r1']:.4f})"
            )
        self.comm.barrier()
        self._alive()
        return result

    def _checkpointed_model(self):
        """A plain VLModel on this rank's device in the training dtype, with the weights of the
        checkpoint of this step (DCP, read without the process group)."""
        from vltrain import checkpoint
        from vltrain.engine import build_model

        model = build_model(dataclasses.replace(self.cfg, activation_checkpointing=False), "meta")
        model.load_state_dict(checkpoint.module_state(checkpoint.latest(self.run_dir)), assign=True)
        return model.to(self.device, self.dtype)

    def _layout_words(self) -> str:
        p = self.cfg.parallel
        if p.strategy == "deepspeed":
            return ""
        return f" | {p.strategy} tp {p.tp} x pp {p.pp} x dp {self.layout.dp}"

    def _stop(self, preempt_signal_seen: int) -> None:
        """Checkpoint, log, then let submitit's own handler requeue (USR2) or exit (SIGTERM)."""
        import torch

        sig = preempt_signal() if preempt_signal_seen else signal.SIGTERM
        original = self.stops.original.get(sig)
        timed_out = False
        checker = getattr(getattr(original, "__self__", None), "has_timed_out", None)
        if sig != signal.SIGTERM and callable(checker):
            timed_out = bool(checker())
        kind = "timeout" if timed_out else "preempt"
        self.save(kind)
        self.events.emit(kind, self.step, signal=signal.Signals(sig).name)
        self._say(f"vltrain: {signal.Signals(sig).name} received; checkpoint at step {self.step} written ({kind})")
        if self.energy is not None:
            self.energy.stop()
            self.energy = None
        self.stops.restore()
        code, error = _CONTINUE if original == signal.SIG_IGN else 128 + sig, None
        if callable(original):
            try:
                original(sig, None)  # submitit: rank 0 calls TrainJob.checkpoint, dumps it, requeues, exits
                code = 128 + sig if sig == signal.SIGTERM else _CONTINUE
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # submitit's UncompletedJobError: not requeued (too many time-outs)
                code, error = 1, e
        code = int(self.comm.broadcast(torch.tensor([code], dtype=torch.int64), src=0))
        if code == _CONTINUE:
            self.stops.received.clear()
            self.stops.install()
            return
        if error is not None and self.dist.is_main:
            raise error
        NativeTeardown.decide(code)
        sys.exit(code)

    def close(self) -> None:
        if callable(getattr(getattr(self, "engine", None), "close", None)):
            self.engine.close()
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.stop()
        if self.energy is not None:
            self.energy.stop()
            self.energy = None
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
