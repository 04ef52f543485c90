"""Stop requests during training: SIGTERM (a scheduler preempting the job) or a first Ctrl+C ends the run at the end of
its current step, with a checkpoint of that step (`train_dit.train`); a second Ctrl+C interrupts at once."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class StopRequest:
    """True once a stop was asked for; which signal asked in `signum`, its name in `reason`."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.reason is not None


class TrainingStopped(KeyboardInterrupt):
    """A run ended early on a stop request, its last step checkpointed: the same command resumes it. `signum`: the
    signal that asked (a CLI exits with 128 + it, as the signal's default would)."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum if signum is not None else signal.SIGINT


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT set the yielded request instead of killing the process (a second SIGINT raises
    KeyboardInterrupt); the handlers are restored on exit. Outside the main thread nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame) -> None:
        if request and signum == signal.SIGINT:  # asked twice: now
            raise KeyboardInterrupt
        request.reason, request.signum = signal.Signals(signum).name, signum

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
