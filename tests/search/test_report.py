"""A search's report read back from a real MLflow store: rows, champion, the block x
timestep grid, the Optuna study rebuilt from the runs, the figures (PNG + HTML), the parent
run's description, and `difftune report` on a finished and on a still-running search.

The store is written the way a search writes it (parent run with space.yaml, one nested run
per trial with its config tag, params and per-epoch metrics), without running trials."""

from __future__ import annotations

import dataclasses
import json

import matplotlib.image
import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from difftune.search.cli import main
from difftune.search.records.pareto import dominates
from difftune.search.records.tracking import TAG_CONFIG, TAG_ROLE, TAG_TRIAL, start_parent_run
from difftune.search.report.description import NOTE_TAG, note
from difftune.search.report.draw import write_figures
from difftune.search.report.figures import grid_cells
from difftune.search.report.gather import gather, trial_label
from difftune.search.report.optuna_figures import importance_params, paper_trial_number, study_of
from difftune.search.report.pareto_figure import front_of
from difftune.search.space.spec import load_space

FIGURES = ["block_timestep", "slices", "importances", "history", "cost", "curves"]
BASE = {"model": "demo", "data": "digits", "checkpoint": None, "label_fraction": None,
        "epochs": 4, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9, "step_size": 3,
        "pre_pool": 4, "depth": 1}
#: (settings, val_top1 per epoch, status)
TRIALS = [
    (dict(head="linear", block=10, t=90, pool=2, lr=0.01), [80, 88, 90, 91], "FINISHED"),
    (dict(head="linear", block=7, t=20, pool=2, lr=0.05), [85, 92, 94, 95], "FINISHED"),
    (dict(head="linear", block=7, t=30, pool=4, lr=0.02), [70, 89], "FINISHED"),
    (dict(head="linear", block=1, t=200, pool=1, lr=0.003), [60, 70, 72, 74], "FINISHED"),
    (dict(head="mlp", block=13, t=60, pool=2, lr=0.02, hidden=[256], dropout=0.1),
     [75, 85, 88, 89], "FINISHED"),
    (dict(head="attention", block=10, t=90, pool=1, lr=0.03, dim=32, heads=2,
          norm="layernorm"), [50, 66], "FINISHED"),
    (dict(head="difformer", block=3, t=300, pool=4, lr=0.04, blocks=[7, 10],
          timesteps=[10, 90], dim=32, heads=2), [60, 78, 84, 86], "FINISHED"),
    (dict(head="diffeed", block=13, t=150, pool=2, lr=0.01, feedback_blocks=[15],
          feedback_arch="C_B_R", dim=32, heads=2), [20], "FINISHED"),
    (dict(head="linear", block=19, t=400, pool=2, lr=0.08), [], "FAILED"),
    (dict(head="linear", block=5, t=100, pool=2, lr=0.01), [81], "RUNNING"),
]


def record_search(client: MlflowClient, experiment: str, *, finished: bool = True,
                  test_top1: float | None = None, plan: dict | None = None) -> str:
    """Write a search's runs as ``difftune search`` does; returns the parent run id."""
    space = load_space("demo")
    parent = start_parent_run(client, experiment, space_dict=space.resolved(), runtime={},
                              tune_path="/nowhere", model_name=f"difftune-{experiment}")
    exp_id = client.get_run(parent).info.experiment_id
    best = None
    for i, (settings, curve, status) in enumerate(TRIALS):
        if not finished and i >= 6:
            break
        config = {**BASE, **settings}
        run = client.create_run(exp_id, run_name=trial_label(config), start_time=1000 + i,
                                tags={"mlflow.parentRunId": parent, TAG_TRIAL: f"t{i}",
                                      TAG_ROLE: "trial", TAG_CONFIG: json.dumps(config)})
        rid = run.info.run_id
        metrics = [Metric("val_top1", v, 0, step) for step, v in enumerate(curve, 1)]
        metrics += [Metric("epoch", len(curve), 0, len(curve))] if curve else []
        if test_top1 is not None and i == 1:
            metrics.append(Metric("test_top1", test_top1, 0, 0))
        client.log_batch(rid, metrics=metrics,
                         params=[Param(k, str(v)) for k, v in sorted(config.items())],
                         tags=[RunTag("early_stopped", str(len(curve) < 4).lower())])
        if status != "RUNNING":
            client.set_terminated(rid, status)
        if curve and status == "FINISHED" and (best is None or curve[-1] > best[1]):
            best = (rid, curve[-1])
    if finished:
        client.set_tag(parent, "best_run_id", best[0])
        client.set_terminated(parent, "FINISHED")
    if plan is not None:
        client.log_text(parent, json.dumps(plan), "plan.json")
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    parent = record_search(client, "rep", test_top1=93.5,
                           plan={"line": "40 U-Net passes, 0.1 GPU-hours, 12 MB of cache"})
    running = record_search(client, "live", finished=False)
    return {"root": root, "uri": uri, "client": client, "parent": parent, "running": running}


