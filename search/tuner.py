"""Building and running the Ray Tune search: OptunaSearch (seeded multivariate TPE) chooses
trials, ASHA stops poor ones early, MLflow records them."""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from search.space import Space
from search.tracking import MLflowTrials, log_champion, start_parent_run
from trainables.trainable import RuntimeOptions, decode_config, train_trial

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


def sampler_for(space: Space) -> optuna.samplers.TPESampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=int(space.search["seed"]), multivariate=True,
                                          group=True, n_startup_trials=min(
                                              10, max(2, int(space.search["trials"]) // 3)))


def max_epochs(space: Space) -> int:
    if "epochs" in space.fixed:
        return int(space.fixed["epochs"])
    spec = space.params.get("epochs", {})
    vals = spec.get("choice") or spec.get("int") or [28]
    return int(max(vals))


def build_tuner(
    space: Space,
    *,
    runtime: RuntimeOptions,
    storage_path: str,
    name: str,
    callbacks: list[tune.Callback] | None = None,
    verbose: int = 1,
) -> tune.Tuner:
    """The ``tune.Tuner`` of a search (the one place that wires Ray Tune and Optuna)."""
    s = space.search
    searcher = OptunaSearch(
        space.define_by_run,
        metric=s["metric"],
        mode=s["mode"],
        sampler=sampler_for(space),
        points_to_evaluate=space.points_to_evaluate() or None,
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_epochs(space),
        grace_period=int(s["grace_period"]),
        reduction_factor=float(s["reduction_factor"]),
    )
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, runtime=runtime),
        {"cpu": float(s["cpus_per_trial"]), "gpu": float(s["gpus_per_trial"])},
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=s["metric"],
            mode=s["mode"],
            num_samples=int(s["trials"]),
            max_concurrent_trials=int(s["max_concurrent"]),
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or [],
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
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(include_dashboard=False, **kwargs)


def run_search(
    space: Space,
    *,
    experiment: str,
    tracking_uri: str,
    runtime: RuntimeOptions,
    storage_path: str | None = None,
    address: str | None = None,
    model_name: str | None = None,
    verbose: int = 1,
) -> SearchResult:
    """Run a whole search: parent run, trials, champion. Returns what the CLI prints."""
    storage_path = str(Path(storage_path or DEFAULT_STORAGE).resolve())
    name = f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    client = MlflowClient(tracking_uri)
    parent = start_parent_run(client, experiment, space_dict=space.resolved(),
                              runtime=runtime.to_dict(), tune_path=f"{storage_path}/{name}")
    ensure_ray(address)
    callback = MLflowTrials(tracking_uri, parent)
    status = "FAILED"
    try:
        tuner = build_tuner(space, runtime=runtime, storage_path=storage_path, name=name,
                            callbacks=[callback], verbose=verbose)
        results = tuner.fit()
        status = "FINISHED"
    finally:
        client.set_terminated(parent, status)
    s = space.search
    rows = []
    for r in results:
        if r.metrics and s["metric"] in r.metrics:
            cfg = decode_config(r.config)
            rows.append({"trial_id": r.metrics.get("trial_id"), "val_top1": r.metrics.get("val_top1"),
                         "val_top5": r.metrics.get("val_top5"), "epochs": r.metrics.get("epoch"),
                         "run_id": callback._runs.get(r.metrics.get("trial_id")), **cfg})
    rows.sort(key=lambda row: row[s["metric"]], reverse=s["mode"] == "max")
    best_run = best_cfg = best_val = version = None
    try:
        best = results.get_best_result(metric=s["metric"], mode=s["mode"], scope="last",
                                       filter_nan_and_inf=True)
    except RuntimeError:
        best = None
    if best is not None and best.checkpoint is not None:
        best_run = callback._runs.get(best.metrics.get("trial_id"))
        best_val = float(best.metrics[s["metric"]])
        best_cfg = decode_config(best.config)
        with best.checkpoint.as_directory() as ckpt_dir:
            version = log_champion(client, tracking_uri=tracking_uri, parent_run_id=parent,
                                   best_run_id=best_run, checkpoint_dir=ckpt_dir,
                                   model_name=model_name or f"difftune-{experiment}",
                                   best_config=best_cfg, metric_value=best_val)
    return SearchResult(experiment, parent, tracking_uri, f"{storage_path}/{name}", best_run,
                        best_val, best_cfg, version, rows)
