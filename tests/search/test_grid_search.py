"""A demo search with a 5-point learning-rate grid inside each trial, end to end on a real
local Ray and a real sqlite MLflow store: every trial's run holds the per-head table, the
best grid point and the best head's metrics; the champion and the trial checkpoints hold the
best head alone as a plain head; export -> train reproduces the best head's val top-1."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from difftune.search.cli import main
from difftune.search.records.champion import load_logged_head
from difftune.trainables.heads.checkpoint import GRID_FILE, load_head, read_resume_state

LRS = [0.001, 0.003, 0.01, 0.03, 0.1]
TRIALS = 2
EPOCHS = 2


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    uri = f"sqlite:///{root}/mlflow.db"
    assert main(["search", "--space", "demo_grid", "--trials", str(TRIALS),
                 "--set", f"epochs={EPOCHS}", "--experiment", "grid", "--tracking-uri", uri,
                 "--storage", str(root / "runs"), "--cache", str(root / "cache")]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("grid")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("difftune.role") == "trial"]
    return {"root": root, "uri": uri, "client": client, "exp": exp, "trials": trials}


def test_each_trial_run_has_the_per_head_table_and_its_best_point(searched):
    client, trials = searched["client"], searched["trials"]
    assert len(trials) == TRIALS
    for run in trials:
        assert run.info.status == "FINISHED"
        table = client.load_table(searched["exp"].experiment_id, "grid_results.json",
                                  run_ids=[run.info.run_id])
        rows = table.to_dict("records")
        assert [r["lr"] for r in rows] == LRS and [r["index"] for r in rows] == list(range(5))
        done = int(run.data.metrics["epoch"])
        assert all(r["epoch"] == done for r in rows)
        # the run reports the best head: the best val top-1 of the table, ties to the earlier
        best = max(range(5), key=lambda i: (rows[i]["val_top1"], -i))
        point = json.loads(run.data.tags["grid_best"])
        assert point == {"lr": LRS[best]} and run.data.params["grid_best.lr"] == str(LRS[best])
        assert run.data.metrics["grid_index"] == best
        assert run.data.metrics["val_top1"] == pytest.approx(rows[best]["val_top1"])
        assert run.data.metrics["gflops"] == pytest.approx(rows[best]["gflops"])
        assert run.data.tags["grid_size"] == "5"
        history = client.get_metric_history(run.info.run_id, "grid_index")
        assert [m.step for m in history] == list(range(1, done + 1))


def test_checkpoints_and_the_champion_hold_the_best_head_alone(searched, tmp_path):
    client = searched["client"]
    version = client.get_model_version_by_alias("difftune-grid", "champion")
    best = max(searched["trials"], key=lambda r: r.data.metrics["val_top1"])
    assert version.run_id == best.info.run_id
    files = {f.path for f in client.list_artifacts(best.info.run_id, "head_checkpoint")}
    assert files == {"head_checkpoint/head.pt", "head_checkpoint/meta.json"}  # no grid.pt
    ckpt = client.download_artifacts(best.info.run_id, "head_checkpoint", str(tmp_path))
    head, cfg, _ = load_head(ckpt)
    assert cfg.lr == json.loads(best.data.tags["grid_best"])["lr"]
    mlflow.set_tracking_uri(searched["uri"])
    champion, _, _ = load_logged_head(client, version.run_id, dest=tmp_path / "logged")
    x = {k: torch.randn(3, *s) for k, s in
         ((tuple(k), tuple(v)) for k, v in json.loads(
             (tmp_path / "head_checkpoint" / "meta.json").read_text())["shapes"])}
    assert torch.equal(champion(x), head(x))
    # evaluated once on test as that plain head (what the checkpoint holds), on its run and
    # the parent's
    from difftune.trainables.cache.feature_cache import FeatureCache
    from difftune.trainables.pipeline import evaluate_on

    tested = client.get_run(best.info.run_id).data.metrics
    parent = client.get_run(best.data.tags["mlflow.parentRunId"]).data.metrics
    again = evaluate_on(head, cfg, "test", source=FeatureCache(str(searched["root"] / "cache")))
    assert tested["test_top1"] == pytest.approx(again["test_top1"])
    assert parent["test_top1"] == tested["test_top1"]
    assert not any("test_top1" in r.data.metrics for r in searched["trials"] if r is not best)
    # the registered classifier wraps that head: one label per image
    table = mlflow.pyfunc.load_model("models:/difftune-grid@champion").predict(
        torch.rand(2, 3, 16, 16).mul(2).sub(1).numpy())
    assert len(table) == 2 and list(table.columns) == ["label", "probability"]
    # Tune's own checkpoints of the trials also hold every head, to resume the grid
    states = [read_resume_state(f.parent) for f in (searched["root"] / "runs").rglob(GRID_FILE)]
    assert len(states) == TRIALS  # one kept per trial
    for state in states:
        assert 1 <= state["epoch"] <= EPOCHS and len(state["extra"]["active"]) == len(LRS)
        assert len({k.split(".")[1] for k in state["heads"]}) == len(LRS)


def test_export_then_train_reproduces_the_best_heads_val_top1(searched, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    assert main(["export", "--experiment", "grid", "--tracking-uri", searched["uri"],
                 "--out", str(out)]) == 0
    entry = yaml.safe_load(out.read_text())["configs"][0]
    best = max(searched["trials"], key=lambda r: r.data.metrics["val_top1"])
    assert entry["run_id"] == best.info.run_id
    assert entry["config"]["lr"] == json.loads(best.data.tags["grid_best"])["lr"]
    capsys.readouterr()
    assert main(["train", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # one val image is 0.28 points: printed with 2 decimals, this is an exact match
    assert float(line.split()[1]) == pytest.approx(best.data.metrics["val_top1"], abs=0.006)
