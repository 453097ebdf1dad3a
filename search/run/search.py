"""A whole search, from its parent run to its champion (:func:`run_search`), and a search
whose driver died continued (:func:`plan_resume`, :func:`resume_search`).

MLflow records the search: the parent run (the space, the runtime options, ``plan.json``,
the Optuna study persisted where optuna-dashboard reads it), one child run per trial
(:class:`~difftune.search.run.trials.MLflowTrials`), the figures redrawn as trials
finish (:class:`~difftune.search.report.publish.LiveReport`). The Tuner is
:func:`~.tuner.build_tuner`'s; once its trials are done, :func:`~.finish.finish_search` ends
the search: the best trial on val, the confirm stage, the champion evaluated once on test and
registered, the Pareto front, the last figures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from difftune.search.records import optuna_store
from difftune.search.records.optuna_store import TAG_STORAGE, TAG_STUDY
from difftune.search.records.tracking import (
    TAG_RUNTIME,
    latest_search_run,
    record_skipped_images,
    space_from_run,
    start_parent_run,
)
from difftune.search.records.uris import TrackingError, redact, resolve_uri, storage_join
from difftune.search.report import ui_view
from difftune.search.report.console import ConsoleTable, SearchConsole, log_path_for
from difftune.search.report.publish import LiveReport
from difftune.search.run.cluster import ensure_ray
from difftune.search.run.finish import SearchResult, finish_search, mark
from difftune.search.run.interrupt import StopSignals, finished_trials, interrupted
from difftune.search.run.probe import first_points
from difftune.search.run.trials import MLflowTrials
from difftune.search.run.tuner import DEFAULT_STORAGE, build_tuner, restore_tuner
from difftune.search.space.spec import Space
from difftune.trainables.errors import SearchInterrupted
from difftune.trainables.trainable import RuntimeOptions

logger = logging.getLogger(__name__)


def search_name(experiment: str) -> str:
    """A search's name: its Ray Tune experiment, its Optuna study."""
    return f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_model_name(experiment: str) -> str:
    """Registered model name of a search's champion head."""
    return experiment if experiment.startswith("difftune") else f"difftune-{experiment}"


def run_search(
    space: Space,
    *,
    experiment: str,
    tracking_uri: str,
    runtime: RuntimeOptions,
    storage_path: str | None = None,
    address: str | None = None,
    model_name: str | None = None,
    artifact_location: str | None = None,
    verbose: int = 1,
    plan: dict[str, Any] | None = None,
    optuna_storage: str | None = None,
    console: SearchConsole | None = None,
) -> SearchResult:
    """Run a whole search: parent run (with ``plan.json`` and the cache policy when a plan
    is given), trials, the confirm stage, champion, figures. Returns what the CLI prints.

    :param artifact_location: where a new experiment keeps its artifacts (None:
        :func:`~difftune.search.records.uris.artifact_root`).
    :param optuna_storage: where the Optuna study is kept (default:
        :func:`~difftune.search.records.optuna_store.default_storage`).
    :param console: the terminal's :class:`~difftune.search.report.console.SearchConsole` (a
        live trial table, the rest in its log file); None leaves Ray Tune's own reporter at
        ``verbose``."""
    storage_path = storage_path or DEFAULT_STORAGE
    if "://" not in storage_path:  # s3://, gs://: Ray Tune takes the URI as it is
        storage_path = str(Path(storage_path).resolve())
    name = search_name(experiment)
    if console is not None:
        console.open_log(log_path_for(storage_path, name))
    tune_path = storage_join(storage_path, name)
    model_name = model_name or default_model_name(experiment)
    study_url = optuna_storage or optuna_store.default_storage(tracking_uri, storage_path)
    client = MlflowClient(tracking_uri)
    parent = start_parent_run(client, experiment, space_dict=space.resolved(),
                              runtime=runtime.to_dict(), tune_path=tune_path,
                              model_name=model_name, artifact_location=artifact_location)
    client.set_tag(parent, "difftune.cache_policy", runtime.cache_policy)
    if plan is not None:
        client.log_dict(parent, plan, "plan.json")
    record_skipped_images(client, parent, space.data, space.setting("bad_images"))
    client.set_tag(parent, optuna_store.TAG_STORAGE, redact(study_url))
    client.set_tag(parent, optuna_store.TAG_STUDY, name)
    links = ui_view.setup(client, tracking_uri, parent, metric=space.search["metric"],
                          mode=space.search["mode"])
    ensure_ray(address)
    report = LiveReport(tracking_uri, parent)
    callbacks: list[tune.Callback] = [MLflowTrials(tracking_uri, parent, outbox_dir=tune_path,
                                                   tags={"difftune.stage": "search"},
                                                   report=report)]
    if console is not None:
        callbacks.append(ConsoleTable(metric=space.search["metric"], mode=space.search["mode"],
                                      total=int(space.search["trials"])))
        verbose = 1 if console.verbose else 0

    def tuner() -> tune.Tuner:  # after the probe rung, when asked (its map: the first points)
        points = first_points(space, runtime, client=client, parent=parent)
        return build_tuner(space, runtime=runtime, storage_path=storage_path, name=name,
                           callbacks=callbacks, verbose=verbose,
                           study_storage=optuna_store.open_storage(study_url), points=points)

    result = _fit_and_finish(tuner, space, client=client, parent=parent, experiment=experiment,
                             tracking_uri=tracking_uri, tune_path=tune_path,
                             model_name=model_name, runtime=runtime, verbose=verbose,
                             report=report, console=console)
    return annotate(result, study_url, name, links, console)


