"""Search on a subset, confirm on all the data: a demo search at 0.2 of the labels whose top
2 configs are retrained on all of them as child runs tagged ``difftune.stage=confirm``, each
evaluated once on test; the champion is the best confirmed one by val, by the same rule as
everything else."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from difftune.search.cli import main
from difftune.search.records.best import Candidate, rank_trials
from difftune.search.run.confirm import spearman

SPACE = """
model: demo
data: digits
label_fraction: 0.2
search: {trials: 3, seed: 0, max_concurrent: 2, grace_period: 2, cpus_per_trial: 1,
         cache_pool: 4, max_failures: 0, confirm_top: 2}
fixed: {head: linear, epochs: 2, batch_size: 64, optimizer: sgd, momentum: 0.9}
params:
  block: {int: [5, 12]}
  t: {choice: [10, 90]}
  pool: {choice: [1, 2]}
  lr: {float: [0.01, 0.1], log: true}
"""


@pytest.fixture(scope="module")
def confirmed(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("confirm")
    (root / "space.yaml").write_text(SPACE)
    uri = f"sqlite:///{root}/mlflow.db"
    rc = main(["search", "--space", str(root / "space.yaml"), "--experiment", "confirm",
               "--tracking-uri", uri, "--storage", str(root / "runs"),
               "--cache", str(root / "cache"), "--model-name", "confirm-head"])
    assert rc == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("confirm")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return {"uri": uri, "client": client, "root": root,
            "parent": next(r for r in runs if r.data.tags.get("difftune.role") == "search"),
            "search": [r for r in runs if r.data.tags.get("difftune.stage") == "search"],
            "confirm": [r for r in runs if r.data.tags.get("difftune.stage") == "confirm"]}


def config(run) -> dict:
    return json.loads(run.data.tags["difftune.config"])


def test_the_top_configs_are_retrained_on_all_labels(confirmed):
    parent = confirmed["parent"]
    assert len(confirmed["search"]) == 3 and len(confirmed["confirm"]) == 2
    for r in confirmed["confirm"]:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED" and config(r)["label_fraction"] is None
        assert int(r.data.metrics["epoch"]) == 2
    # the top 2 of the search by the one rule, settings other than the labels unchanged
    ranked = rank_trials([Candidate(key=r.info.run_id, order=r.info.start_time,
                                    score=r.data.metrics.get("val_top1"),
                                    epochs=int(r.data.metrics.get("epoch", 0)), data=r)
                          for r in confirmed["search"]], mode="max")
    top = [{**config(c.data), "label_fraction": None} for c in ranked[:2]]
    assert sorted(map(json.dumps, top)) == sorted(json.dumps(config(r))
                                                  for r in confirmed["confirm"])
    for r in confirmed["search"]:
        assert config(r)["label_fraction"] == 0.2
    assert parent.data.tags["difftune.cache_policy"] == "block-set"


def test_the_champion_is_the_best_confirmed_config(confirmed, tmp_path):
    client = confirmed["client"]
    best = max(confirmed["confirm"], key=lambda r: r.data.metrics["val_top1"])
    version = client.get_model_version_by_alias("confirm-head", "champion")
    assert version.run_id == best.info.run_id
    parent = client.get_run(confirmed["parent"].info.run_id)
    assert parent.data.tags["best_run_id"] == best.info.run_id
    # every confirmed config is evaluated once on test, no search trial is; the parent run
    # holds the champion's test figures
    for r in confirmed["confirm"]:
        assert r.data.metrics["test_top1"] > 50 and "test_loss" in r.data.metrics  # chance: 10
    assert not any("test_top1" in r.data.metrics for r in confirmed["search"])
    assert parent.data.metrics["test_top1"] == best.data.metrics["test_top1"]
    assert parent.info.status == "FINISHED"
    out = tmp_path / "best.yaml"
    assert main(["export", "--experiment", "confirm", "--tracking-uri", confirmed["uri"],
                 "--out", str(out)]) == 0
    import yaml

    assert yaml.safe_load(out.read_text())["configs"][0]["run_id"] == best.info.run_id


def test_plan_json_is_on_the_parent_run(confirmed):
    client = confirmed["client"]
    parent = confirmed["parent"].info.run_id
    files = {f.path for f in client.list_artifacts(parent)}
    assert "plan.json" in files
    path = client.download_artifacts(parent, "plan.json", str(confirmed["root"]))
    with open(path) as f:
        plan = json.load(f)
    assert plan["policy"] == "block-set" and plan["confirm"]["top"] == 2
    assert plan["confirm"]["train_rows"] == 1078  # all of digits' train split (60 %)
    runtime = json.loads(confirmed["parent"].data.tags["difftune.runtime"])
    assert set(runtime["data_files"]) == {"train", "val", "test"}  # test: its evaluation


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
