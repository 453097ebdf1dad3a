"""The champion under any metric: a search that selects on ``val_loss`` (mode min) runs end to
end and registers its champion (the lowest final val_loss, evaluated once on test); a later
search whose best head scores worse registers a new version but leaves the ``champion`` alias
where it was, saying why."""

from __future__ import annotations

import pytest
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


def _forbid_unpickling(monkeypatch) -> None:
    """Every way a pickle is read (``torch.load(weights_only=False)`` subclasses
    ``pickle.Unpickler``; cloudpickle loads through pickle) raises from here on."""
    import pickle

    class Forbidden(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            raise AssertionError("unpickling is forbidden here")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling is forbidden here")

    monkeypatch.setattr(pickle, "Unpickler", Forbidden)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_every_artifact_of_the_champion_loads_without_unpickling(tmp_path, monkeypatch):
    """The champion in a real sqlite store: the bare head is a head checkpoint (state_dict +
    spec), every .pt loads with weights_only=True, nothing is a pickled model, the package
    and the demo U-Net are logged once; with unpickling forbidden, the bare head and the
    registered classifier load and agree with the head that was logged."""

    import mlflow
    import numpy as np
    import torch

    from difftune.search.records.champion import HEAD_ARTIFACT, load_logged_head, log_champion
    from difftune.trainables.config import TrialConfig
    from difftune.trainables.data.datasets import load_dataset
    from difftune.trainables.heads import build_head
    from difftune.trainables.heads.checkpoint import save_head
    from difftune.trainables.model.classify import classify
    from difftune.trainables.model.features import block_shapes
    from difftune.trainables.model.unet import shared_unet

    cfg = TrialConfig(head="linear", block=10, t=30, pool=2, epochs=1)
    unet = shared_unet("demo", None)
    shapes = {(30, 10): (block_shapes(unet[0])[10][0], 2, 2)}
    torch.manual_seed(0)
    head = build_head(cfg, shapes, 10).eval()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    save_head(tmp_path / "ckpt", head, cfg, epoch=1, shapes=shapes, num_classes=10,
              optimizer=opt, scheduler=sched)  # as a trial writes it: optimizer state too
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("c", artifact_location=str(tmp_path / "artifacts"))
    parent, child = (client.create_run(exp).info.run_id for _ in range(2))
    log_champion(client, tracking_uri=uri, parent_run_id=parent, best_run_id=child,
                 checkpoint_dir=str(tmp_path / "ckpt"), model_name="c",
                 best_config=cfg.to_dict(), metric_value=0.0)

    # what the champion's run holds: its artifacts and the models logged from it
    mlflow.set_tracking_uri(uri)
    local = tmp_path / "all"
    client.download_artifacts(child, "", str(local))
    models = mlflow.search_logged_models(experiment_ids=[exp], output_format="list",
                                         filter_string=f"source_run_id = '{child}'")
    assert [m.name for m in models] == ["classifier"]  # no pickled "head" model beside it
    for m in models:
        mlflow.artifacts.download_artifacts(f"models:/{m.model_id}", dst_path=str(local / m.name))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert {f"{HEAD_ARTIFACT}/head.pt", f"{HEAD_ARTIFACT}/meta.json"} <= set(files)
    assert not [f for f in files if f.endswith((".pth", ".pkl", ".pickle"))], files
    assert not [f for f in files if f.startswith("head/")], files  # no pytorch-flavor model
    weights = [f for f in files if f.endswith(".pt")]
    for f in weights:
        torch.load(local / f, map_location="cpu", weights_only=True)
    state = torch.load(local / HEAD_ARTIFACT / "head.pt", weights_only=True)
    assert set(state) == {"head"}  # the head alone: no optimizer state
    # one copy of the package and of the demo U-Net per search
    assert [f for f in files if f.endswith("difftune/__init__.py")] == \
        ["classifier/code/difftune/__init__.py"], files
    assert [f for f in files if f.endswith("demo_unet.pt")] == \
        ["classifier/artifacts/unet/demo_unet.pt"], files
    assert sum((local / f).stat().st_size for f in files) < 12e6

    _forbid_unpickling(monkeypatch)
    with pytest.raises(AssertionError, match="forbidden"):  # the guard holds
        torch.load(local / HEAD_ARTIFACT / "head.pt", weights_only=False)
    loaded, loaded_cfg, _ = load_logged_head(client, child, dest=tmp_path / "head")
    assert loaded_cfg == cfg
    x = {(30, 10): torch.randn(5, *shapes[(30, 10)])}
    assert torch.equal(loaded(x), head(x))
    val, _ = load_dataset("digits", split="val", image_size=16)
    images = torch.stack([val[i][0] for i in range(4)])
    table = mlflow.pyfunc.load_model("models:/c@champion").predict(images.numpy())
    expected = classify(unet, head, cfg, images)
    assert np.allclose(table.probability, expected.max(dim=1).values.numpy(), atol=1e-5)
