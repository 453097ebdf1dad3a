"""The champion under any metric: a search that selects on ``val_loss`` (mode min) runs end to
end and registers its champion (the lowest final val_loss, evaluated once on test); a later
search whose best head scores worse registers a new version but leaves the ``champion`` alias
where it was, saying why."""

from __future__ import annotations

import yaml
from mlflow.tracking import MlflowClient

from difftune.search.cli import main
from difftune.search.records.best import best_trial
from difftune.search.records.export import trial_candidates

SPACE = """
model: demo
search: {trials: 2, seed: 1, max_concurrent: 1, grace_period: 2, metric: val_loss,
         mode: min}
fixed: {head: linear, epochs: 2, pool: 1, t: 30, momentum: 0.9, batch_size: 128}
params:
  block: {choice: [7, 10]}
  lr: {float: [0.02, 0.1], log: true}
"""
#: a far worse head: one epoch at a learning rate too small to move it
WORSE = SPACE.replace("trials: 2", "trials: 1").replace(
    "lr: {float: [0.02, 0.1], log: true}", "lr: {choice: [1.0e-06]}")


def test_val_loss_search_registers_its_champion_and_a_worse_one_keeps_the_alias(
        ray_session, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--experiment", "loss", "--tracking-uri", uri, "--storage", str(tmp_path / "runs"),
              "--cache", str(tmp_path / "cache"), "--model-name", "loss-head"]
    (tmp_path / "s.yaml").write_text(SPACE)
    assert main(["search", "--space", str(tmp_path / "s.yaml"), *common]) == 0
    out = capsys.readouterr().out
    assert "by val_loss on val" in out and "test_top1" in out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("loss")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("difftune.role") == "search"]
    assert parent.data.params["metric"] == "val_loss" and parent.data.params["mode"] == "min"
    best = best_trial(trial_candidates(client, parent, metric="val_loss"), mode="min")
    children = [r for r in runs if r.data.tags.get("difftune.role") == "trial"]
    assert best.data.data.metrics["val_loss"] == min(r.data.metrics["val_loss"] for r in children)
    first = client.get_model_version_by_alias("loss-head", "champion")
    assert first.run_id == best.key
    assert parent.data.metrics["best_val_loss"] == best.score
    champion_run = client.get_run(best.key)
    for m in ("test_top1", "test_top5", "test_loss"):  # evaluated once, on test
        assert champion_run.data.metrics[m] == parent.data.metrics[m]
    assert 50 < champion_run.data.metrics["test_top1"] <= 100
    assert first.tags["difftune.metric"] == "val_loss"

    (tmp_path / "w.yaml").write_text(WORSE)
    assert main(["search", "--space", str(tmp_path / "w.yaml"), *common]) == 0
    assert "alias kept on version" in capsys.readouterr().out
    versions = client.search_model_versions("name='loss-head'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # still registered
    assert client.get_model_version_by_alias("loss-head", "champion").version == first.version
    second = client.get_model_version("loss-head", "2")
    assert float(second.tags["difftune.score"]) > float(first.tags["difftune.score"])
    assert "alias kept on version 1" in second.tags["difftune.champion"]
    latest = max((r for r in client.search_runs([exp.experiment_id], max_results=100)
                  if r.data.tags.get("difftune.role") == "search"),
                 key=lambda r: r.info.start_time)
    assert "alias kept" in latest.data.tags["difftune.champion"]


def test_a_metric_no_trial_reports_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "demo", "search": {"metric": "train_loss"}}))
    rc = main(["search", "--space", str(bad), "--tracking-uri",
               f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "search.metric='train_loss'" in err[0] and "val_loss" in err[0]
    assert not (tmp_path / "runs").exists()
