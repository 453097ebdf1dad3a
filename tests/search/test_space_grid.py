"""A space's ``grid:`` and ``search.objectives``: what loads, and every mistake ending in one
line with exit code 2 before anything is written."""

from __future__ import annotations

import pytest

from difftune.search.cli import main
from difftune.search.space.spec import SpaceError, load_space

BASE = """
model: demo
fixed: {epochs: 2}
params:
  block: {int: [1, 19]}
  head: {choice: {linear: {}, mlp: {hidden: {choice: [[64]]}}}}
"""


def _space(tmp_path, text: str, name: str = "s") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def test_grid_and_objectives_load(tmp_path):
    space = load_space(_space(tmp_path, BASE + "grid: {lr: [0.01, 0.1], weight_decay: [0, 1.0e-4]}\n"
                              "search: {objectives: [{metric: val_top1, mode: max}, "
                              "{metric: gflops, mode: min}]}\n"))
    assert space.grid_spec().points()[1] == {"lr": 0.01, "weight_decay": 1.0e-4}
    assert space.objectives() == [{"metric": "val_top1", "mode": "max"},
                                  {"metric": "gflops", "mode": "min"}]
    assert (space.search["metric"], space.search["mode"]) == ("val_top1", "max")
    assert space.resolved()["grid"] == {"lr": [0.01, 0.1], "weight_decay": [0, 1.0e-4]}
    # an objective first by loss: the search's metric and mode follow it
    loss = load_space(_space(tmp_path, BASE + "search: {objectives: [{metric: val_loss, mode: "
                             "min}, {metric: gflops, mode: min}]}\n", "loss"))
    assert (loss.search["metric"], loss.search["mode"]) == ("val_loss", "min")
    assert load_space("demo_grid").grid_spec() is not None
    assert len(load_space("demo_cost").objectives()) == 2


def test_pinning_a_grid_setting_takes_it_out_of_the_grid(tmp_path):
    path = _space(tmp_path, BASE + "grid: {lr: [0.01, 0.1], weight_decay: [0, 1.0e-4]}\n")
    space = load_space(path, overrides={"lr": 0.05})
    assert space.grid == {"weight_decay": [0, 1.0e-4]} and space.fixed["lr"] == 0.05
    assert load_space(path, overrides={"lr": 0.05, "weight_decay": 0}).grid_spec() is None


@pytest.mark.parametrize("extra, needle", [
    ("grid: {lr: [0.1]}\n", None),
    ("grid: {dropout: [0.1, 0.2]}\n", "head linear does not take ['dropout'] in a grid"),
    ("grid: {block: [3, 4]}\n", "also set in params or fixed"),
    ("grid: {epochs: [3, 4]}\n", "also set in params or fixed"),
    ("grid: {seed: [0, 1]}\n", "does not take ['seed'] in a grid"),
    ("grid: {lr: []}\n", "grid.lr must be a non-empty list"),
    ("grid: {lr: [-0.1]}\n", "grid point lr=-0.1: lr=-0.1 is invalid; allowed: a number > 0"),
    # the test split never selects: refused with the other search settings, before the grid
    ("grid: {lr: [0.1]}\nsearch: {metric: test_top1}\n", "search.metric='test_top1' is invalid"),
    ("search: {objectives: [{metric: top1, mode: max}]}\n", "metric 'top1' is not one trials"),
    ("search: {objectives: [{metric: val_top1, mode: up}]}\n", "mode 'up' is invalid"),
    ("search: {objectives: {metric: val_top1}}\n", "must be a list of {metric: NAME"),
    ("search: {metric: val_loss, objectives: [{metric: val_top1, mode: max}, "
     "{metric: gflops, mode: min}]}\n", "differs from the first objective's"),
    ("search: {objectives: [{metric: gflops, mode: min}, {metric: gflops, mode: min}]}\n",
     "names a metric twice"),
])
def test_bad_grids_and_objectives(tmp_path, extra, needle):
    path = _space(tmp_path, BASE + extra)
    if needle is None:
        load_space(path)
        return
    with pytest.raises(SpaceError) as exc:
        load_space(path)
    assert needle in str(exc.value)


def test_a_grid_for_diffeed_is_one_clear_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = _space(tmp_path, BASE.replace("linear: {}", "linear: {}, diffeed: {}")
                  + "grid: {lr: [0.01, 0.1]}\n")
    for argv in (["search", "--space", path],
                 ["search", "--space", "demo_grid", "--set", "head=diffeed"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert "grid: head diffeed runs the live U-Net and trains one head per trial" in err[0]
        assert list(work.iterdir()) == []
