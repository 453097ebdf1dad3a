"""The demo search end to end on a real local Ray and a real sqlite MLflow store: parent
run, nested child runs, the champion (chosen on val, evaluated once on test), export -> train
reproducing the best trial, and a bad space leaving the store untouched; the figures and
report on the parent run, the Optuna study where optuna-dashboard reads it, and what the
terminal shows."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from difftune.search.cli import main
from difftune.search.records.best import best_trial
from difftune.search.records.export import trial_candidates

TRIALS = 3
EPOCHS = 2


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    """One small demo search shared by the tests of this module."""
    root = tmp_path_factory.mktemp("search")
    uri = f"sqlite:///{root}/mlflow.db"
    out, err = io.StringIO(), io.StringIO()
    os.environ["DIFFTUNE_PROGRESS_S"] = "0"  # every extraction says its progress
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["search", "--trials", str(TRIALS), "--set", f"epochs={EPOCHS}",
                       "--experiment", "e2e", "--tracking-uri", uri, "--storage",
                       str(root / "runs"), "--cache", str(root / "cache"), "--model-name",
                       "e2e-head"])
    finally:
        del os.environ["DIFFTUNE_PROGRESS_S"]
    assert rc == 0, err.getvalue()[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("difftune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("difftune.role") == "trial"]
    best = best_trial(trial_candidates(client, parents[0], metric="val_top1"), mode="max")
    return {"root": root, "uri": uri, "client": client, "parents": parents,
            "children": children, "best": best.data, "out": out.getvalue(),
            "err": err.getvalue()}


def test_parent_run_records_the_search(searched):
    (parent,) = searched["parents"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space"] == "demo"
    assert parent.data.params["model"] == "demo" and parent.data.params["data"] == "digits"
    assert parent.data.params["trials"] == str(TRIALS)
    files = {f.path for f in searched["client"].list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "best_config.yaml"} <= files


def test_one_nested_child_run_per_trial(searched):
    (parent,) = searched["parents"]
    children = searched["children"]
    assert len(children) == TRIALS
    assert len({c.data.tags["difftune.trial_id"] for c in children}) == TRIALS
    client = searched["client"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        params = set(child.data.params)
        assert {"head", "lr"} <= params
        reads = {"linear": {"block", "t", "pool"}, "mlp": {"block", "t", "pool", "hidden"},
                 "attention": {"block", "t", "dim"}, "difformer": {"blocks", "timesteps"},
                 "diffeed": {"block", "t", "feedback_blocks"}}[child.data.params["head"]]
        assert reads <= params
        assert not {"block", "t", "pool"} - reads & params  # only what the head reads
        history = client.get_metric_history(child.info.run_id, "val_top1")
        stopped = child.data.tags["early_stopped"] == "true"
        assert len(history) < EPOCHS if stopped else len(history) == EPOCHS
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        # the run's val_top1 is its last epoch's (final_val_top1 repeats it); top-1 never
        # exceeds top-5
        assert child.data.metrics["val_top1"] == history[-1].value
        assert child.data.metrics["final_val_top1"] == history[-1].value
        assert child.data.metrics["val_top1"] <= child.data.metrics["val_top5"]
        assert child.data.tags["hostname"]


def test_paper_config_was_enqueued(searched):
    """The paper's config (lr exactly 0.01: a sampled log-uniform lr never is) ran once."""
    configs = [json.loads(r.data.tags["difftune.config"]) for r in searched["children"]]
    paper = [c for c in configs
             if (c["head"], c.get("block"), c.get("t"), c.get("pool"), c["lr"])
             == ("linear", 10, 90, 2, 0.01)]
    assert len(paper) == 1


