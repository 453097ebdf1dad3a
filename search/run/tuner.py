"""Building and running the Ray Tune search: OptunaSearch (seeded multivariate TPE) chooses
trials, ASHA stops poor ones early, MLflow records them (the parent run, the Optuna study
persisted where optuna-dashboard reads it, the figures redrawn as trials finish); then
:mod:`.finish` ends the search: the best trial by :mod:`.best`'s rule on val, evaluated once on
the test split and registered, the confirm stage, the Pareto front, the last figures.

With ``search.objectives`` OptunaSearch runs Optuna's multi-objective TPE (a metric and a
mode per objective) while ASHA, which takes one metric, stops trials by the first objective.
With a ``grid:`` every trial trains the grid's heads and reports its best one
(:mod:`difftune.trainables.train.grid`). A trial that fails in a way a retry would repeat
(``diverged``, ``config``, ``data``: see :mod:`difftune.trainables.trainable`) ends at once;
a data error stops the whole search (:class:`StopOnDataError`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from difftune.search.records.optuna_store import TAG_STORAGE, TAG_STUDY
from difftune.search.records.tracking import (
    TAG_RUNTIME,
    latest_search_run,
    record_skipped_images,
    space_from_run,
    start_parent_run,
)
from difftune.search.records.trials import MLflowTrials
from difftune.search.records.uris import TrackingError, redact, storage_join
from difftune.search.run.cluster import cluster_gpus, trial_resources
from difftune.search.run.finish import SearchResult, finish_search, mark
from difftune.search.space.distributions import startup_trials
from difftune.search.space.spec import Space
from difftune.trainables.trainable import FAILURE_KEY, RuntimeOptions, train_trial

if TYPE_CHECKING:
    from difftune.search.report.console import SearchConsole

logger = logging.getLogger(__name__)

DEFAULT_STORAGE = "difftune_runs"


class StopOnDataError(tune.Stopper):
    """Stops the whole search at the first trial that reports a data error (an image that
    cannot be decoded fails every trial that reads it)."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get(FAILURE_KEY) == "data":
            self.seen = True
        return bool(result.get(FAILURE_KEY))

    def stop_all(self) -> bool:
        return self.seen


def sampler_for(space: Space) -> optuna.samplers.TPESampler:
    """Seeded multivariate TPE with group decomposition (the dimensions of each head kind
    are modelled together; a head's trials never carry dimensions it does not read), after
    :func:`~.space_optuna.startup_trials` startup trials (the enqueued points count), with
    the constant liar: a search runs ``max_concurrent`` trials at once, and the liar counts
    the running ones as bad so that TPE does not propose the same region again before they
    report. Spelled out rather than left to Optuna's default: with 8 trials in flight it is
    what keeps TPE ahead of random search (demo grid, 20 trials, 400 seeds: regret 1.57
    with it, 1.74 without, random 1.70; benchmarks/optuna_vs_random.py's replay)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=int(space.search["seed"]), multivariate=True, group=True,
            constant_liar=True,
            n_startup_trials=startup_trials(int(space.search["trials"])))


def max_epochs(space: Space) -> int:
    return space.max_epochs()


def build_tuner(
    space: Space,
    *,
    runtime: RuntimeOptions,
    storage_path: str,
    name: str,
    callbacks: list[tune.Callback] | None = None,
    verbose: int = 1,
    study_storage: optuna.storages.BaseStorage | None = None,
) -> tune.Tuner:
    """The ``tune.Tuner`` of a search (the one place that wires Ray Tune and Optuna).

    :param study_storage: where the Optuna study named ``name`` is kept (None: in memory).
    """
    s = space.search
    objectives = space.objectives()
    multi = len(objectives) > 1
    searcher = OptunaSearch(
        space.define_by_run,
        # several objectives: Optuna's multi-objective TPE; ASHA below takes the first
        metric=[o["metric"] for o in objectives] if multi else s["metric"],
        mode=[o["mode"] for o in objectives] if multi else s["mode"],
        sampler=sampler_for(space),
        points_to_evaluate=space.points_to_evaluate() or None,
        storage=study_storage,
        study_name=name if study_storage is not None else None,
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_epochs(space),
        grace_period=int(s["grace_period"]),
        reduction_factor=float(s["reduction_factor"]),
    )
    return tune.Tuner(
        make_trainable(space, runtime),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=s["metric"],
            mode=s["mode"],
            num_samples=int(s["trials"]),
            max_concurrent_trials=int(s["max_concurrent"]),
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or [],
            stop=StopOnDataError(),
            failure_config=tune.FailureConfig(max_failures=int(s["max_failures"])),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=verbose,
        ),
    )


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def ensure_ray(address: str | None) -> None:
    """Join ``address`` (or start a local Ray) unless this process already has a session."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a tracking server that went away must not stall the driver for minutes per request:
    # MLflowTrials keeps the records and sends them when it is back
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs)


