"""What ``difftune search`` shows on the terminal, and the log file that keeps the rest.

- :class:`SearchConsole`: while a search runs, difftune's own INFO lines and every library's
  errors (first line) reach the terminal, each distinct message once; everything (Ray Tune's
  warnings, Optuna's and MLflow's INFO lines, Python warnings) goes to the search's log file.
  ``-v`` keeps the libraries' own console output as it is.
- :class:`ConsoleTable`: a Ray Tune callback printing one line per finished or failed trial
  (``failed``, with its one-line reason, for a trial that raised or ended itself with a
  failure report),
  a short table of the running trials every ``DIFFTUNE_TABLE_S`` seconds (default 60), and
  the progress lines of long feature extractions that trials post to a small Ray actor
  (:data:`~difftune.trainables.progress.PROGRESS_BOARD`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow  # noqa: F401  (configures its loggers on import: before SearchConsole reroutes)
import optuna  # noqa: F401  (idem)
import ray
from ray import tune

from difftune.trainables.params import decode
from difftune.trainables.progress import PROGRESS_BOARD
from difftune.trainables.trainable import FAILURE_KEY

logger = logging.getLogger(__name__)
#: the logger of the live table and trial lines (printed without a prefix)
out = logging.getLogger("difftune.progress")

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: loggers whose records always reach the console at INFO
OWN = ("difftune",)


class _ConsoleFilter(logging.Filter):
    """difftune INFO+; other libraries' ERROR+, each distinct message once."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(OWN):
            return True
        if record.levelno < logging.ERROR:
            return False
        key = (record.name, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class _ConsoleFormatter(logging.Formatter):
    """The table's lines as they are; a library's record as its first line, pointing at the
    log file for the rest (its traceback)."""

    def __init__(self, brief: bool):
        super().__init__(FORMAT, datefmt="%H:%M:%S")
        self.brief = brief
        self.log_hint = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == out.name:
            return f"{self.formatTime(record, self.datefmt)}  {record.getMessage()}"
        if self.brief and (record.exc_info or not record.name.startswith(OWN)):
            lines = record.getMessage().strip().splitlines() or [""]
            head = f"{self.formatTime(record, self.datefmt)} {record.levelname} {record.name}: "
            return f"{head}{lines[0][:300]}{self.log_hint}"
        return super().format(record)


class _Buffer(logging.Handler):
    """Keeps records until the log file is known (checks run before anything is written)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10000:
            self.records.append(record)


def log_path_for(storage_path: str, name: str, *, resumed: bool = False) -> Path:
    """The driver's log file of search ``name``: beside Ray Tune's state in a local storage
    folder, else in the temporary folder (it is also put on the parent run at the end)."""
    file = f"driver-resumed-{time.strftime('%Y%m%d-%H%M%S')}.log" if resumed else "driver.log"
    if "://" not in storage_path:
        return Path(storage_path) / name / file
    return Path(tempfile.gettempdir()) / "difftune" / name / file


class _LogWriter(io.TextIOBase):
    """A text stream whose lines become INFO records of ``log``."""

    def __init__(self, log: logging.Logger):
        self.log, self.buf = log, ""

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if line.strip():
                self.log.info("%s", line)
        return len(text)


class SearchConsole:
    """Console and log file of one search (a context manager; restores logging on exit).

    :param verbose: leave every library's console output as it is (``-v``).
    """

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.log_path: Path | None = None
        self._saved: list[tuple[logging.Logger, list, bool]] = []
        self._root: tuple[list, int] | None = None
        self._buffer = _Buffer()
        self._file: logging.Handler | None = None
        self._console: logging.Handler | None = None
        self._formatter: _ConsoleFormatter | None = None

    def __enter__(self) -> SearchConsole:
        root = logging.getLogger()
        self._root = (list(root.handlers), root.level)
        self._console = logging.StreamHandler(sys.stderr)
        self._formatter = _ConsoleFormatter(brief=not self.verbose)
        self._console.setFormatter(self._formatter)
        root.handlers = [self._console, self._buffer]
        if not self.verbose:
            self._console.addFilter(_ConsoleFilter())
            self._reroute()
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        logging.captureWarnings(True)
        return self

    def _reroute(self) -> None:
        """Libraries that print through handlers of their own (Ray, MLflow, Optuna, ...) send
        their records to the root logger instead, while the search runs."""
        loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                   if not n.startswith(OWN)]
        for lg in loggers:
            if isinstance(lg, logging.Logger) and (lg.handlers or not lg.propagate):
                streams = [h for h in lg.handlers if type(h) is not logging.NullHandler
                           and not isinstance(h, logging.FileHandler)]
                if streams or not lg.propagate:
                    self._saved.append((lg, list(lg.handlers), lg.propagate))
                    lg.handlers = [h for h in lg.handlers if h not in streams]
                    lg.propagate = True

    def open_log(self, path: str | os.PathLike) -> Path:
        """Start writing the log file (with what was logged before it was opened)."""
        self.log_path = Path(path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = logging.FileHandler(self.log_path, encoding="utf-8")
        self._file.setFormatter(logging.Formatter(FORMAT))
        for record in self._buffer.records:
            self._file.handle(record)
        root = logging.getLogger()
        root.handlers = [h for h in root.handlers if h is not self._buffer] + [self._file]
        self._formatter.log_hint = f" (more in {self.log_path})"
        return self.log_path

    def upload(self, client: Any, parent_run_id: str) -> None:
        """Put the log file on the search's parent run (``logs/``)."""
        if self.log_path is None:
            return
        try:
            client.log_artifact(parent_run_id, str(self.log_path), "logs")
        except Exception as exc:  # the log stays where it is
            logger.warning("the driver's log was not put on the parent run: %s",
                           str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)

    def library_stdout(self) -> contextlib.AbstractContextManager:
        """While Ray Tune runs: what it prints (its experiment header, a TensorBoard hint) goes
        to the log file, unless ``-v``."""
        if self.verbose:
            return contextlib.nullcontext()
        # a logger of its own (not under "ray", whose level Ray sets): INFO reaches the file
        return contextlib.redirect_stdout(_LogWriter(logging.getLogger("stdout")))

    def __exit__(self, *exc: Any) -> None:
        logging.captureWarnings(False)
        for lg, handlers, propagate in self._saved:
            lg.handlers, lg.propagate = handlers, propagate
        if self._root is not None:
            logging.getLogger().handlers, level = self._root
            logging.getLogger().setLevel(level)
        if self._file is not None:
            self._file.close()


# ---- the live table -------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class _Board:
    """Progress lines trials post; the driver drains them."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def post(self, trial_id: str, line: str) -> None:
        self.lines.append((trial_id, line))

    def drain(self) -> list[tuple[str, str]]:
        lines, self.lines = self.lines, []
        return lines


def _first_line(text: Any) -> str:
    lines = [x.strip() for x in str(text or "").strip().splitlines() if x.strip()]
    return lines[0][:300] if lines else ""


def _error_line(trial) -> str:
    """The last line of a trial's error (its exception: ``ValueError: ...``), or ''."""
    try:  # Ray Tune writes it on the driver's disk first (then syncs it to the storage)
        path = trial.error_file
        text = Path(path).read_text() if path and Path(path).is_file() else trial.get_error()
    except Exception:  # the error file is a nicety here; the run records the error
        return ""
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def _how_far(last: dict) -> str:
    """``after 4 epochs``, or with rungs over images ``at rung 2 (539 images)``: where a
    trial stopped."""
    if "image_rung" in last:
        return f"at rung {int(last['image_rung']) + 1} ({int(last.get('rung_images') or 0)} images)"
    epochs = last.get("epoch", "?")
    return f"after {epochs} epoch{'' if epochs == 1 else 's'}"


def _label(trial) -> str:
    from difftune.search.report.gather import trial_label

    return trial_label(decode(trial.config))


class ConsoleTable(tune.Callback):
    """One line per finished trial, the running trials every ``every_s`` seconds, and the
    trials' extraction progress (see the module docstring)."""

    def __init__(self, *, metric: str, mode: str, total: int, every_s: float | None = None):
        self.metric, self.mode, self.total = metric, mode, total
        self.every_s = float(os.environ.get("DIFFTUNE_TABLE_S", "60")) if every_s is None \
            else every_s
        self._next_table = 0.0
        self._next_drain = 0.0
        self._board = None
        self._best: tuple[float, str] | None = None
        self._done = 0
        self._failed = 0

    def __getstate__(self) -> dict:  # pickled into Tune's state: no actor handle
        return {**self.__dict__, "_board": None}

    def setup(self, **info: Any) -> None:
        try:
            self._board = _Board.options(name=PROGRESS_BOARD, get_if_exists=True).remote()
        except Exception:  # progress lines are a nicety
            logger.debug("no progress board", exc_info=True)
        self._next_table = time.monotonic() + self.every_s

    def _score(self, trial) -> float | None:
        v = (trial.last_result or {}).get(self.metric)
        return float(v) if isinstance(v, (int, float)) else None

    def _position(self) -> str:
        return f"{self._done + self._failed:>{len(str(self.total))}}/{self.total}"

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = trial.last_result or {}
        label = _label(trial)
        if last.get(FAILURE_KEY):  # it ended itself with a failure report (not retried)
            self._failed += 1
            out.info("failed %s  %-28s %s: %s", self._position(), label, last[FAILURE_KEY],
                     _first_line(last.get("error")) or "(its run records the error)")
            return
        self._done += 1
        score = self._score(trial)
        rung = int(last.get("image_rung") or 0)
        better = self._best is None or (score is not None and (
            rung > self._best[2] or rung == self._best[2] and (
                score > self._best[0] if self.mode == "max" else score < self._best[0])))
        if score is not None and better:
            self._best = (score, label, rung)
        shown = f"{score:.2f}" if score is not None else "-"
        best = f"   best {self._best[0]:.2f}" if self._best else ""
        out.info("done %s  %-28s %s %s %s%s", self._position(), label, self.metric, shown,
                 _how_far(last), best)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._failed += 1
        out.info("failed %s  %-28s %s (its run records the error)", self._position(),
                 _label(trial), _error_line(trial) or "an error")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now >= self._next_drain:
            self._next_drain = now + 2.0
            self._drain(trials)
        if now >= self._next_table:
            self._next_table = now + self.every_s
            self._table(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._drain(trials)

    def _drain(self, trials: list) -> None:
        if self._board is None:
            return
        try:
            lines = ray.get(self._board.drain.remote(), timeout=5)
        except Exception:
            return
        labels = {t.trial_id: _label(t) for t in trials}
        for trial_id, line in lines:
            out.info("%s: %s", labels.get(trial_id, trial_id), line)

    def _table(self, trials: list) -> None:
        running = [t for t in trials if t.status == "RUNNING"]
        pending = sum(t.status == "PENDING" for t in trials)
        best = f"; best {self.metric} {self._best[0]:.2f} ({self._best[1]})" if self._best else ""
        out.info("%d of %d done, %d running, %d pending, %d failed%s", self._done, self.total,
                 len(running), pending, self._failed, best)
        for t in running:
            r = t.last_result or {}
            score = self._score(t)
            at = f"rung {int(r['image_rung']) + 1} " if "image_rung" in r else ""
            out.info("  running %-14s %-28s %s", t.trial_id, _label(t),
                     f"{at}epoch {r.get('epoch')}: {self.metric} {score:.2f}"
                     if score is not None else "preparing its features")
