"""Putting a search's report on its parent run: the figures under ``figures/`` and the
markdown description (:func:`publish`), again and again while the search runs
(:class:`LiveReport`, driven by the driver's MLflow callback as trials finish, drawing in a
process of its own).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time

from mlflow.tracking import MlflowClient

from difftune.search.records.uris import TRACKING_URI_ENV, public_uri, runtime_uri
from difftune.search.report.description import NOTE_TAG, note
from difftune.search.report.draw import write_figures
from difftune.search.report.gather import gather

logger = logging.getLogger(__name__)

#: least seconds between two redraws while a search runs (``DIFFTUNE_FIGURES_S``)
DEFAULT_MIN_S = 60.0
#: a redraw waits at least this many times as long as the last one took
SLOWDOWN = 10.0
#: one drawing at a time in a process (a redraw in flight and the final one, pyplot)
_LOCK = threading.Lock()
#: the live reports of this process with a redraw in flight
_DRAWING: set[LiveReport] = set()


def publish(client: MlflowClient, parent_run_id: str) -> list[str]:
    """Draw the figures of a search onto its parent run and write its description.
    Returns the names of the figures drawn."""
    with _LOCK:
        data = gather(client, parent_run_id)
        names = write_figures(data, client=client)
        client.set_tag(parent_run_id, NOTE_TAG, note(data, names))
    return names


class LiveReport:
    """Redraws a running search's figures and description in a separate, low-priority
    process (``python -m difftune.search.report.publish``), so that the driver's loop never waits
    for them: after ``min_trials`` finished trials, then at most every ``min_s`` seconds and
    never more often than :data:`SLOWDOWN` times the last redraw took (a long search is not
    slowed by its figures).
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, *, min_s: float | None = None,
                 min_trials: int = 2):
        # pickled with Tune's callbacks: no password (runtime_uri puts it back at run time)
        self.tracking_uri, self.parent_run_id = public_uri(tracking_uri), parent_run_id
        self.min_s = float(os.environ.get("DIFFTUNE_FIGURES_S", DEFAULT_MIN_S)) \
            if min_s is None else min_s
        self.min_trials = min_trials
        self.redraws = 0
        self._next = 0.0
        self._proc: subprocess.Popen | None = None
        self._err = None
        self._started = 0.0
        self._warned = False

    def __getstate__(self) -> dict:  # pickled with Tune's callbacks: no process, no clock
        return {**self.__dict__, "_proc": None, "_err": None, "_next": 0.0}

    def _reap(self) -> bool:
        """True while a redraw runs; else account for the one that ended."""
        if self._proc is None:
            return False
        rc = self._proc.poll()
        if rc is None:
            return True
        took = time.monotonic() - self._started
        self._next = max(self._next, time.monotonic() + SLOWDOWN * took)
        err = ""
        if self._err is not None:
            self._err.seek(0)
            err = self._err.read()
            self._err.close()
        self._proc = self._err = None
        _DRAWING.discard(self)
        if rc == 0:
            self.redraws += 1
            logger.debug("figures redrawn in %.1f s", took)
        elif not self._warned:
            self._warned = True
            last = (err or "").strip().splitlines()[-1:] or [f"exit code {rc}"]
            logger.warning("could not redraw the search's figures (%s); the search goes on",
                           last[0][:200])
        return False

    def poke(self, finished: int) -> bool:
        """A trial finished (``finished`` so far): redraw if it is time. Returns whether a
        redraw started."""
        now = time.monotonic()
        if self._reap() or finished < self.min_trials or now < self._next:
            return False
        self._next = now + self.min_s
        self._started = now
        self._err = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "difftune.search.report.publish", self.tracking_uri,
             self.parent_run_id], stdout=subprocess.DEVNULL, stderr=self._err, text=True,
            preexec_fn=_lower_priority if os.name == "posix" else None,
            # the URI with its password goes through the environment, never the command line
            env={**os.environ, "MPLBACKEND": "Agg",
                 TRACKING_URI_ENV: runtime_uri(self.tracking_uri)})
        _DRAWING.add(self)
        return True

    def stop(self, timeout: float = 300.0) -> None:
        """Wait for a redraw in progress (before the final one)."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._reap()


def final_publish(client: MlflowClient, parent_run_id: str,
                  report: LiveReport | None = None) -> list[str]:
    """The figures and description of a search that is over, drawn once more (after any
    redraw in flight, which must not overwrite them); the search's results stand without
    them when they fail (`difftune report --update-run` draws them later)."""
    if report is not None:
        report.stop()
    wait_for_redraws()  # a resumed search's callbacks have their own
    try:
        return publish(client, parent_run_id)
    except Exception as exc:
        logger.warning("the search's figures could not be drawn (%s); `difftune report "
                       "--update-run` draws them later", str(exc).splitlines()[0][:200])
        logger.debug("final figures failed", exc_info=True)
        return []


def wait_for_redraws(timeout: float = 300.0) -> None:
    """Wait for every redraw in flight in this process (before the final drawing, which
    must not be overwritten by an older one), e.g. those of a resumed search's callbacks."""
    for report in list(_DRAWING):
        report.stop(timeout)


def _lower_priority() -> None:
    os.nice(10)


def main(argv: list[str] | None = None) -> int:
    """``python -m difftune.search.report.publish TRACKING_URI PARENT_RUN_ID``: one redraw."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m difftune.search.report.publish TRACKING_URI PARENT_RUN_ID",
              file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.WARNING)
    publish(MlflowClient(runtime_uri(args[0])), args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
