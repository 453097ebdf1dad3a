"""The library side of ``difftune search`` before its first trial, and the one Tuner builder:
:func:`~difftune.search.run.preflight.prepare_search` checks, plans and returns what the
search needs without writing anything; :func:`~difftune.search.run.tuner.build_tuner` builds
the search's Tuner and, given configs, the confirm stage's, wired the same way;
:func:`~difftune.search.run.prewarm.extract_space` fills a space's planned entries once."""

from __future__ import annotations

import pytest
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from difftune.search.records.optuna_store import default_storage
from difftune.search.run.preflight import Prepared, SearchRequest, prepare_search
from difftune.search.run.prewarm import extract_space
from difftune.search.run.tuner import FixedConfigs, StopOnRepeatingFailure, build_tuner
from difftune.search.space.spec import load_space
from difftune.trainables.errors import UserError
from difftune.trainables.trainable import RuntimeOptions


def test_a_plan_over_its_budget_is_echoed_then_refused_before_anything_is_written(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    request = SearchRequest(cache_budget="20MB", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                            storage=str(tmp_path / "runs"), cache=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"20 MB \(--cache-budget\)"):
        prepare_search(request, echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith("plan: ")
    assert list(tmp_path.iterdir()) == []


def test_prepare_search_returns_what_the_search_needs(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lines: list[str] = []
    ready = prepare_search(SearchRequest(trials=3, pins=("epochs=2",), tracking_uri=uri,
                                         storage=str(tmp_path / "runs"), cache="cache"),
                           echo=lines.append)
    assert isinstance(ready, Prepared) and ready.resume is None and not ready.nothing_to_resume
    assert lines[0] == ready.plan.summary()  # the plan's line first, as the CLI prints it
    assert ready.space.search["trials"] == 3 and ready.space.fixed["epochs"] == 2
    assert ready.experiment == "difftune-demo" and ready.model_name == "difftune-demo"
    assert ready.tracking_uri == uri
    assert ready.runtime.cache == str(tmp_path / "cache")  # absolute: trials run elsewhere
    assert ready.runtime.cache_policy == ready.plan.policy
    assert ready.optuna_storage == default_storage(uri, str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()  # nothing of the search is written yet


def test_the_confirm_tuner_is_the_search_tuner_running_given_configs(ray_session, tmp_path):
    space = load_space("demo", search_overrides={"trials": 5, "max_concurrent": 3})
    runtime = RuntimeOptions()
    search = build_tuner(space, runtime=runtime, storage_path=str(tmp_path), name="s")
    configs = [{"head": "linear", "block": 5}, {"head": "linear", "block": 7}]
    confirm = build_tuner(space, runtime=runtime, storage_path=str(tmp_path), name="s-confirm",
                          configs=configs)
    (s_tune, s_run), (c_tune, c_run) = [
        (t._local_tuner._tune_config, t._local_tuner._run_config) for t in (search, confirm)]
    assert isinstance(s_tune.search_alg, OptunaSearch)
    assert isinstance(s_tune.scheduler, ASHAScheduler) and s_tune.num_samples == 5
    assert isinstance(s_run.stop, StopOnRepeatingFailure)
    # the confirm stage: the configs in order, each to its last epoch, nothing stops it early
    assert isinstance(c_tune.search_alg, FixedConfigs) and c_tune.scheduler is None
    assert c_tune.num_samples == 2 and c_run.stop is None
    assert [c_tune.search_alg.suggest(str(i)) for i in range(3)] == [*configs, Searcher.FINISHED]
    # wired the same way: names, concurrency, metric, failures, checkpoints
    for attr in ("metric", "mode", "max_concurrent_trials", "reuse_actors",
                 "trial_name_creator", "trial_dirname_creator"):
        assert getattr(s_tune, attr) == getattr(c_tune, attr), attr
    assert s_tune.max_concurrent_trials == 3
    assert s_run.failure_config == c_run.failure_config
    assert s_run.checkpoint_config == c_run.checkpoint_config
    assert (s_run.name, c_run.name) == ("s", "s-confirm")
    assert s_run.storage_path == c_run.storage_path == str(tmp_path)


SMALL = """
model: demo
data: digits
search: {trials: 2, seed: 0, cache_pool: 4, cache_policy: block-set}
fixed: {head: linear, epochs: 1}
params:
  block: {int: [3, 6]}
  t: {choice: [10, 90]}
  pool: {choice: [1, 2]}
"""


def test_extract_space_fills_the_plans_entries_once(tmp_path):
    (tmp_path / "small.yaml").write_text(SMALL)
    lines: list[str] = []
    plan, first = extract_space(str(tmp_path / "small.yaml"), cache=str(tmp_path / "cache"),
                                echo=lines.append)
    assert lines == [plan.summary()] and plan.timesteps == [10, 90]
    assert first["written"] > 0 and first["shards"] == 1
    _, again = extract_space(str(tmp_path / "small.yaml"), cache=str(tmp_path / "cache"),
                             echo=lines.append)
    assert again["written"] == 0 and again["reused"] == first["written"]
