"""Everything a search does before its first trial (:func:`prepare_search`): the checks of
what a user can get wrong (the space, the model, the data, secrets in settings, the tracking
store, Ray Tune's and Optuna's storage, every node of the cluster reaching them), the plan
(passes, GPU-hours, cache bytes against the budget: a search that cannot fit is refused
before anything is written), the cache's runtime options, and the plan's entries extracted
ahead on a cluster (:func:`~.prewarm.extract_first`). It returns what :func:`~.search.run_search`
(or, for ``--resume``, :func:`~.search.resume_search`) needs: :meth:`Prepared.start` runs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from difftune.search.plan.estimate import Plan, data_size, make_plan, refuse_if_over, resolve_budget
from difftune.search.records import optuna_store
from difftune.search.records.tracking import default_experiment
from difftune.search.records.uris import (
    artifact_root,
    check_reachable,
    check_storage,
    is_database,
    redact,
    refuse_secrets,
    resolve_uri,
)
from difftune.search.report.console import SearchConsole
from difftune.search.run.cluster import check_addressable, check_inputs_on_nodes, ensure_ray
from difftune.search.run.finish import SearchResult
from difftune.search.run.prewarm import Echo, cache_options, extract_first
from difftune.search.run.search import (
    ResumePlan,
    default_model_name,
    plan_resume,
    resume_search,
    run_search,
)
from difftune.search.run.tuner import DEFAULT_STORAGE
from difftune.search.space.spec import Space, load_space, parse_set
from difftune.trainables.cache.feature_cache import default_root
from difftune.trainables.data.datasets import check_data
from difftune.trainables.data.order import DEFAULT_STEPS
from difftune.trainables.model.unet import check_model
from difftune.trainables.progress import DEFAULT_EVERY_S
from difftune.trainables.trainable import RuntimeOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchRequest:
    """What a search is asked to do: the settings of ``difftune search`` (None: the space's,
    or the default its flag's help names)."""

    space: str = "demo"
    model: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    pins: Sequence[str] = ()  # NAME=VALUE (--set)
    trials: int | None = None
    seed: int | None = None
    experiment: str | None = None
    model_name: str | None = None
    tracking_uri: str | None = None
    artifact_location: str | None = None
    address: str | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    max_concurrent: int | None = None
    image_rungs: list[float] | None = None  # [] turns a space's rungs off
    storage: str | None = None
    cache: str | None = None
    no_cache: bool = False
    cache_budget: str | None = None
    data_hash: str = "size"
    resume: str | None = None  # the experiment whose latest search continues
    optuna_storage: str | None = None


@dataclass
class Prepared:
    """A search that passed its checks, ready to start: a new search (``space`` ...), or the
    search ``resume`` continues."""

    tracking_uri: str
    address: str | None
    model_name: str
    resume: ResumePlan | None = None
    space: Space | None = None
    experiment: str = ""
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    storage_path: str | None = None
    artifact_location: str | None = None
    plan: Plan | None = None
    optuna_storage: str | None = None

    @property
    def nothing_to_resume(self) -> bool:
        """``--resume`` of a search that finished: nothing to start."""
        return self.resume is not None and self.resume.finished

    def start(self, console: SearchConsole | None = None) -> SearchResult:
        """Run the search (or continue the resumed one) to its end."""
        if self.resume is not None:
            return resume_search(self.resume, tracking_uri=self.tracking_uri,
                                 address=self.address, console=console)
        assert self.space is not None and self.plan is not None
        return run_search(self.space, experiment=self.experiment,
                          tracking_uri=self.tracking_uri, runtime=self.runtime,
                          storage_path=self.storage_path, address=self.address,
                          model_name=self.model_name, artifact_location=self.artifact_location,
                          plan=self.plan.to_dict(), optuna_storage=self.optuna_storage,
                          console=console)


def _log(line: str) -> None:
    logger.info("%s", line)


def prepare_search(request: SearchRequest, *, echo: Echo = _log) -> Prepared:
    """Check everything a search needs, in the order a user can fix it, before anything is
    written; start (or join) Ray for the cluster's checks. ``echo``: where the plan's summary
    and the extraction's lines go (the command line prints them).

    :raises UserError: (and its kinds) with one line naming the setting and what is allowed.
    """
    if request.resume:
        return _prepare_resume(request)
    space = load_space(
        request.space, model=request.model, checkpoint=request.checkpoint, data=request.data,
        overrides=parse_set(list(request.pins)),
        search_overrides={"trials": request.trials, "seed": request.seed,
                          "gpus_per_trial": request.gpus_per_trial,
                          "cpus_per_trial": request.cpus_per_trial,
                          "max_concurrent": request.max_concurrent,
                          "image_rungs": request.image_rungs},
    )
    check_model(space.model, checkpoint=space.checkpoint)
    check_data(space.data)
    refuse_secrets("--storage", request.storage)
    refuse_secrets("--cache", request.cache)
    refuse_secrets("--artifact-location", request.artifact_location)
    uri = resolve_uri(request.tracking_uri)
    check_reachable(uri)
    check_storage(request.storage)
    study_url = request.optuna_storage or optuna_store.default_storage(
        uri, request.storage or DEFAULT_STORAGE)
    refuse_secrets("--optuna-storage", study_url)  # Tune's searcher state keeps it
    optuna_store.check_storage(study_url)
    cache = None if request.no_cache else (request.cache or default_root())
    if cache and "://" not in cache:
        cache = os.path.abspath(cache)  # trials run in other working directories
    # the plan first: a search whose cache cannot fit stops here, before anything is written
    budget, source, explicit = resolve_budget(request.cache_budget, space, cache)
    cost = make_plan(space, data_size(space), budget=budget, budget_source=source,
                     cache=cache, cached=cache is not None)
    echo(cost.summary())
    refuse_if_over(cost)
    experiment = request.experiment or default_experiment(space)
    artifacts = experiment_artifacts(uri, experiment, request.artifact_location)
    ensure_ray(request.address)
    check_addressable(storage_path=request.storage, cache=cache, tracking_uri=uri,
                      artifact_location=artifacts)
    check_inputs_on_nodes({"--checkpoint": space.checkpoint, "--data": space.data})
    runtime = RuntimeOptions(cache=cache, online=request.no_cache,
                             threads=max(1, int(space.search["cpus_per_trial"])),
                             extract_batch=space.search.get("extract_batch"),
                             image_rungs=tuple(space.search.get("image_rungs") or ()),
                             image_floor=int(space.search.get("image_floor", 5)),
                             rung_factor=float(space.search["reduction_factor"]),
                             rung_steps=int(space.search.get("rung_steps", DEFAULT_STEPS)),
                             progress_s=float(os.environ.get("DIFFTUNE_PROGRESS_S",
                                                             DEFAULT_EVERY_S)),
                             **cache_options(cost, cache, explicit, request.data_hash,
                                             space.data))
    extract_first(space, cost, runtime, echo=echo)
    logger.info("search %s: %d trials on %s / %s, tracking %s", space.name,
                space.search["trials"], space.model, space.data, redact(uri))
    return Prepared(tracking_uri=uri, address=request.address,
                    model_name=request.model_name or default_model_name(experiment),
                    space=space, experiment=experiment, runtime=runtime,
                    storage_path=request.storage, artifact_location=artifacts, plan=cost,
                    optuna_storage=study_url)


def _prepare_resume(request: SearchRequest) -> Prepared:
    """``--resume``: the latest search of the experiment, the stores checked again before
    anything restarts (the cluster may differ)."""
    uri = resolve_uri(request.tracking_uri)
    check_reachable(uri, must_exist=True)
    plan = plan_resume(experiment=request.resume, tracking_uri=uri)
    prepared = Prepared(tracking_uri=uri, address=request.address, model_name=plan.model_name,
                        resume=plan)
    if plan.finished:
        return prepared
    ensure_ray(request.address)
    check_addressable(storage_path=plan.storage_path, cache=plan.runtime.cache,
                      tracking_uri=uri, artifact_location=experiment_artifacts(
                          uri, request.resume, None))
    check_inputs_on_nodes({"--checkpoint": plan.space.checkpoint, "--data": plan.space.data})
    return prepared


def experiment_artifacts(uri: str, experiment: str, given: str | None) -> str | None:
    """Where ``experiment``'s artifacts go: its own location if it exists (fixed when it was
    made), else ``given`` or the store's default
    (:func:`~difftune.search.records.uris.artifact_root`)."""
    if given and "://" not in given:
        given = os.path.abspath(given)
    if not is_database(uri):
        return given  # a server keeps its own; sqlite: beside its file (nothing to check)
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is not None:
        return exp.artifact_location
    return given or artifact_root(uri, experiment)