def test_champion_alias_points_at_the_best_child(searched, tmp_path):
    client = searched["client"]
    best = searched["best"]
    assert best.data.metrics["val_top1"] == max(r.data.metrics["val_top1"]
                                                for r in searched["children"])
    version = client.get_model_version_by_alias("e2e-head", "champion")
    assert version.run_id == best.info.run_id
    mlflow.set_tracking_uri(searched["uri"])
    # registered: the image classifier; beside it on the run, the bare head
    assert mlflow.models.get_model_info("models:/e2e-head@champion").signature is not None
    from difftune.search.records.champion import load_logged_head

    head, _, _ = load_logged_head(client, version.run_id, dest=tmp_path)  # nothing unpickled
    cfg = json.loads(best.data.tags["difftune.config"])
    assert head.key == (cfg["t"], cfg["block"])
    norm = head.norm if hasattr(head, "norm") else head.net[0]  # linear or MLP head
    head.eval()
    assert head({head.key: torch.randn(4, norm.num_features, 1, 1)}).shape == (4, 10)


def test_champion_and_parent_carry_test_top1_and_only_the_champion_saw_test(searched):
    (parent,) = searched["parents"]
    champion = searched["client"].get_run(searched["best"].info.run_id)
    for m in ("test_top1", "test_top5"):
        assert champion.data.metrics[m] == parent.data.metrics[m]
    assert 50 < parent.data.metrics["test_top1"] <= 100
    assert parent.data.metrics["best_val_top1"] == champion.data.metrics["val_top1"]
    others = [r for r in searched["children"] if r.info.run_id != champion.info.run_id]
    assert others and not any(k.startswith("test_") for r in others for k in r.data.metrics)


