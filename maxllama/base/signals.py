"""Process signals and exit codes. Preemption: SIGTERM or SIGINT asks the loop to save the current step and exit, instead of dying.

The handler only records the request; the loop notices it between steps, saves within the grace period and
raises `Preempted`, whose exit code (75, "try again later") tells a scheduler the job should be requeued.
A second signal while saving falls through to the default behaviour, so a stuck save can still be killed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: requeue me
SAVE_FAILED_EXIT_CODE = 74  # sysexits' EX_IOERR


class TrainingStopped(RuntimeError):
    """The run stopped before train.steps for a reason the message explains; `exit_code` says which."""

    exit_code = 1
    kind = "stopped"  # how the command line introduces the message


class Preempted(TrainingStopped):
    exit_code = PREEMPTED_EXIT_CODE


class NonFiniteStop(TrainingStopped):
    exit_code = 3


class SaveFailed(TrainingStopped):
    """A checkpoint or the metrics could not be written (disk full, permission, I/O error). Everything saved
    before is intact; the message names the path and the cause."""

    exit_code = SAVE_FAILED_EXIT_CODE
    kind = "error"


class PreemptionRequest:
    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


@contextlib.contextmanager
def preemption_signals(on_signal: Callable[[int], None] | None = None) -> Iterator[PreemptionRequest]:
    """Record the first SIGTERM/SIGINT in the yielded request (and pass it to `on_signal`, for a caller that must
    act at once rather than between steps)."""
    request = PreemptionRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signals can only be handled on the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(signum, frame):
        request.signal = signum
        for sig, handler in previous.items():  # a second signal acts as if we had never intervened
            signal.signal(sig, handler)
        if on_signal is not None:
            on_signal(signum)

    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
