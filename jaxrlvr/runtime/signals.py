"""Stop signals of a run: SIGTERM (TPU preemption, `scancel`) and SIGINT (Ctrl-C).

`StopSignals` is installed around the training loop; `attempt(fn, ...)` runs work that a
signal may cut short because it is redone on resume (rollouts, evaluation) and returns
None when it was.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

from jaxrlvr.runtime import distributed

T = TypeVar("T")
log = logging.getLogger("jaxrlvr.train")  # the trainer's log: its stop lines belong there


class StopSignals:
    """SIGTERM / SIGINT handling: the first signal asks the run to stop after the current
    step (at once while only rollouts or evaluation are under way, which are redone on
    resume); a second one stops at once, without a checkpoint.

    With several processes nothing is cut short (the processes would leave their
    collectives at different points): every process finishes the step, and at each step's
    end they agree whether any of them was signalled (`should_stop`), so all stop at the
    same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._abandonable = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:  # every process: each saves its shards
            with contextlib.suppress(ValueError):  # not the main thread: leave as is
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise KeyboardInterrupt(f"second stop signal ({name})")
        self.received = signum
        log.warning("%s received: stopping after the current step, with a checkpoint", name)
        if self._abandonable:
            raise Abandoned

    def should_stop(self) -> bool:
        """Whether this process (or, with several, any process) was signalled."""
        if jax.process_count() == 1:
            return self.received is not None
        every = distributed.gather(np.asarray([self.received or 0]), jax.process_count())
        self.received = self.received or next((int(f) for f in every if f), None)
        return self.received is not None

    def attempt(self, fn: Callable[..., T], *args: Any) -> T | None:
        """`fn(*args)`, or None when a stop signal cut it short (nothing of it is kept;
        with several processes nothing is cut short)."""
        try:
            with self.abandonable():
                return fn(*args)
        except Abandoned:
            return None

    @contextlib.contextmanager
    def abandonable(self):
        """A stretch of work a stop signal may cut short by raising `Abandoned`."""
        self._abandonable = jax.process_count() == 1
        try:
            if self.received is not None and self._abandonable:
                raise Abandoned
            yield
        finally:
            self._abandonable = False


class Abandoned(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the signal handler inside `StopSignals.abandonable`."""
