"""A grid of heads trained in one pass over the demo U-Net's features: each head is bitwise
the head a trial of its grid point trains alone (linear heads fused into one batched
matmul, MLP heads with dropout, attention heads), diverged heads are switched off, the best
head is saved as a plain head, and a grid resumes exactly."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from difftune.search.records.best import Candidate, rank_trials
from difftune.trainables.config import TrialConfig
from difftune.trainables.heads.checkpoint import load_head, save_head
from difftune.trainables.pipeline import DirectFeatures, TrialData, run_grid_trial, run_trial
from difftune.trainables.train.grid import Grid, GridError, best_index, grid_keys, with_point
from difftune.trainables.train.loop import FeatureTensors, TrainingDiverged
from difftune.trainables.trial import grid_configs

KEYS = [(10, 7), (50, 7), (10, 10), (50, 10)]  # (t, block) the tests read, pooled to 4


class Fixed:
    """A feature source serving features extracted once (a subset of digits)."""

    def __init__(self, data: TrialData):
        self.data = data

    def prepare(self, cfg, requests, splits=("train", "val")):
        def pick(ds):
            return FeatureTensors({(t, b): torch.nn.functional.adaptive_avg_pool2d(
                ds.feats[(t, b)], p) for t, b, p in requests}, ds.labels)

        train, val = pick(self.data.train), pick(self.data.val)
        return TrialData({"train": train, "val": val}, train.shapes(), self.data.num_classes)


@pytest.fixture(scope="module")
def source() -> Fixed:
    """Features of 400 train and 200 val digits at (t, block) in KEYS, pooled to 4."""
    torch.manual_seed(0)
    base = TrialConfig(head="difformer", blocks=[7, 10], timesteps=[10, 50], pre_pool=4)
    data = DirectFeatures().prepare(base, [(t, b, 4) for t, b in KEYS])
    sub = {"train": range(400), "val": range(200)}
    out = []
    for name, ds in (("train", data.train), ("val", data.val)):
        idx = torch.tensor(list(sub[name]))
        out.append(FeatureTensors({k: v[idx] for k, v in ds.feats.items()}, ds.labels[idx]))
    return Fixed(TrialData({"train": out[0], "val": out[1]}, out[0].shapes(), data.num_classes))


def _base(**kw) -> TrialConfig:
    settings = dict(block=10, t=10, pool=2, epochs=2, batch_size=64, momentum=0.9,
                    step_size=1, gamma=0.5, seed=3)
    settings.update(kw)
    return TrialConfig.from_dict(settings)


def _same_as_alone(source, base: TrialConfig, spec: Grid) -> list[dict]:
    """Train the grid and every point alone; assert equal heads and metrics; return the
    grid's per-head rows."""
    grid, history = run_grid_trial(base, spec, source=source)
    rows = json.loads(history[-1]["grid_results"])
    for i, cfg in enumerate(grid_configs(base, spec)):
        head, alone = run_trial(cfg, source=source)
        assert alone[-1]["val_loss"] == rows[i]["val_loss"], (i, cfg)
        assert alone[-1]["train_loss"] == rows[i]["train_loss"], (i, cfg)
        plain = grid.plain(i).state_dict()
        for name, tensor in head.state_dict().items():
            assert torch.equal(tensor, plain[name]), (i, name)
    return rows


def test_linear_heads_are_fused_and_equal_to_heads_trained_alone(source):
    spec = Grid({"lr": [0.001, 0.03], "weight_decay": [0.0, 0.01]})
    base = _base(head="linear")
    grid, _ = run_grid_trial(base, spec, source=source)
    assert grid.fused == [[0, 1, 2, 3]]  # one batched matmul for the four heads
    rows = _same_as_alone(source, base, spec)
    assert [(r["lr"], r["weight_decay"]) for r in rows] == [
        (0.001, 0.0), (0.001, 0.01), (0.03, 0.0), (0.03, 0.01)]
    assert len({r["val_loss"] for r in rows}) == 4  # the points differ


def test_mlp_heads_with_dropout_draw_their_own_masks(source):
    spec = Grid({"lr": [0.01, 0.1], "dropout": [0.0, 0.4]})
    _same_as_alone(source, _base(head="mlp", hidden=[32]), spec)


def test_attention_and_difformer_heads_of_a_grid(source):
    small = dict(pre_pool=4, depth=1, heads=2, epochs=1, momentum=0.0)
    _same_as_alone(source, _base(head="attention", dim=16, **small),
                   Grid({"lr": [0.01, 0.05], "dim": [8, 16]}))
    _same_as_alone(source, _base(head="difformer", blocks=[7, 10], timesteps=[10, 50], dim=8,
                                 **small), Grid({"lr": [0.05]}))