@pytest.fixture(scope="module")
def data(store):
    return gather(store["client"], store["parent"])


def test_gather_reads_trials_in_order_with_scores_and_champion(data):
    assert [t.name for t in data.trials][:3] == ["linear b10 t90 p2", "linear b7 t20 p2",
                                                 "linear b7 t30 p4"]
    assert [t.status for t in data.trials].count("FAILED") == 1
    assert data.trials[2].score == 89 and data.trials[2].epochs == 2
    assert data.champion.name == "linear b7 t20 p2"
    # 89 after 2 epochs ranks before 89 after 4 (best.py's tie rule)
    assert [t.name for t in data.ranked()][:4] == ["linear b7 t20 p2", "linear b10 t90 p2",
                                                   "linear b7 t30 p4", "mlp b13 t60 p2"]
    assert set(data.histories) == {t.run_id for t in data.ranked()[:6]}
    assert data.plan == {"line": "40 U-Net passes, 0.1 GPU-hours, 12 MB of cache"}


def test_trial_labels_name_what_the_head_reads():
    assert trial_label({**BASE, "head": "linear", "block": 10, "t": 90, "pool": 2}) == \
        "linear b10 t90 p2"
    assert trial_label({**BASE, **TRIALS[5][0]}) == "attention b10 t90"
    assert trial_label({**BASE, **TRIALS[6][0]}) == "difformer b7+10 t10+90"
    assert trial_label({**BASE, **TRIALS[7][0]}) == "diffeed b13 t150"


def test_block_timestep_grid_keeps_the_best_per_cell_and_leaves_the_rest_empty(data):
    heads, blocks, rows, grids, marks, _ = grid_cells(data)
    assert heads == ["linear", "mlp", "attention", "diffeed"]  # difformer reads 2 maps
    assert blocks == list(range(1, 20))
    assert len(rows) <= 12 and rows[0][0] == 0 and rows[-1][1] == 500  # t 0..500 binned
    g = grids["linear"]
    row_of = {t: next(i for i, (lo, hi) in enumerate(rows) if lo <= t <= hi) for t in (20, 30)}
    assert row_of[20] == row_of[30]  # t 20 and 30 share a bin: the better trial wins
    assert g[row_of[20], blocks.index(7)] == 95
    assert int(np.sum(~np.isnan(g))) == 3  # the failed and the running trial are not cells
    assert marks == {"linear": (row_of[20], blocks.index(7))}


def test_the_cost_figure_front_is_the_pareto_rule_on_score_and_gflops(data):
    f = front_of(data)
    assert f.x_metric == "gflops"
    assert len(f.points) == 8  # the finished trials; none reported gflops: counted here
    assert all(x > 0 for x, _, _ in f.points)
    modes = ["max", "min"]
    front = [(f.points[i][1], f.points[i][0]) for i in f.front]
    assert all(a == b or not dominates(a, b, modes) for a in front for b in front)
    for i, (x, y, _) in enumerate(f.points):
        assert i in f.front or any(dominates(p, (y, x), modes) for p in front)
    # the best score is on the front: nothing beats it on score
    assert max(y for _, y, _ in f.points) == front[0][0]