def test_export_then_train_reproduces_the_best_val_top1(searched, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    assert main(["export", "--experiment", "e2e", "--tracking-uri", searched["uri"],
                 "--out", str(out), "--top", "2"]) == 0
    import yaml

    exported = yaml.safe_load(out.read_text())
    assert [c["rank"] for c in exported["configs"]] == [1, 2]
    assert exported["configs"][0]["val_top1"] >= exported["configs"][1]["val_top1"]
    best = searched["best"]
    assert exported["configs"][0]["run_id"] == best.info.run_id
    capsys.readouterr()
    assert main(["train", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    # printed with 2 decimals; one val image is 0.28 points, so this is an exact match
    assert line[0] == "val_top1" and line[6] == "test_top1"
    assert float(line[1]) == pytest.approx(best.data.metrics["val_top1"], abs=0.006)
    assert float(line[7]) == pytest.approx(best.data.metrics["test_top1"], abs=0.006)


def test_bad_space_changes_nothing(searched, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: demo\nparams:\n  block: {int: [0, 19]}\n")
    before = len(searched["client"].search_runs(
        [e.experiment_id for e in searched["client"].search_experiments()], max_results=1000))
    capsys.readouterr()
    rc = main(["search", "--space", str(bad), "--experiment", "bad", "--tracking-uri",
               searched["uri"], "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "block 0 is out of range" in err[0]
    assert searched["client"].get_experiment_by_name("bad") is None
    after = len(searched["client"].search_runs(
        [e.experiment_id for e in searched["client"].search_experiments()], max_results=1000))
    assert after == before
    assert not (tmp_path / "runs").exists()


def test_export_of_unknown_experiment_is_one_clear_error(searched, tmp_path, capsys):
    rc = main(["export", "--experiment", "nope", "--tracking-uri", searched["uri"],
               "--out", str(tmp_path / "x.yaml")])
    assert rc == 2
    assert "--experiment 'nope': no such experiment" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_resume_of_a_finished_search_changes_nothing(searched, capsys):
    client, uri = searched["client"], searched["uri"]
    (parent,) = searched["parents"]
    versions = client.search_model_versions("name='e2e-head'")
    alias = client.get_model_version_by_alias("e2e-head", "champion").version
    runs = client.search_runs([parent.info.experiment_id], max_results=1000)
    capsys.readouterr()
    assert main(["search", "--resume", "e2e", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing to resume: the latest search of experiment 'e2e'")
    assert len(client.search_model_versions("name='e2e-head'")) == len(versions)
    assert client.get_model_version_by_alias("e2e-head", "champion").version == alias
    again = client.get_run(parent.info.run_id).info
    assert (again.status, again.end_time) == ("FINISHED", parent.info.end_time)
    assert len(client.search_runs([parent.info.experiment_id], max_results=1000)) == len(runs)


def test_the_closing_export_command_runs_as_printed(searched, tmp_path):
    """The follow-up printed after a search, pasted into a shell, works."""
    import subprocess
    import sys

    from difftune.search.cli.search import follow_up

    line = follow_up(searched["uri"], "e2e").splitlines()[1]
    command = line.split(":", 1)[1].strip()
    assert command.startswith("difftune export --experiment e2e --tracking-uri ")
    python = f"{sys.executable} -m difftune"  # `difftune` of this environment
    done = subprocess.run(["bash", "-c", command.replace("difftune", python, 1)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "best.yaml").is_file()


FIGURES = ["block_timestep", "slices", "importances", "history", "cost", "curves"]


def test_parent_run_shows_the_figures_and_reads_as_a_report(searched):
    (parent,) = searched["parents"]
    client = searched["client"]
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert files == {f"figures/{n}.{ext}" for n in FIGURES for ext in ("png", "html")}
    note = client.get_run(parent.info.run_id).data.tags["mlflow.note.content"]
    best = max(searched["children"], key=lambda r: r.data.metrics["val_top1"])
    assert "(finished)" in note.splitlines()[0] and "**Space** `demo`" in note
    assert f"**Champion**: {best.info.run_name}: val top-1 " in note
    assert "`difftune-e2e@champion`" not in note and "`e2e-head@champion`" in note
    assert re.search(r"^\| 1 \| \[", note, re.M)


def test_trial_runs_are_named_by_head_block_and_timestep(searched):
    for child in searched["children"]:
        cfg = json.loads(child.data.tags["difftune.config"])
        assert child.info.run_name.startswith(f"{cfg['head']} b"), child.info.run_name
        assert re.fullmatch(r"[a-z]+ b[\d+]+ t[\d+]+( p\d+)?", child.info.run_name)


def test_optuna_study_is_where_the_dashboard_reads_it(searched):
    import optuna

    (parent,) = searched["parents"]
    url = parent.data.tags["difftune.optuna_storage"]
    assert url == f"sqlite:///{searched['root']}/optuna.db"  # beside the tracking store
    storage = optuna.storages.RDBStorage(url)
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.study_name == parent.data.tags["difftune.optuna_study"]
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert len(trials) == TRIALS
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert "optuna-dashboard " + url in searched["out"]


def test_experiment_opens_on_its_runs_with_the_key_columns(searched):
    client = searched["client"]
    exp = client.get_experiment_by_name("e2e")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = searched["parents"]
    link = re.search(r"this search's trials: +(\S+)", searched["out"])[1]
    key = re.search(r"viewStateShareKey=(\w+)", link)[1]
    assert "workflowType=machine_learning" in link
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{key}"])
    assert parent.info.run_id in view["searchFilter"]
    assert view["orderByKey"] == "metrics.`val_top1`" and view["orderByAsc"] is False
    assert view["selectedColumns"][:4] == ["params.`head`", "params.`block`", "params.`t`",
                                           "params.`pool`"]


def test_terminal_shows_trials_and_progress_not_library_noise(searched):
    lines = (searched["out"] + searched["err"]).splitlines()
    assert len(lines) < 60, "\n".join(lines)
    text = "\n".join(lines)
    for noise in ("snapshotting", "TensorBoard", "Token authentication", "Configuration for"):
        assert noise not in text
    assert len([x for x in lines if re.search(r"  done [1-3]/3  ", x)]) == TRIALS
    assert re.search(r"extract train t=\d+ \(\d+ blocks\): [\d,]+ images in \S+, [\d,]+ img/s",
                     text)
    assert re.search(r"figures \(6, \.png \+ \.html\): +on the search's run", text)
    log = re.search(r"log of this search: +(\S+)", text)[1]
    kept = open(log).read()  # what the terminal did not show is in the log file
    assert "Configuration for experiment" in kept  # Ray Tune's header, printed to stdout