def test_a_diverged_head_is_switched_off_and_the_others_go_on(source, caplog):
    spec = Grid({"lr": [0.01, 1e38]})
    _, history = run_grid_trial(_base(head="linear"), spec, source=source)
    rows = json.loads(history[-1]["grid_results"])
    assert [r["diverged"] for r in rows] == [False, True]
    assert rows[1]["val_top1"] is None
    assert history[-1]["grid_index"] == 0 and json.loads(history[-1]["grid_best"]) == {"lr": 0.01}
    assert "diverged" in caplog.text
    with pytest.raises(TrainingDiverged, match="every head"):
        run_grid_trial(_base(head="linear"), Grid({"lr": [1e38]}), source=source)


def test_best_head_is_a_plain_checkpoint_and_the_grid_resumes_exactly(source, tmp_path):
    spec = Grid({"lr": [0.001, 0.01, 0.1]})
    base = _base(head="linear", epochs=3)
    epochs, states = [], []

    def on_epoch(ep):  # what the trainable checkpoints: the state as it is at this epoch
        epochs.append(ep)
        states.append(copy.deepcopy(ep.resume_state()))

    grid, history = run_grid_trial(base, spec, source=source, on_epoch=on_epoch)
    ep = epochs[-1]
    best = ep.best
    assert history[-1]["grid_index"] == best
    assert ep.config.lr == spec.points()[best]["lr"] and ep.config == grid_configs(base, spec)[best]
    shapes = source.prepare(base, [(10, 10, 2)]).shapes
    save_head(tmp_path / "best", ep.best_head(), ep.config, epoch=3, shapes=shapes,
              num_classes=10)
    head, cfg, _ = load_head(tmp_path / "best")
    assert cfg.lr == ep.config.lr
    x = {(10, 10): torch.randn(5, *shapes[(10, 10)])}
    assert torch.equal(head(x), grid.plain(best).eval()(x))

    # stop after epoch 1, resume from its state: the same heads as the uninterrupted run
    resumed, again = run_grid_trial(base, spec, source=source, resume=states[0])
    assert [h["epoch"] for h in again] == [2, 3]
    assert again[-1]["grid_results"] == history[-1]["grid_results"]
    for name, tensor in grid.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_grid_points_and_what_a_grid_may_vary():
    spec = Grid({"lr": [0.1, 0.01], "hidden": [[64], [64, 64]]})
    assert len(spec) == 4
    assert spec.points()[1] == {"lr": 0.1, "hidden": [64, 64]}  # the last axis varies fastest
    cfgs = grid_configs(TrialConfig(head="mlp"), spec)
    assert [(c.lr, c.hidden) for c in cfgs][-1] == (0.01, [64, 64])
    assert "dropout" not in grid_keys("linear") and "dim" in grid_keys("difformer")
    with pytest.raises(GridError, match=r"head linear does not take \['hidden'\]"):
        grid_configs(TrialConfig(head="linear"), spec)
    with pytest.raises(GridError, match="head diffeed runs the live U-Net"):
        grid_configs(TrialConfig(head="diffeed"), Grid({"lr": [0.1]}))
    with pytest.raises(GridError, match="grid point lr=-1"):
        grid_configs(TrialConfig(), Grid({"lr": [-1]}))
    with pytest.raises(GridError, match="per-head metric"):
        Grid({"lr": [0.1]}, metric="test_top1")
    assert with_point({"lr": 0.5, "block": 3}, '{"lr": 0.01}') == {"lr": 0.01, "block": 3}


def test_the_grid_rule_for_the_best_head_is_search_best_for_equal_epochs():
    assert best_index([90.0, 92.0, 92.0, float("nan"), None], "max") == 1  # tie: earlier
    assert best_index([0.3, 0.2, 0.2], "min") == 1
    assert best_index([None, float("inf")], "max") is None
    rng = random.Random(0)
    for _ in range(200):
        scores = [rng.choice([None, float("nan"), 1.0, 2.0, 3.0]) for _ in range(6)]
        for mode in ("max", "min"):
            ranked = rank_trials([Candidate(str(i), i, s, 4) for i, s in enumerate(scores)],
                                 mode=mode)
            expected = int(ranked[0].key) if ranked else None
            assert best_index(scores, mode) == expected, (scores, mode)