def test_grid_trials_read_as_their_best_head_and_confirm_runs_stay_apart(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    space = load_space("demo_grid")  # lr: a grid in every trial
    parent = start_parent_run(client, "conf", space_dict=space.resolved(), runtime={},
                              tune_path="/nowhere", model_name="difftune-conf")
    exp_id = client.get_run(parent).info.experiment_id
    configs = [{**BASE, "head": "linear", "block": 10, "t": 90, "pool": 2, "lr": 0.01},
               {**BASE, "head": "linear", "block": 7, "t": 20, "pool": 2, "lr": 0.01}]
    runs = []
    for i, (config, score, tags) in enumerate([
            (configs[0], 90.0, {"grid_best": json.dumps({"lr": 0.1})}),
            (configs[1], 88.0, {}),
            ({**configs[0], "label_fraction": 1.0}, 96.0, {"difftune.stage": "confirm"})]):
        run = client.create_run(exp_id, start_time=1000 + i, tags={
            "mlflow.parentRunId": parent, TAG_TRIAL: f"t{i}", TAG_ROLE: "trial",
            TAG_CONFIG: json.dumps(config), **tags})
        client.log_batch(run.info.run_id, metrics=[Metric("val_top1", score, 0, 4),
                                                   Metric("epoch", 4, 0, 4)])
        client.set_terminated(run.info.run_id, "FINISHED")
        runs.append(run.info.run_id)
    client.set_tag(parent, "best_run_id", runs[2])  # the champion: the confirmed run
    client.log_metric(parent, "confirm_spearman", 1.0)
    client.set_terminated(parent, "FINISHED")
    data = gather(client, parent)
    assert [t.run_id for t in data.trials] == runs[:2]
    assert data.trials[0].config["lr"] == 0.1  # the grid's best head
    assert [(c.run_id, c.confirms) for c in data.confirmed] == [(runs[2], runs[0])]
    assert data.champion.run_id == runs[0] and data.champion_confirmed.run_id == runs[2]
    study = study_of(data)  # the grid's best lr shown in slices, not weighed by fANOVA
    assert [t.params["lr"] for t in study.trials] == [0.1, 0.01]
    assert "lr" not in importance_params(study)[0]
    _, blocks, rows, _, marks, _ = grid_cells(data)  # marked on the trial it retrained
    assert marks == {"linear": (next(i for i, (lo, hi) in enumerate(rows) if lo <= 90 <= hi),
                                blocks.index(10))}
    text = note(data, [])
    assert "**Champion**: linear b10 t90 p2: val top-1 96.00% (confirmed)" in text
    assert "**Confirmed** (the top 1 retrained on all labels; val top-1 in the search -> " \
        "confirmed): linear b10 t90 p2 90.00 -> 96.00; Spearman 1.00." in text


def test_study_rebuilt_from_runs_drops_settings_a_head_does_not_read(data):
    study = study_of(data)
    by_run = {t.user_attrs["run_id"]: t for t in study.trials}
    assert len(study.trials) == 9  # every trial but the running one
    assert [t.state.name for t in study.trials].count("FAIL") == 1
    attention = by_run[data.trials[5].run_id]
    assert "pool" not in attention.params and attention.params["attention:dim"] == 32
    difformer = by_run[data.trials[6].run_id]
    assert "block" not in difformer.params and "t" not in difformer.params
    assert by_run[data.trials[0].run_id].params["pool"] == 2
    assert paper_trial_number(data, study) == 0
    params, n = importance_params(study)
    assert {"lr", "head"} <= set(params) and "pool" not in params and n >= 6


def test_write_figures_draws_png_and_html_of_each(data, tmp_path):
    names = write_figures(data, out_dir=tmp_path)
    assert names == FIGURES
    for name in names:
        h, w = matplotlib.image.imread(tmp_path / f"{name}.png").shape[:2]
        assert w >= 800 and h >= 300
        html = (tmp_path / f"{name}.html").read_text()
        assert "plotly" in html and "search-" in html
    assert (tmp_path / "plotly.min.js").is_file()  # the pages open without a network


def test_note_reports_space_plan_champion_table_and_figures(data):
    text = note(data, FIGURES)
    assert "(finished)" in text.splitlines()[0]
    assert "**Plan**: 40 U-Net passes, 0.1 GPU-hours, 12 MB of cache" in text
    assert "**Champion**: linear b7 t20 p2: val top-1 95.00%, test top-1 93.50%" in text
    assert "`difftune-rep@champion`" in text
    table = [x for x in text.splitlines() if x.startswith("| ")]
    assert table[0].startswith("| # | trial | head | block | t |") and table[0].endswith(
        "test top-1 (%) |")
    assert table[1].startswith("| 1 | [linear b7 t20 p2](#/experiments/")
    assert len(table) == 1 + 5
    assert ("best score per block x timestep ([png](get-artifact?path=figures%2F"
            f"block_timestep.png&run_uuid={data.parent_run_id})") in text


def test_note_of_a_running_search_without_plan_or_test(store):
    data = gather(store["client"], store["running"])
    text = note(data, [])
    assert "(running)" in text.splitlines()[0]
    assert "Plan" not in text and "test top-1 not measured" in text
    assert "**Best so far**" in text and "Figures" not in text


def test_cmd_report_draws_a_running_search_into_a_folder(store, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["report", "live", "--tracking-uri", store["uri"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(running, 6 of 6 trials finished)" in printed
    assert {p.name for p in out.glob("*.png")} == {f"{n}.png" for n in FIGURES}
    assert "(running)" in (out / "report.md").read_text()


def test_cmd_report_update_run_puts_figures_and_note_on_the_parent(store, tmp_path):
    client, parent = store["client"], store["parent"]
    assert main(["report", "rep", "--tracking-uri", store["uri"], "--out",
                 str(tmp_path / "f"), "--update-run"]) == 0
    files = {f.path for f in client.list_artifacts(parent, "figures")}
    assert files == {f"figures/{n}.{ext}" for n in FIGURES for ext in ("png", "html")}
    assert client.get_run(parent).data.tags[NOTE_TAG].startswith("### difftune search")


def test_cmd_report_of_unknown_experiment_or_run_is_one_clear_error(store, tmp_path, capsys):
    assert main(["report", "nope", "--tracking-uri", store["uri"]]) == 2
    assert "report 'nope': no such experiment" in capsys.readouterr().err
    assert main(["report", "rep", "--tracking-uri", store["uri"], "--run", "0" * 32]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run" in err[0]


def test_live_report_redraws_in_the_background_at_a_bounded_rate(store):
    import pickle

    from difftune.search.report.publish import LiveReport

    client, parent = store["client"], store["running"]
    report = LiveReport(store["uri"], parent, min_s=3600)
    assert report.poke(1) is False  # one finished trial draws nothing yet
    assert report.poke(2) is True
    assert report.poke(3) is False  # a redraw is in flight / the next one is an hour away
    report.stop()
    assert report.redraws == 1
    assert len(client.list_artifacts(parent, "figures")) == 12
    assert "(running)" in client.get_run(parent).data.tags[NOTE_TAG]
    restored = pickle.loads(pickle.dumps(report))  # as Tune keeps its callbacks
    assert restored._next == 0.0 and restored._proc is None  # a resumed driver starts afresh


def test_with_rungs_a_cell_holds_the_score_measured_on_the_most_images(data):
    """A trial stopped at rung 0 (a score on a small sample) loses its cell to a trial of
    the same cell that went on to a later rung, however high its score."""
    early, late = (next(t for t in data.trials if t.name == n)
                   for n in ("linear b7 t20 p2", "linear b7 t30 p4"))
    rungs = dataclasses.replace(data, trials=[
        dataclasses.replace(t, metrics={**t.metrics, "image_rung": 0 if t is early else 2})
        for t in data.trials])
    _, blocks, rows, grids, _, cell_rungs = grid_cells(rungs)
    r = next(i for i, (lo, hi) in enumerate(rows) if lo <= 20 <= hi)
    assert early.score > late.score
    assert grids["linear"][r, blocks.index(7)] == late.score
    assert cell_rungs["linear"][r, blocks.index(7)] == 2
