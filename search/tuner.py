"""Building and running the Ray Tune search: OptunaSearch (seeded multivariate TPE) chooses
trials, ASHA stops poor ones early, MLflow records them; at the end the best trial (by
:mod:`.best`'s rule, on val) is evaluated once on the test split and registered.

With ``search.objectives`` OptunaSearch runs Optuna's multi-objective TPE (a metric and a
mode per objective) while ASHA, which takes one metric, stops trials by the first objective;
the search ends by recording the Pareto front on the parent run (:mod:`.pareto`). With a
``grid:`` every trial trains the grid's heads and reports its best one
(:mod:`difftune.trainables.grid`). With ``confirm_top`` the top configs are retrained
(:mod:`.confirm`), each confirmed config is evaluated once on test, and the champion is the
best confirmed (by val).

A trial that fails in a way a retry would repeat (``diverged``, ``config``, ``data``: see
:mod:`difftune.trainables.trainable`) ends at once; a data error (an image that cannot be
decoded) stops the whole search, which then ends with that one line and exit code 2. A
search in which no trial finished raises :class:`~difftune.trainables.errors.SearchFailed`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from difftune.search.best import Candidate, rank_trials, result_candidates
from difftune.search.champion import log_champion
from difftune.search.cluster import cluster_gpus, trial_resources
from difftune.search.evaluation import evaluate_on_test, log_test_metrics
from difftune.search.mlflow_trials import MLflowTrials, first_line, store_is_away
from difftune.search.optuna_store import TAG_STORAGE, TAG_STUDY
from difftune.search.pareto import log_front
from difftune.search.space import Space
from difftune.search.space_optuna import startup_trials
from difftune.search.tracking import (
    TAG_RUNTIME,
    latest_search_run,
    record_skipped_images,
    space_from_run,
    start_parent_run,
    trial_run_ids,
)
from difftune.search.uris import TrackingError, redact, storage_join
from difftune.trainables.config import TrialConfig
from difftune.trainables.data import DataError
from difftune.trainables.errors import SearchFailed
from difftune.trainables.grid import GRID_BEST, with_point
from difftune.trainables.params import decode
from difftune.trainables.trainable import FAILURE_KEY, RuntimeOptions, train_trial

if TYPE_CHECKING:
    from difftune.search.console import SearchConsole
    from difftune.search.publish import LiveReport

logger = logging.getLogger(__name__)

DEFAULT_STORAGE = "difftune_runs"


@dataclass
class SearchResult:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    tune_path: str
    best_run_id: str | None
    best_metric: float | None
    best_config: dict[str, Any] | None
    model_version: int | None
    rows: list[dict[str, Any]]
    #: the Pareto front of a multi-objective search (rows best first), else None
    pareto: list[dict[str, Any]] | None = None
    confirmed: list[dict[str, Any]] = field(default_factory=list)  # the confirm stage's rows
    metric: str = "val_top1"
    test_metrics: dict[str, float] = field(default_factory=dict)
    alias_moved: bool = True
    alias_reason: str = ""
    failed: dict[str, int] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    optuna_storage: str | None = None
    study_name: str | None = None
    experiment_link: str | None = None
    trials_link: str | None = None
    log_path: str | None = None


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
    :func:`~.space_optuna.startup_trials` startup trials (the enqueued points count)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=int(space.search["seed"]), multivariate=True, group=True,
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


def trial_settings(result) -> dict[str, Any]:
    """The settings of a finished trial's head: its config, with the best grid point of a
    grid trial put in (what its checkpoint holds)."""
    return with_point(decode(result.config), (result.metrics or {}).get(GRID_BEST))


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
    from difftune.search import optuna_store, ui_view
    from difftune.search.console import ConsoleTable, log_path_for
    from difftune.search.publish import LiveReport, annotate

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
        from difftune.search.console import log_path_for

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
    from difftune.search import ui_view
    from difftune.search.publish import annotate

    links = ui_view.setup(client, tracking_uri, plan.parent, metric=plan.space.search["metric"],
                          mode=plan.space.search["mode"])
    return annotate(result, plan.study_storage, plan.study_name, links, console)


def _failure(r) -> str | None:
    return "error" if r.error is not None else (r.metrics or {}).get(FAILURE_KEY)


def _fail(client: MlflowClient, parent: str, message: str) -> None:
    """The search ends without a champion: the reason on its parent run, marked FAILED."""
    try:
        client.set_tag(parent, "difftune.failure", message[:5000])
    except Exception as exc:  # noqa: BLE001 - the error in flight is the one to report
        logger.error("could not record why search run %s failed: %s", parent, first_line(exc))
    _mark(client, parent, "FAILED")


def _fit_and_finish(tuner: tune.Tuner, space: Space, *, client: MlflowClient, parent: str,
                    experiment: str, tracking_uri: str, tune_path: str,
                    model_name: str, runtime: RuntimeOptions | None = None,
                    verbose: int = 1, report: LiveReport | None = None,
                    console: SearchConsole | None = None) -> SearchResult:
    try:
        with console.library_stdout() if console is not None else contextlib.nullcontext():
            results = tuner.fit()
    except BaseException:
        _mark(client, parent, "FAILED")
        raise
    s = space.search
    candidates = result_candidates(results, s["metric"])
    failed = Counter(f for f in (_failure(c.data) for c in candidates) if f)
    data_error = next((c.data.metrics.get("error") for c in candidates
                       if _failure(c.data) == "data"), None)
    if data_error:
        _fail(client, parent, data_error)
        raise DataError(data_error)
    ranked = rank_trials(candidates, mode=s["mode"])
    if not ranked:
        why = ", ".join(f"{n} {kind}" for kind, n in sorted(failed.items())) or "none reported"
        message = (f"no trial finished: {len(candidates)} trial(s), failed: {why}; the runs of "
                   f"experiment {experiment!r} hold each trial's error")
        _fail(client, parent, message)
        raise SearchFailed(message)
    runs = while_away("reading the trial runs", lambda: trial_run_ids(client, parent))
    # the settings first: a trial's "epochs" is the epochs it ran, not the configured ones
    rows = [{**trial_settings(c.data), "trial_id": c.key,
             "val_top1": c.data.metrics.get("val_top1"),
             "val_top5": c.data.metrics.get("val_top5"),
             "test_top1": c.data.metrics.get("test_top1"), s["metric"]: c.score,
             "epochs": c.epochs, "run_id": runs.get(c.key)}
            for c in ranked]
    pareto = None
    objectives = space.objectives()
    if len(objectives) > 1:
        points = [{"trial_id": c.key, "run_id": runs.get(c.key),
                   **{o["metric"]: c.data.metrics.get(o["metric"]) for o in objectives},
                   "config": TrialConfig.from_dict(trial_settings(c.data)).to_dict()}
                  for c in ranked]
        pareto = while_away("recording the Pareto front",
                            lambda: log_front(client, parent, points, objectives))
    runtime = runtime or RuntimeOptions()
    result = SearchResult(experiment, parent, tracking_uri, tune_path, None, None, None, None,
                          rows, pareto, metric=s["metric"], failed=dict(failed))
    try:
        champions, tested = ranked, {}
        if int(s.get("confirm_top") or 0) > 0:  # the champion is the best confirmed
            from difftune.search.confirm import confirm_top

            with console.library_stdout() if console is not None else contextlib.nullcontext():
                champions, result.confirmed = confirm_top(
                    space, ranked, runtime=runtime, tracking_uri=tracking_uri, parent=parent,
                    tune_path=tune_path, verbose=verbose)
            runs = while_away("reading the trial runs", lambda: trial_run_ids(client, parent))
            tested = _test_confirmed(champions, result.confirmed, space, client=client,
                                     runtime=runtime, runs=runs)
        best = next((c for c in champions if c.data.checkpoint is not None), None)
        if best is not None:
            _champion(best, result, space, client=client, runtime=runtime,
                      model_name=model_name, runs=runs, tested=tested)
    except BaseException:
        _mark(client, parent, "FAILED")
        raise
    # FINISHED last: a search whose driver died before its champion was registered is
    # resumable, and --resume of a FINISHED one has nothing to do
    while_away("finishing the search run", lambda: client.set_terminated(parent, "FINISHED"))
    from difftune.search.publish import final_publish

    result.figures = final_publish(client, parent, report)
    return result


def _test_confirmed(confirmed: list[Candidate], rows: list[dict[str, Any]], space: Space, *,
                    client: MlflowClient, runtime: RuntimeOptions, runs: dict[str, str]
                    ) -> dict[str, dict[str, float]]:
    """Evaluate every config the confirm stage kept once on test (concurrently), log the
    figures on its confirm run and put them in its row: trial id -> test metrics."""
    kept = [c for c in confirmed if c.data.checkpoint is not None]
    if not kept:
        return {}
    logger.info("evaluating the %d confirmed configs once on the test split", len(kept))
    figures = evaluate_on_test([(c.data.checkpoint, c.data.config) for c in kept],
                               runtime=runtime, search=space.search)
    tested = {c.key: m for c, m in zip(kept, figures, strict=True)}
    for key, metrics in tested.items():
        if runs.get(key):
            while_away("logging a confirmed config's test figures",
                       lambda key=key, metrics=metrics: log_test_metrics(client, runs[key],
                                                                          metrics))
    for row in rows:
        row["run_id"] = runs.get(row["trial_id"])
        row.update(tested.get(row["trial_id"], {}))
    return tested


def _champion(best: Candidate, result: SearchResult, space: Space, *, client: MlflowClient,
              runtime: RuntimeOptions, model_name: str, runs: dict[str, str],
              tested: dict[str, dict[str, float]]) -> None:
    """Evaluate the best trial once on test (unless the confirm stage has: ``tested``),
    register it (the alias rule), fill ``result``."""
    s = space.search
    result.best_run_id = runs.get(best.key)
    result.best_metric = best.score
    result.best_config = TrialConfig.from_dict(trial_settings(best.data)).to_dict()
    if best.key in tested:
        result.test_metrics = tested[best.key]
    else:
        logger.info("evaluating the champion (trial %s) once on the test split", best.key)
        (result.test_metrics,) = evaluate_on_test([(best.data.checkpoint, best.data.config)],
                                                  runtime=runtime, search=s)
        if result.best_run_id:
            while_away("logging the champion's test figures", lambda: log_test_metrics(
                client, result.best_run_id, result.test_metrics))
    with best.data.checkpoint.as_directory() as ckpt_dir:
        registered = while_away("registering the champion", lambda: log_champion(
            client, tracking_uri=result.tracking_uri, parent_run_id=result.parent_run_id,
            best_run_id=result.best_run_id, checkpoint_dir=ckpt_dir, model_name=model_name,
            best_config=result.best_config, metric_value=best.score, metric=s["metric"],
            mode=s["mode"], test_metrics=result.test_metrics))
    result.model_version = registered.version
    result.alias_moved, result.alias_reason = registered.alias_moved, registered.reason


def while_away(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, called again every 5 s while the tracking store is away (as the trials'
    records wait: :func:`~.mlflow_trials.store_is_away`), up to ``DIFFTUNE_MLFLOW_WAIT_S``
    (default 300) seconds: a server that goes away as the search ends costs a wait, not the
    search."""
    wait_s = float(os.environ.get("DIFFTUNE_MLFLOW_WAIT_S", "300"))
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        try:
            return fn()
        except Exception as exc:
            if not store_is_away(exc):
                raise
            if time.monotonic() > deadline:
                raise TrackingError(f"the tracking store did not answer for {wait_s:.0f} s "
                                    f"while {what} ({first_line(exc)}); the trials are done: "
                                    "when it is back, difftune search --resume EXPERIMENT "
                                    "records the rest") from None
            if not warned:
                logger.warning("MLflow is not answering while %s (%s); trying again until it "
                               "is back", what, first_line(exc))
                warned = True
            time.sleep(5)


def _mark(client: MlflowClient, parent: str, status: str) -> None:
    """Set the parent run's status while an error ends the search, without hiding that
    error behind a tracking store that is away."""
    try:
        client.set_terminated(parent, status)
    except Exception as exc:  # noqa: BLE001 - the error in flight is the one to report
        logger.error("could not mark search run %s %s: %s", parent, status, first_line(exc))
