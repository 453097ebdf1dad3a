"""Accuracy against cost: the Pareto front of a two-objective demo search (val top-1 up,
GFLOPs per image down) on a real local Ray and a real sqlite MLflow store, recorded on the
search run and written by ``export --pareto``."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from difftune.search.cli import main
from difftune.search.records.pareto import dominates, front_rows, pareto_front

OBJECTIVES = [{"metric": "val_top1", "mode": "max"}, {"metric": "gflops", "mode": "min"}]
SPACE = """
model: demo
data: digits
search: {trials: 6, seed: 1, max_concurrent: 2, cpus_per_trial: 1, cache_pool: 4,
         objectives: [{metric: val_top1, mode: max}, {metric: gflops, mode: min}]}
fixed: {head: linear, epochs: 1, batch_size: 64, momentum: 0.9, lr: 0.05}
params:
  block: {int: [1, 19]}
  t: {choice: [10, 90]}
  pool: {choice: [1, 2]}
"""


def test_dominance_and_the_front():
    modes = ["max", "min"]
    assert dominates([90, 1.0], [89, 1.0], modes) and dominates([90, 0.5], [90, 1.0], modes)
    assert not dominates([90, 1.0], [90, 1.0], modes)  # equal: neither dominates
    assert not dominates([91, 2.0], [90, 1.0], modes)  # a trade-off
    values = [[90, 1.0], [95, 3.0], [90, 1.0], [80, 2.0], [70, 0.1], [None, 0.01],
              [float("nan"), 0.01]]
    # best first by the first objective; equal points both stay; unscored rows are out
    assert pareto_front(values, modes) == [1, 0, 2, 4]
    assert pareto_front([[1.0, 1.0], [2.0, 2.0]], ["min", "min"]) == [0]


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("pareto")
    (root / "space.yaml").write_text(SPACE)
    uri = f"sqlite:///{root}/mlflow.db"
    assert main(["search", "--space", str(root / "space.yaml"), "--experiment", "cost",
                 "--tracking-uri", uri, "--storage", str(root / "runs"),
                 "--cache", str(root / "cache")]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cost")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("difftune.role") == "search")
    trials = [r for r in runs if r.data.tags.get("difftune.role") == "trial"]
    return {"root": root, "uri": uri, "client": client, "exp": exp, "parent": parent,
            "trials": trials}


def test_the_recorded_front_is_mutually_non_dominated(searched):
    client, parent = searched["client"], searched["parent"]
    files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert "pareto.json" in files and "pareto.png" not in files  # one figure of the front:
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/cost.png", "figures/cost.html"} <= figures  # drawn with the others
    table = client.load_table(searched["exp"].experiment_id, "pareto.json",
                              run_ids=[parent.info.run_id])
    front = table.to_dict("records")
    assert front and [r["rank"] for r in front] == list(range(1, len(front) + 1))
    modes = [o["mode"] for o in OBJECTIVES]
    points = [[r["val_top1"], r["gflops"]] for r in front]
    for i, a in enumerate(points):
        for j, b in enumerate(points):
            assert i == j or not dominates(a, b, modes), (front[i], front[j])
    # and every trial left off the front is dominated by one on it
    on_front = {r["run_id"] for r in front}
    trials = {r.info.run_id: [r.data.metrics["val_top1"], r.data.metrics["gflops"]]
              for r in searched["trials"] if r.info.status == "FINISHED"}
    assert on_front <= set(trials)
    for run_id, values in trials.items():
        if run_id not in on_front:
            assert any(dominates(p, values, modes) for p in points), run_id
    # the front the driver recorded is the one the same rule finds in the trial runs
    rows = [{"run_id": k, "val_top1": v[0], "gflops": v[1]} for k, v in trials.items()]
    assert {r["run_id"] for r in front_rows(rows, OBJECTIVES)} == on_front
    # each trial reported the U-Net GFLOPs to its block plus its head's
    gflops = {r.data.metrics["gflops"] for r in searched["trials"]}
    assert len(gflops) > 1 and all(g > 0 for g in gflops)


def test_export_pareto_writes_every_front_config(searched, tmp_path, capsys):
    out = tmp_path / "front.yaml"
    assert main(["export", "--experiment", "cost", "--tracking-uri", searched["uri"],
                 "--pareto", "--out", str(out)]) == 0
    data = yaml.safe_load(out.read_text())
    client, parent = searched["client"], searched["parent"]
    table = client.load_table(searched["exp"].experiment_id, "pareto.json",
                              run_ids=[parent.info.run_id])
    # the same trials (equal points may come in either order)
    assert sorted(c["run_id"] for c in data["configs"]) == sorted(table["run_id"])
    assert [c["val_top1"] for c in data["configs"]] == pytest.approx(list(table["val_top1"]))
    assert data["objectives"] == OBJECTIVES
    for c in data["configs"]:
        assert c["config"]["head"] == "linear" and {"val_top1", "gflops"} <= set(c)
    assert "Pareto-optimal config(s)" in capsys.readouterr().out
