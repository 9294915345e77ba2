"""Stop requests from outside: SIGTERM (Cloud TPU maintenance, spot VMs, SLURM and Kubernetes before a
kill) and SIGINT (Ctrl-C) ask the training loop to finish its step, save and exit cleanly.

Before the loop runs (data preparation, restore, compilation: nothing is being saved) a signal ends the
run at once by raising `StoppedBeforeTraining`. Once `training()` is entered, the handler only records
the request; the loop polls `requested` between steps, so a signal never interrupts a step or a
checkpoint write halfway. A second signal while the stop checkpoint is being written is logged and
otherwise ignored: the save completes (kill -9 still ends the process, and then the previous checkpoint
stays the latest complete one).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("imagen_jax")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBeforeTraining(BaseException):  # noqa: N818 - not an error: the requested way out
    """A stop signal arrived before the training loop started; there is nothing new to save.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set `requested` (the signal's name) instead of killing.

    Outside the main thread (where Python cannot install handlers) it is inert and `requested` stays None.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._in_loop = False
        self._previous: dict[int, Any] = {}

    def training(self) -> None:
        """From here on a signal only requests a stop, which the loop honours after its current step."""
        self._in_loop = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            if not self._in_loop:
                raise StoppedBeforeTraining(name)
            log.warning("%s received: finishing the current step, then saving a checkpoint and exiting", name)
        else:
            log.warning(
                "%s received again: the stop checkpoint is still being written and will finish (kill -9 "
                "would abort it, leaving the previous checkpoint as the latest)",
                name,
            )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
