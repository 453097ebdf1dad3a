"""Where a search's Optuna study is kept, so that ``optuna-dashboard`` can show it and
``--resume`` continues it.

The study lives in the driver (OptunaSearch asks and tells from there); its storage is

- ``--optuna-storage URL`` (or ``$DIFFTUNE_OPTUNA_STORAGE``): a SQLAlchemy URL
  (``sqlite:///...``, ``postgresql://...``: a database of its own, e.g. beside the tracking
  server's on the same PostgreSQL server) or the path of a journal file on shared storage;
- else ``optuna.db`` beside a sqlite tracking store (``sqlite:///.../optuna.db``);
- else (a tracking server) ``optuna.journal`` in Ray Tune's storage folder, which a cluster
  shares; with an ``s3://`` storage, ``optuna.db`` in the working directory.

One study per search, named like the search's Ray Tune experiment, its objectives named by
their metrics (:func:`name_objectives`); the parent run records the storage in the tag
``difftune.optuna_storage`` and the name in ``difftune.optuna_study``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import optuna

from difftune.search.records.uris import redact
from difftune.trainables.errors import UserError

logger = logging.getLogger(__name__)

ENV = "DIFFTUNE_OPTUNA_STORAGE"
TAG_STORAGE = "difftune.optuna_storage"
TAG_STUDY = "difftune.optuna_study"
SQLITE_NAME = "optuna.db"
JOURNAL_NAME = "optuna.journal"


class OptunaStorageError(UserError):
    """``--optuna-storage`` cannot hold a study."""


def default_storage(tracking_uri: str, storage_path: str | None) -> str:
    """The study's storage when ``--optuna-storage`` is not given (module docstring)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        return f"sqlite:///{db.parent / SQLITE_NAME}"
    if storage_path and "://" not in storage_path:
        return str(Path(storage_path).resolve() / JOURNAL_NAME)
    return f"sqlite:///{Path(SQLITE_NAME).resolve()}"


def is_journal(url: str) -> bool:
    """A journal file path (anything that is not a URL)."""
    return "://" not in url


def check_storage(url: str) -> None:
    """One clear error, before anything is written, when ``url`` cannot hold a study."""
    if is_journal(url):
        folder = Path(url).resolve().parent
        if not folder.is_dir() and not _creatable(folder):
            raise OptunaStorageError(f"--optuna-storage {url}: folder {folder} does not exist")
        return
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).resolve().parent
        if not folder.is_dir():
            raise OptunaStorageError(f"--optuna-storage {url}: folder {folder} does not exist")
        return
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        raise OptunaStorageError(
            f"--optuna-storage {redact(url)} cannot be opened ({str(exc).splitlines()[0][:200]});"
            " allowed: a SQLAlchemy URL (sqlite:///PATH, postgresql://...) or a journal file "
            "path") from None


def _creatable(folder: Path) -> bool:
    """The folder is missing but would be made (Ray Tune makes its storage folder)."""
    parent = folder
    while not parent.exists():
        parent = parent.parent
    return os.access(parent, os.W_OK)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage at ``url`` (a journal file path or a SQLAlchemy URL)."""
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(url).resolve().parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(Path(url).resolve())))
    return optuna.storages.RDBStorage(url)


def name_objectives(storage: optuna.storages.BaseStorage, study_name: str,
                    objectives: list[dict[str, str]]) -> optuna.Study:
    """Create (or load) the study ``study_name`` with one direction per objective and name
    its objectives by their metrics (``study.set_metric_names``), so optuna-dashboard shows
    ``val_top1`` instead of "Objective 0". Call it before OptunaSearch sets up the study: it
    loads this one (``load_if_exists``).

    :param objectives: ``[{metric, mode}, ...]`` (``Space.objectives()``).
    """
    directions = ["minimize" if o["mode"] == "min" else "maximize" for o in objectives]
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                load_if_exists=True)
    names = [o["metric"] for o in objectives]
    if study.metric_names != names:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    return study


def dashboard_command(url: str) -> str:
    """The one command that opens the study in optuna-dashboard."""
    return f"optuna-dashboard {redact(url)}"


def close_orphans(url: str, study_name: str) -> int:
    """Mark FAIL the trials of a finished search that the study still holds as RUNNING (a
    driver that died between asking and telling leaves them so). Returns how many."""
    from optuna.trial import TrialState

    storage = open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    n = 0
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        n += 1
    if n:
        logger.info("study %s: %d trial(s) left running by a dead driver marked FAIL",
                    study_name, n)
    return n
