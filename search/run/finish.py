"""The end of a search, once Ray Tune's trials are done: the results read by
:mod:`difftune.search.records.best`'s rule, the failures counted (a data error or no finished
trial ends the search with one line, its parent run ``FAILED`` with the reason), the Pareto front of a multi-objective search, the
confirm stage (:mod:`.confirm`) and the test evaluation of each config it kept, the champion
evaluated once on test and registered (:mod:`difftune.search.records.champion`'s alias
rule), the parent run ``FINISHED``, and the figures and description drawn a last time
(:mod:`difftune.search.report.publish`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient
from ray.tune import ResultGrid

from difftune.search.records.best import Candidate, rank_trials, result_candidates
from difftune.search.records.champion import log_champion
from difftune.search.records.pareto import log_front
from difftune.search.records.tracking import trial_run_ids
from difftune.search.records.uris import TrackingError
from difftune.search.report.console import SearchConsole
from difftune.search.report.publish import LiveReport, final_publish
from difftune.search.run.confirm import confirm_top
from difftune.search.run.evaluation import evaluate_on_test, log_test_metrics
from difftune.search.run.trials import first_line, store_is_away
from difftune.search.space.spec import Space
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import DataError
from difftune.trainables.errors import SearchFailed
from difftune.trainables.params import decode
from difftune.trainables.train.grid import GRID_BEST, with_point
from difftune.trainables.trainable import FAILURE_KEY, STOP_ALL, RuntimeOptions

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What a search leaves: its runs, the champion, the rows the closing table prints."""

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


def trial_settings(result) -> dict[str, Any]:
    """The settings of a finished trial's head: its config, with the best grid point of a
    grid trial put in (what its checkpoint holds)."""
    return with_point(decode(result.config), (result.metrics or {}).get(GRID_BEST))


def _failure(r) -> str | None:
    return "error" if r.error is not None else (r.metrics or {}).get(FAILURE_KEY)


def _fail(client: MlflowClient, parent: str, message: str,
          report: LiveReport | None) -> None:
    """The search ends without a champion: the reason on its parent run, marked FAILED, its
    figures and description drawn a last time (they say why)."""
    try:
        client.set_tag(parent, "difftune.failure", message[:5000])
    except Exception as exc:  # noqa: BLE001 - the error in flight is the one to report
        logger.error("could not record why search run %s failed: %s", parent, first_line(exc))
    mark(client, parent, "FAILED")
    final_publish(client, parent, report)


def finish_search(results: ResultGrid, space: Space, *, client: MlflowClient, parent: str,
                  experiment: str, tracking_uri: str, tune_path: str, model_name: str,
                  runtime: RuntimeOptions | None = None, verbose: int = 1,
                  report: LiveReport | None = None,
                  console: SearchConsole | None = None) -> SearchResult:
    """Everything a search does after its trials (see the module's doc); returns what the
    CLI prints."""
    s = space.search
    candidates = result_candidates(results, s["metric"])
    failed = Counter(f for f in (_failure(c.data) for c in candidates) if f)
    for kind in STOP_ALL:  # the failure that stopped the search: the user's data or disk
        error = next((c.data.metrics.get("error") for c in candidates
                      if _failure(c.data) == kind), None)
        if error:
            _fail(client, parent, error, report)
            raise (DataError if kind == "data" else SearchFailed)(error)
    ranked = rank_trials(candidates, mode=s["mode"])
    if not ranked:
        why = ", ".join(f"{n} {kind}" for kind, n in sorted(failed.items())) or "none reported"
        message = (f"no trial finished: {len(candidates)} trial(s), failed: {why}; the runs of "
                   f"experiment {experiment!r} hold each trial's error")
        _fail(client, parent, message, report)
        raise SearchFailed(message)
    runs = while_away("reading the trial runs", lambda: trial_run_ids(client, parent))
    # the settings first: a trial's "epochs" is the epochs it ran, not the configured ones
    rows = [{**trial_settings(c.data), "trial_id": c.key,
             "val_top1": c.data.metrics.get("val_top1"),
             "val_top5": c.data.metrics.get("val_top5"), s["metric"]: c.score,
             "epochs": c.epochs, "run_id": runs.get(c.key),
             **rung_cells(c.data.metrics, space)}
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
        mark(client, parent, "FAILED")
        raise
    # FINISHED last: a search whose driver died before its champion was registered is
    # resumable, and --resume of a FINISHED one has nothing to do
    while_away("finishing the search run", lambda: client.set_terminated(parent, "FINISHED"))
    result.figures = final_publish(client, parent, report)
    return result


def rung_cells(metrics: dict[str, Any], space: Space) -> dict[str, Any]:
    """A trial's rung over images in the closing table (``rung`` 1..K, ``images`` its train
    images there); nothing without rungs."""
    if not space.search.get("image_rungs") or "image_rung" not in metrics:
        return {}
    return {"rung": int(metrics["image_rung"]) + 1, "images": metrics.get("rung_images")}


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
    for row in result.rows:  # the champion's row in the closing table (a search trial)
        if row["trial_id"] == best.key:
            row.update(result.test_metrics)
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
    records wait: :func:`~difftune.search.run.trials.store_is_away`), up to
    ``DIFFTUNE_MLFLOW_WAIT_S`` (default 300) seconds: a server that goes away as the search
    ends costs a wait, not the search."""
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


def mark(client: MlflowClient, parent: str, status: str) -> None:
    """Set the parent run's status while an error ends the search, without hiding that
    error behind a tracking store that is away."""
    try:
        client.set_terminated(parent, status)
    except Exception as exc:  # noqa: BLE001 - the error in flight is the one to report
        logger.error("could not mark search run %s %s: %s", parent, status, first_line(exc))
