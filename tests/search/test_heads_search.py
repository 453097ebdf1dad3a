"""A short demo search restricted to each of the attention, DifFormer and DifFeed heads
completes and is recorded in MLflow, champion included."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from difftune.search.cli import main


@pytest.mark.parametrize("head", ["attention", "difformer", "diffeed"])
def test_demo_search_with_one_head(ray_session, tmp_path, head):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["search", "--set", f"head={head}", "--set", "epochs=2", "--set", "batch_size=16", "--set",
               "label_fraction=0.3", "--set", "lr=0.05", "--trials", "1", "--experiment", head,
               "--tracking-uri", uri, "--storage", str(tmp_path / "runs"),
               "--cache", str(tmp_path / "cache")])
    assert rc == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(head)
    (child,) = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("difftune.role") == "trial"]
    assert child.info.status == "FINISHED"
    assert json.loads(child.data.tags["difftune.config"])["head"] == head
    assert child.data.params["head"] == head
    assert child.data.metrics["val_top1"] > 10  # better than chance on 10 classes
    version = client.get_model_version_by_alias(f"difftune-{head}", "champion")
    assert version.run_id == child.info.run_id
