"""Ctrl-C (SIGINT) and SIGTERM (``ray job stop``) during a search's trials.

Ray Tune takes the first SIGINT as the end of the experiment and returns as if the search had
finished; a search must not: :class:`StopSignals` turns the first SIGINT or SIGTERM into Ray
Tune's own graceful stop (the trials in flight stopped, the experiment's state saved for
``--resume``) and remembers it, so that the search ends *interrupted* (:func:`interrupted`:
the parent run ``KILLED``, no champion, exit code 128 + signal) instead of finishing on the
trials that happened to be done. A second signal ends the driver at once.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType, TracebackType
from typing import Any

from difftune.trainables.errors import SearchInterrupted

logger = logging.getLogger(__name__)

#: the signals that stop a search
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered (around ``Tuner.fit()``, in the main thread): the first SIGINT/SIGTERM
    asks Ray Tune to stop gracefully (through its SIGUSR1 handler, which ``fit`` installs),
    a second raises :class:`KeyboardInterrupt` at once. :attr:`received` is the first signal
    (None: none came)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._env: str | None = None

    def __enter__(self) -> StopSignals:
        # Ray Tune's own SIGINT handler would take the signal as a normal end of the search
        self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second signal: end now
            raise KeyboardInterrupt
        self.received = signum
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if not callable(tune_stop):  # Ray Tune's loop is not running (yet): end now
            raise KeyboardInterrupt
        logger.warning("%s: stopping the trials in flight and saving the search's state "
                       "(again to end at once)", signal.Signals(signum).name)
        tune_stop(signum, frame)


def exit_code(signum: int | None) -> int:
    """The shell's code for a process ended by ``signum`` (130 for SIGINT)."""
    return 128 + int(signum or signal.SIGINT)


def finished_trials(results: Any) -> tuple[int, int]:
    """``(trials that ran to their end, trials started)`` of a Ray Tune ResultGrid."""
    trials = list(getattr(getattr(results, "_experiment_analysis", None), "trials", []) or [])
    done = sum(1 for t in trials if getattr(t, "status", "") == "TERMINATED")
    return done, len(trials)


def interrupted(*, done: int, total: int, experiment: str, tracking_uri: str,
                default_uri: str | None, signum: int | None) -> SearchInterrupted:
    """The one line an interrupted search ends with: how many of how many trials ran, and
    the command that continues it."""
    where = "" if tracking_uri == default_uri else f" --tracking-uri {tracking_uri}"
    return SearchInterrupted(
        f"interrupted ({signal.Signals(signum or signal.SIGINT).name}) after {done} of "
        f"{total} trials; the search's state is saved, continue it with: difftune search "
        f"--resume {experiment}{where}", exit_code=exit_code(signum))
