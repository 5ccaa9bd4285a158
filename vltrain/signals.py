"""The signals that stop an attempt (submitit's preemption / time-out signal, SIGTERM): recorded when they
arrive and acted on by the loop at the next optimizer-step boundary (vltrain.loop's module doc)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


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


CONTINUE = -1000  # "keep training" in the stop decision that rank 0 broadcasts


def has_timed_out(handler: Any) -> bool:
    """Whether the handler that was installed before ours (submitit's, a bound method of its handler
    object) says the job reached its time limit rather than being preempted."""
    checker = getattr(getattr(handler, "__self__", None), "has_timed_out", None)
    return bool(checker()) if callable(checker) else False


def run_original_handler(original: Any, sig: int) -> tuple[int, BaseException | None]:
    """Run the handler that was installed before ours -> (the exit code, or CONTINUE; an error for rank 0 to
    raise). submitit's: rank 0 calls TrainJob.checkpoint, dumps it, requeues and exits (SystemExit);
    its UncompletedJobError (too many time-outs: not requeued) is the error."""
    code, error = CONTINUE if original == signal.SIG_IGN else 128 + sig, None
    if callable(original):
        try:
            original(sig, None)
            code = 128 + sig if sig == signal.SIGTERM else CONTINUE
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:
            code, error = 1, e
    return code, error
