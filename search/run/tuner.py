"""The one place that builds a Ray Tune ``Tuner`` (:func:`build_tuner`), for the search and
for its confirm stage (:mod:`.confirm`).

A search's Tuner: OptunaSearch (seeded multivariate TPE, :func:`sampler_for`) chooses trials
and ASHA stops poor ones early. With ``search.objectives`` OptunaSearch runs Optuna's
multi-objective TPE (a metric and a mode per objective) while ASHA, which takes one metric,
stops trials by the first objective. With a ``grid:`` every trial trains the grid's heads and
reports its best one (:mod:`difftune.trainables.train.grid`). A trial that fails in a way a
retry would repeat (``diverged``, ``config``, ``data``: see :mod:`difftune.trainables.trainable`)
ends at once; a data error or a full disk stops the whole search
(:class:`StopOnRepeatingFailure`).

The confirm stage's Tuner runs given configs in order (:class:`FixedConfigs`), each for its
full epochs: no Optuna, no ASHA. Both name their trials ``trial_ID`` and keep one checkpoint.
A search whose driver died gets its Tuner back from Ray Tune's state (:func:`restore_tuner`).
How a whole search runs (its MLflow records, the end) is :mod:`.search`'s.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from difftune.search.records.optuna_store import name_objectives
from difftune.search.run.cluster import cluster_gpus, trial_resources
from difftune.search.space.distributions import startup_trials
from difftune.search.space.spec import Space
from difftune.trainables.trainable import FAILURE_KEY, STOP_ALL, RuntimeOptions, train_trial

logger = logging.getLogger(__name__)

#: Ray Tune's storage path when none is given (``--storage``)
DEFAULT_STORAGE = "difftune_runs"


class StopOnRepeatingFailure(tune.Stopper):
    """Stops the whole search at the first trial that reports a failure of
    :data:`~difftune.trainables.trainable.STOP_ALL` (a data error, a full disk)."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get(FAILURE_KEY) in STOP_ALL:
            self.seen = True
        return bool(result.get(FAILURE_KEY))

    def stop_all(self) -> bool:
        return self.seen


class FixedConfigs(Searcher):
    """A searcher that hands out given configs, in order, then finishes."""

    def __init__(self, configs: Sequence[dict[str, Any]], *, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.configs, self.next = [dict(c) for c in configs], 0

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.next >= len(self.configs):
            return Searcher.FINISHED
        self.next += 1
        return dict(self.configs[self.next - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass


def sampler_for(space: Space) -> optuna.samplers.TPESampler:
    """Seeded multivariate TPE with group decomposition (the dimensions of each head kind
    are modelled together; a head's trials never carry dimensions it does not read), after
    :func:`~difftune.search.space.distributions.startup_trials` startup trials (the enqueued
    points count), with the constant liar: a search runs ``max_concurrent`` trials at once,
    and the liar counts the running ones as bad so that TPE does not propose the same region
    again before they report. Spelled out rather than left to Optuna's default. How these
    settings were chosen (on tuning seeds) and how they fare against random search (on other
    seeds): ``python -m benchmarks.optuna_vs_random``, its rows in benchmarks/RESULTS.md and
    docs/benchmarks.md."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=int(space.search["seed"]), multivariate=True, group=True,
            constant_liar=True,
            n_startup_trials=startup_trials(int(space.search["trials"])))


def max_epochs(space: Space) -> int:
    return space.max_epochs()


def scheduler_for(space: Space) -> ASHAScheduler:
    """ASHA over epochs (``training_iteration``, from ``grace_period`` epochs on); with
    ``search.image_rungs``, ASHA over the rungs instead: a trial reports the end of rung k at
    ``rung_budget = reduction_factor ** k`` (:meth:`~difftune.trainables.data.order.Rung.budget`),
    so ASHA's milestones 1, rf, rf^2, ... fall at the rungs' ends, and the top 1 / rf of the
    trials scored at a rung go on to the next one's images."""
    s = space.search
    rf = float(s["reduction_factor"])
    rungs = s.get("image_rungs")
    if rungs:
        return ASHAScheduler(time_attr="rung_budget", max_t=rf ** (len(rungs) - 1) or 1,
                             grace_period=1, reduction_factor=rf)
    return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(space),
                         grace_period=int(s["grace_period"]), reduction_factor=rf)


def build_tuner(
    space: Space,
    *,
    runtime: RuntimeOptions,
    storage_path: str,
    name: str,
    callbacks: list[tune.Callback] | None = None,
    verbose: int = 1,
    study_storage: optuna.storages.BaseStorage | None = None,
    configs: Sequence[dict[str, Any]] | None = None,
    points: Sequence[dict[str, Any]] | None = None,
) -> tune.Tuner:
    """The ``tune.Tuner`` of a search (the one place that wires Ray Tune and Optuna), or,
    given ``configs``, of its confirm stage: those configs in order, each to its last epoch.

    :param storage_path: Ray Tune's storage; the experiment is ``storage_path/name``.
    :param study_storage: where the Optuna study named ``name`` is kept (None: in memory).
    :param configs: trial configs to run as they are (no Optuna, no ASHA, no stopper).
    :param points: Optuna points run first, after the space's own (the probe rung's prior:
        :func:`~.probe.prior_points`).
    """
    s = space.search
    if configs is None:
        objectives = space.objectives()
        multi = len(objectives) > 1
        if study_storage is not None:  # optuna-dashboard shows val_top1, not "Objective 0"
            name_objectives(study_storage, name, objectives)
        searcher: Searcher = OptunaSearch(
            space.define_by_run,
            # several objectives: Optuna's multi-objective TPE; ASHA below takes the first
            metric=[o["metric"] for o in objectives] if multi else s["metric"],
            mode=[o["mode"] for o in objectives] if multi else s["mode"],
            sampler=sampler_for(space),
            points_to_evaluate=[*space.points_to_evaluate(), *(points or [])] or None,
            storage=study_storage,
            study_name=name if study_storage is not None else None,
        )
        scheduler = scheduler_for(space)
        samples, stop = int(s["trials"]), StopOnRepeatingFailure()
    else:
        searcher = FixedConfigs(configs, metric=s["metric"], mode=s["mode"])
        scheduler, samples, stop = None, len(configs), None
    return tune.Tuner(
        make_trainable(space, runtime),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=s["metric"],
            mode=s["mode"],
            num_samples=samples,
            max_concurrent_trials=int(s["max_concurrent"]),
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or [],
            stop=stop,
            failure_config=tune.FailureConfig(max_failures=int(s["max_failures"])),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=verbose,
        ),
    )


def restore_tuner(path: str, space: Space, runtime: RuntimeOptions) -> tune.Tuner:
    """The Tuner of a search whose driver died, restored from its Ray Tune state at ``path``
    (with its searcher and scheduler): finished trials stay as they are, unfinished and
    errored ones continue."""
    return tune.Tuner.restore(path, trainable=make_trainable(space, runtime),
                              resume_unfinished=True, resume_errored=True)


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def make_trainable(space: Space, runtime: RuntimeOptions):
    """The function trainable with its runtime options and per-trial resources."""
    resources = trial_resources(space.search, gpus_available=cluster_gpus())
    trainable = tune.with_parameters(train_trial, runtime=runtime, grid=space.grid_spec())
    return tune.with_resources(trainable, resources)