def search_name(experiment: str) -> str:
    """A search's name: its Ray Tune experiment, its Optuna study."""
    return f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_model_name(experiment: str) -> str:
    """Registered model name of a search's champion head."""
    return experiment if experiment.startswith("difftune") else f"difftune-{experiment}"


def make_trainable(space: Space, runtime: RuntimeOptions):
    """The function trainable with its runtime options and per-trial resources."""
    resources = trial_resources(space.search, gpus_available=cluster_gpus())
    trainable = tune.with_parameters(train_trial, runtime=runtime, grid=space.grid_spec())
    return tune.with_resources(trainable, resources)


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
        :func:`~.uris.artifact_root`).
    :param optuna_storage: where the Optuna study is kept (default:
        :func:`~.optuna_store.default_storage`).
    :param console: the terminal's :class:`~.console.SearchConsole` (a live trial table, the
        rest in its log file); None leaves Ray Tune's own reporter at ``verbose``."""
    from difftune.search.records import optuna_store
    from difftune.search.report import ui_view
    from difftune.search.report.console import ConsoleTable, log_path_for
    from difftune.search.report.publish import LiveReport, annotate

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
    tuner = build_tuner(space, runtime=runtime, storage_path=storage_path, name=name,
                        callbacks=callbacks, verbose=verbose,
                        study_storage=optuna_store.open_storage(study_url))
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
    checks of the stores (``cmd_search``)."""
    if not tune.Tuner.can_restore(plan.tune_path):
        raise TrackingError(f"--resume {plan.experiment}: the search's Ray Tune state "
                            f"{redact(plan.tune_path)} is missing or not restorable (was "
                            "--storage on another machine?)")
    if console is not None:
        from difftune.search.report.console import log_path_for

        console.open_log(log_path_for(plan.storage_path, plan.study_name or Path(
            plan.tune_path.split("?")[0]).name, resumed=True))
    client = MlflowClient(tracking_uri)
    ensure_ray(address)
    client.update_run(plan.parent, status="RUNNING")
    logger.info("resuming %s from %s", plan.experiment, redact(plan.tune_path))
    tuner = tune.Tuner.restore(plan.tune_path, trainable=make_trainable(plan.space, plan.runtime),
                               resume_unfinished=True, resume_errored=True)
    if console is not None and not console.verbose:
        verbose = 0
    result = _fit_and_finish(tuner, plan.space, client=client, parent=plan.parent,
                             experiment=plan.experiment, tracking_uri=tracking_uri,
                             tune_path=plan.tune_path, model_name=plan.model_name,
                             runtime=plan.runtime, verbose=verbose, console=console)
    from difftune.search.report import ui_view
    from difftune.search.report.publish import annotate

    links = ui_view.setup(client, tracking_uri, plan.parent, metric=plan.space.search["metric"],
                          mode=plan.space.search["mode"])
    return annotate(result, plan.study_storage, plan.study_name, links, console)




def _fit_and_finish(tuner: tune.Tuner, space: Space, *, client: MlflowClient, parent: str,
                    console: SearchConsole | None = None, **finish: Any) -> SearchResult:
    """Run the trials, then :func:`~.finish.finish_search` (``finish``: its arguments)."""
    try:
        with console.library_stdout() if console is not None else contextlib.nullcontext():
            results = tuner.fit()
    except BaseException:
        mark(client, parent, "FAILED")
        raise
    return finish_search(results, space, client=client, parent=parent, console=console,
                         **finish)
