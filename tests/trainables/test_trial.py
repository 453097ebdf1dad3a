"""A trial resolved once (trainables.trial) and run as a grid of one (trainables.pipeline.run):
what the trainable does, without Ray."""

from __future__ import annotations

import copy

import pytest
import torch

from difftune.trainables.config import ConfigError, TrialConfig
from difftune.trainables.heads.checkpoint import (
    GRID_FILE,
    HEAD_FILE,
    load_head,
    read_resume,
    save_epoch,
)
from difftune.trainables.model.features import block_shapes
from difftune.trainables.model.unet import shared_unet
from difftune.trainables.pipeline import DirectFeatures, run
from difftune.trainables.train.grid import Grid
from difftune.trainables.trial import resolve, trial_gflops

BASE = dict(model="demo", data="digits", label_fraction=0.25, block=4, t=30, pool=2, epochs=2,
            batch_size=32, seed=0)


def test_resolve_decodes_checks_and_clamps_once():
    trial = resolve({"head": "attention", "block": 10, "t": 90, "attention:dim": 16, "heads": 2,
                     "depth": 1, "pre_pool": 64})
    model, _ = shared_unet("demo", None)
    channels, side = block_shapes(model)[10]
    assert trial.cfg.dim == 16 and trial.kind.name == "attention"
    assert trial.requests == ((90, 10, side),)  # pre_pool 64 read at the block's native map
    assert trial.shapes == {(90, 10): (channels, side, side)}
    assert trial.cfgs == (trial.cfg,) and trial.points == ({},) and trial.grid is None
    assert trial.steps == 1 and trial.geometry.num_blocks == len(block_shapes(model))
    with pytest.raises(ConfigError, match="allowed: \\['linear', 'mlp'"):
        resolve({"head": "transformer"})


def test_a_grid_resolves_to_one_config_per_point():
    spec = Grid({"lr": [0.1, 0.01], "hidden": [[8], [8, 8]]})
    trial = resolve(TrialConfig(head="mlp"), spec)
    assert [(c.lr, c.hidden) for c in trial.cfgs] == [(0.1, [8]), (0.1, [8, 8]), (0.01, [8]),
                                                      (0.01, [8, 8])]
    assert list(trial.points) == spec.points()
    # the cost of a head does not depend on its optimizer settings
    assert trial_gflops(trial.cfgs[0], None, 10) == trial_gflops(trial.cfgs[2], None, 10)
    assert trial_gflops(trial.cfgs[1], None, 10) > trial_gflops(trial.cfgs[0], None, 10)


def test_a_single_head_checkpoints_as_a_plain_head_and_resumes_exactly(tmp_path):
    trial = resolve(TrialConfig.from_dict(BASE | {"head": "mlp", "hidden": [16]}))
    source = DirectFeatures()
    epochs, states = [], []

    def on_epoch(ep):  # what the trainable does: one callback for one head or a grid
        d = tmp_path / f"epoch{ep.epoch}"
        save_epoch(d, ep)
        epochs.append(ep)
        states.append(copy.deepcopy(ep.grid.state_dict()))

    grid, history = run(trial, source=source, on_epoch=on_epoch)
    assert len(grid) == 1 and [h["epoch"] for h in history] == [1, 2]
    assert set(history[-1]) == {"epoch", "train_loss", "lr", "val_top1", "val_top5", "val_loss"}
    assert epochs[-1].gflops == pytest.approx(trial_gflops(trial, None, 10))
    first = tmp_path / "epoch1"
    assert (first / HEAD_FILE).is_file() and not (first / GRID_FILE).exists()
    head, cfg, info = load_head(first)  # a plain head, with its optimizer to resume
    assert cfg == trial.cfg and "optimizer" in info["state"]
    # resumed after epoch 1 from the checkpoint: the same head as the uninterrupted run
    resumed, again = run(trial, source=source, resume=read_resume(first, grid=False))
    assert again == history[1:]
    for name, tensor in states[-1].items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    with pytest.raises(RuntimeError, match="holds no grid state"):
        read_resume(first, grid=True)