@dataclass
class ResumePlan:
    """What ``--resume`` restores, read from the latest search run of an experiment."""

    experiment: str
    parent: str  # the search's parent run id
    status: str  # the parent run's MLflow status (FINISHED: nothing to resume)
    tune_path: str
    space: Space
    runtime: RuntimeOptions
    model_name: str
    study_storage: str | None = None  # the Optuna study's storage, as the parent run records it
    study_name: str | None = None

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @property
    def storage_path(self) -> str:
        """Ray Tune's storage (the experiment's parent; a URI keeps its query at the end)."""
        base, sep, query = self.tune_path.partition("?") if "://" in self.tune_path \
            else (self.tune_path, "", "")
        return base.rsplit("/", 1)[0] + sep + query


def plan_resume(*, experiment: str, tracking_uri: str) -> ResumePlan:
    """Read what ``--resume`` needs from the latest search of ``experiment`` (nothing is
    changed)."""
    client = MlflowClient(tracking_uri)
    run = latest_search_run(client, experiment, what="--resume")
    tags = run.data.tags
    return ResumePlan(
        experiment=experiment, parent=run.info.run_id, status=run.info.status,
        tune_path=tags.get("difftune.tune_path", ""), space=space_from_run(client, run.info.run_id),
        runtime=RuntimeOptions.from_dict(json.loads(tags.get(TAG_RUNTIME, "{}"))),
        model_name=tags.get("difftune.model_name", default_model_name(experiment)),
        study_storage=tags.get(TAG_STORAGE), study_name=tags.get(TAG_STUDY))


def resume_search(plan: ResumePlan, *, tracking_uri: str, address: str | None = None,
                  verbose: int = 1, console: SearchConsole | None = None) -> SearchResult:
    """Continue a search whose driver died: Ray Tune restores the trials and the Optuna
    searcher; finished trials are not rerun and their MLflow runs are left as they are;
    unfinished ones continue in their own run. Call it after :func:`plan_resume` and the
    checks of the stores (:func:`~.preflight.prepare_search`)."""
    if not tune.Tuner.can_restore(plan.tune_path):
        raise TrackingError(f"--resume {plan.experiment}: the search's Ray Tune state "
                            f"{redact(plan.tune_path)} is missing or not restorable (was "
                            "--storage on another machine?)")
    if console is not None:
        console.open_log(log_path_for(plan.storage_path, plan.study_name or Path(
            plan.tune_path.split("?")[0]).name, resumed=True))
    client = MlflowClient(tracking_uri)
    ensure_ray(address)
    client.update_run(plan.parent, status="RUNNING")
    logger.info("resuming %s from %s", plan.experiment, redact(plan.tune_path))
    tuner = restore_tuner(plan.tune_path, plan.space, plan.runtime)
    if console is not None and not console.verbose:
        verbose = 0
    result = _fit_and_finish(tuner, plan.space, client=client, parent=plan.parent,
                             experiment=plan.experiment, tracking_uri=tracking_uri,
                             tune_path=plan.tune_path, model_name=plan.model_name,
                             runtime=plan.runtime, verbose=verbose, console=console)
    links = ui_view.setup(client, tracking_uri, plan.parent, metric=plan.space.search["metric"],
                          mode=plan.space.search["mode"])
    return annotate(result, plan.study_storage, plan.study_name, links, console)


def _fit_and_finish(tuner: tune.Tuner | Callable[[], tune.Tuner], space: Space, *,
                    client: MlflowClient, parent: str,
                    console: SearchConsole | None = None, **finish: Any) -> SearchResult:
    """Run the trials, then :func:`~.finish.finish_search` (``finish``: its arguments).
    ``tuner``: the Tuner, or what builds it (the probe rung runs there, under the same
    signal handling as the trials).

    Stopped by Ctrl-C or SIGTERM (:mod:`.interrupt`), the search does not finish: its parent
    run is ``KILLED``, no champion is chosen, and :class:`SearchInterrupted` says how many
    trials ran and how to continue (``--resume``)."""
    signals = StopSignals()
    try:
        with console.library_stdout() if console is not None else contextlib.nullcontext(), \
                signals:
            results = (tuner() if callable(tuner) else tuner).fit()
    except KeyboardInterrupt:
        mark(client, parent, "KILLED")
        raise _interrupted(space, None, signals.received or signal.SIGINT, finish) from None
    except BaseException:
        mark(client, parent, "FAILED")
        raise
    if signals.received is not None:
        mark(client, parent, "KILLED")
        raise _interrupted(space, results, signals.received, finish)
    return finish_search(results, space, client=client, parent=parent, console=console,
                         **finish)


def _interrupted(space: Space, results: Any, signum: int, finish: dict[str, Any]
                 ) -> SearchInterrupted:
    done, started = finished_trials(results)
    total = max(int(space.search["trials"]), started)
    return interrupted(done=done, total=total, experiment=finish["experiment"],
                       tracking_uri=redact(finish["tracking_uri"]),
                       default_uri=resolve_uri(None), signum=signum)


def annotate(result: SearchResult, study_url: str | None, study_name: str | None,
             links: tuple[str, str], console: SearchConsole | None) -> SearchResult:
    """What a search's closing lines print beside its figures: the Optuna study (no trial
    left running in it), the MLflow UI's links, the log file (also put on the parent run)."""
    result.optuna_storage, result.study_name = study_url, study_name
    if study_url and study_name and "***" not in study_url:
        optuna_store.close_orphans(study_url, study_name)
    result.experiment_link, result.trials_link = links
    if console is not None and console.log_path is not None:
        result.log_path = str(console.log_path)
        console.upload(MlflowClient(result.tracking_uri), result.parent_run_id)
    return result
