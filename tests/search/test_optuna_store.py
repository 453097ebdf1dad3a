"""Where a search's Optuna study is kept: beside a sqlite tracking store, in Tune's storage
for a tracking server, or where --optuna-storage says; a storage that cannot hold a study is
one clear error; trials a dead driver left running are closed."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from difftune.search.cli import main
from difftune.search.records.optuna_store import (
    OptunaStorageError,
    check_storage,
    close_orphans,
    dashboard_command,
    default_storage,
    open_storage,
)


def test_default_storage(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFTUNE_OPTUNA_STORAGE", raising=False)
    assert default_storage(f"sqlite:///{tmp_path}/x/mlflow.db", "runs") == \
        f"sqlite:///{tmp_path}/x/optuna.db"
    assert default_storage("http://127.0.0.1:5000", str(tmp_path / "runs")) == \
        str(tmp_path / "runs" / "optuna.journal")
    monkeypatch.chdir(tmp_path)
    assert default_storage("http://mlflow:5000", "s3://bucket/runs") == \
        f"sqlite:///{tmp_path}/optuna.db"
    monkeypatch.setenv("DIFFTUNE_OPTUNA_STORAGE", "postgresql://db/optuna")
    assert default_storage(f"sqlite:///{tmp_path}/mlflow.db", "runs") == \
        "postgresql://db/optuna"


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_study_written_is_read_back_and_orphans_are_closed(tmp_path, kind):
    url = f"sqlite:///{tmp_path}/optuna.db" if kind == "sqlite" else str(tmp_path / "o.journal")
    check_storage(url)
    study = optuna.create_study(storage=open_storage(url), study_name="s", direction="maximize")
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), 0.5)
    study.ask()  # a driver that died before telling
    assert close_orphans(url, "s") == 1
    states = [t.state for t in optuna.load_study(study_name="s", storage=open_storage(url)).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL]
    assert close_orphans(url, "no-such-study") == 0
    assert dashboard_command(url) == f"optuna-dashboard {url}"


def test_bad_storage_is_one_clear_error_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(OptunaStorageError, match="folder .* does not exist"):
        check_storage(f"sqlite:///{tmp_path}/missing/optuna.db")
    with pytest.raises(OptunaStorageError, match="cannot be opened"):
        check_storage("nosuchdialect://x/y")
    rc = main(["search", "--optuna-storage", f"sqlite:///{tmp_path}/missing/o.db",
               "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
               "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--optuna-storage" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("objectives", [
    [{"metric": "val_top1", "mode": "max"}],
    [{"metric": "val_top1", "mode": "max"}, {"metric": "gflops", "mode": "min"}],
])
def test_the_study_names_its_objectives(tmp_path, objectives):
    """The study OptunaSearch asks and tells (Ray Tune's, with load_if_exists) is the one
    name_objectives made: optuna-dashboard shows val_top1, not "Objective 0"."""
    from ray.tune.search.optuna import OptunaSearch

    from difftune.search.records.optuna_store import name_objectives

    url = f"sqlite:///{tmp_path}/optuna.db"
    name_objectives(open_storage(url), "s", objectives)
    metrics = [o["metric"] for o in objectives]
    multi = len(objectives) > 1
    def define_by_run(trial) -> None:
        trial.suggest_float("x", 0, 1)

    searcher = OptunaSearch(
        define_by_run,
        metric=metrics if multi else metrics[0],
        mode=[o["mode"] for o in objectives] if multi else objectives[0]["mode"],
        storage=open_storage(url), study_name="s", seed=0)
    config = searcher.suggest("t1")
    assert 0 <= config["x"] <= 1
    searcher.on_trial_complete("t1", {m: 0.5 for m in metrics})
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    assert study.metric_names == metrics
    assert [d.name for d in study.directions] == \
        ["MAXIMIZE" if o["mode"] == "max" else "MINIMIZE" for o in objectives]
    assert [t.values for t in study.trials] == [[0.5] * len(metrics)]
    columns = set(study.trials_dataframe().columns)
    assert all(f"values_{m}" in columns or f"value_{m}" in columns for m in metrics), columns
    # a resumed search names them again without a second study
    name_objectives(open_storage(url), "s", objectives)
    assert len(optuna.get_all_study_names(open_storage(url))) == 1
