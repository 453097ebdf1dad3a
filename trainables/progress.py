"""Progress lines of long work inside a trial (a feature extraction), for whoever shows them:
``difftune search`` prints them on the driver's console (the trial posts them to a Ray actor
named :data:`PROGRESS_BOARD`, see :mod:`difftune.trainables.trainable`).

A line says what runs, how far it is, how fast (images/s) and how long is left; one comes
every ``every_s`` seconds, and a closing one when the work ends if it said more than one
line before (or ``every_s`` is 0): work of a few seconds says nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: name of the Ray actor a search's driver reads progress lines from
PROGRESS_BOARD = "difftune-progress"
#: seconds between progress lines of one piece of work (0: every step, for tests)
DEFAULT_EVERY_S = 10.0


def _duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class Progress:
    """Progress of ``total`` images of work called ``what``; lines go to ``sink``.

    :param sink: takes one line; None logs at INFO only.
    :param every_s: seconds between lines (0: every step, and always a closing line).
    """

    def __init__(self, what: str, total: int, sink: Callable[[str], None] | None = None,
                 every_s: float = DEFAULT_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.sink, self.every_s = what, total, sink, every_s
        self.clock = clock
        self.start = self.last = clock()
        self.done_n = 0
        self.lines = 0

    def _emit(self, line: str) -> None:
        self.lines += 1
        logger.info("%s", line)
        if self.sink is not None:
            try:
                self.sink(line)
            except Exception:  # a progress line is never worth failing a trial
                logger.debug("progress sink failed", exc_info=True)

    @property
    def rate(self) -> float:
        """Images per second so far."""
        return self.done_n / max(self.clock() - self.start, 1e-9)

    def update(self, n: int) -> None:
        """``n`` more images done."""
        self.done_n += n
        now = self.clock()
        if now - self.last >= self.every_s and self.done_n < self.total:
            self.last = now
            left = (self.total - self.done_n) / max(self.rate, 1e-9)
            self._emit(f"{self.what}: {self.done_n:,}/{self.total:,} images, "
                       f"{self.rate:,.0f} img/s, {_duration(left)} left")

    def close(self) -> None:
        """The work ended: a closing line if it said more than one line before."""
        took = self.clock() - self.start
        if self.lines > 1 or self.every_s <= 0:
            self._emit(f"{self.what}: {self.done_n:,} images in {_duration(took)}, "
                       f"{self.rate:,.0f} img/s")
