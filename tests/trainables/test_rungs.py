"""A trial over rungs of images (trainables/pipeline.py ``run(rungs=...)``,
trainables/data/order.py ``Rung``), with the demo U-Net and a real feature cache, without Ray:
each rung trains on its sample (a prefix of the interleaved order) and scores on val's; every
image passes the U-Net once per timestep over all rungs; a trial resumed at a later rung
extracts nothing it already has; the rung budgets fall on ASHA's milestones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.data.datasets import shared_dataset, targets_of
from difftune.trainables.data.order import (
    Repeated,
    Rung,
    interleaved_order,
    ladder,
    repeat_for,
    rung_rows,
    rung_subset,
)
from difftune.trainables.data.views import ViewCycle
from difftune.trainables.heads.checkpoint import read_resume, save_epoch
from difftune.trainables.pipeline import DirectFeatures, run
from difftune.trainables.train.loop import FeatureTensors
from difftune.trainables.trial import resolve

CFG = {"model": "demo", "data": "digits", "head": "linear", "block": 10, "t": 50, "pool": 2,
       "epochs": 2, "lr": 0.05, "batch_size": 64}
FRACTIONS = [0.02, 0.1, 1.0]


def test_budgets_fall_on_asha_milestones():
    rungs = ladder([0.1, 0.3, 1.0], floor=3, factor=3)
    assert [(r.index, r.fraction, r.floor) for r in rungs] == [(0, 0.1, 3), (1, 0.3, 3),
                                                               (2, 1.0, 3)]
    assert [r.budget(end=True) for r in rungs] == [1.0, 3.0, 9.0]  # grace 1, rf 3: 1, 3, 9
    # before a rung's end the budget repeats a milestone already decided (ASHA: no decision)
    assert [r.budget(end=False) for r in rungs] == [0.0, 1.0, 3.0]


def test_rung_subset_is_a_prefix_of_the_interleaved_order():
    ds, _ = shared_dataset("digits", "train", 16, None, 0, None, "stop")
    targets = targets_of(ds)
    small, big = (Rung(0, 0.02, 5), Rung(1, 0.5, 5))
    a, b = rung_subset(ds, small), rung_subset(ds, big)
    assert len(a) == rung_rows(targets, 0.02, 5) >= 50  # 10 classes x floor 5
    assert set(a.indices) < set(b.indices)  # the sample grows by a prefix of one order
    assert list(a.indices) == sorted(interleaved_order(targets)[:len(a)].tolist())
    assert np.bincount(targets_of(a), minlength=10).min() >= 5
    assert rung_subset(ds, Rung(1, 1.0, 5)) is ds and rung_subset(ds, None) is ds


def test_each_rung_reads_its_sample_and_every_image_passes_once(tmp_path):
    cache = FeatureCache(str(tmp_path / "cache"))
    seen: list[tuple[int, int]] = []
    sizes: dict[int, int] = {}

    def on_data(info):
        sizes[info["rung"].index] = info["train_images"]

    def on_epoch(ep):
        seen.append((ep.rung.index, ep.epoch))
        if (ep.rung.index, ep.epoch) == (1, 2):  # a checkpoint names its rung, to resume at
            save_epoch(tmp_path / "ckpt", ep)
            assert read_resume(tmp_path / "ckpt", grid=False)["rung"] == 1

    rungs = ladder(FRACTIONS, factor=2)
    _, history = run(resolve(CFG), source=cache, rungs=rungs, on_epoch=on_epoch,
                     on_data=on_data)
    assert seen == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    train, _ = shared_dataset("digits", "train", 16, None, 0, None, "stop")
    val, _ = shared_dataset("digits", "val", 16, None, 0, None, "stop")
    assert sizes == {0: rung_rows(targets_of(train), 0.02, 5),
                     1: rung_rows(targets_of(train), 0.1, 5), 2: len(train)}
    assert sizes[0] < sizes[1] < sizes[2]
    # three rungs, one timestep: each train and val image went through the U-Net once
    assert cache.unet_images == len(train) + len(val)
    assert len(history) == 2 and 0 <= history[-1]["val_top1"] <= 100

    # a trial resumed at its last rung (its earlier rungs done by another process) passes no
    # image again: every entry it reads is already long enough
    again = FeatureCache(str(tmp_path / "cache"))
    run(resolve(CFG), source=again, rungs=rungs, start_rung=2)
    assert again.unet_images == 0
    # and a deeper rung of another trial at the same t extends nothing either
    other = FeatureCache(str(tmp_path / "cache"))
    run(resolve({**CFG, "lr": 0.01}), source=other, rungs=rungs[:2])
    assert other.unet_images == 0


def test_rungs_without_a_cache_score_on_the_rung_sample():
    """The in-memory source (no cache) reads the same samples: a rung's val score is over
    its val sample (a multiple of 1/len(sample))."""
    val, _ = shared_dataset("digits", "val", 16, None, 0, None, "stop")
    n_val = rung_rows(targets_of(val), 0.02, 5)
    scores = []
    run(resolve(CFG), source=DirectFeatures(), rungs=ladder(FRACTIONS)[:1],
        on_epoch=lambda ep: scores.append(ep.metrics["val_top1"]))
    assert len(scores) == 2
    for s in scores:
        assert s * n_val / 100 == pytest.approx(round(s * n_val / 100), abs=1e-6)


def test_the_last_rung_trains_on_what_a_trial_without_rungs_does(tmp_path):
    """A rung's sample is read in split order: at the last rung (every image) a trial's
    epochs match a trial without rungs on the same features (its whole-split entries), so
    ``difftune train`` of an exported config gives the champion's numbers again."""
    rungs = ladder([0.1, 1.0])
    with_rungs = run(resolve(CFG), source=FeatureCache(str(tmp_path / "a")), rungs=rungs,
                     start_rung=1)[1]
    without = run(resolve(CFG), source=FeatureCache(str(tmp_path / "b")))[1]
    for a, b in zip(with_rungs, without, strict=True):
        assert a["val_top1"] == pytest.approx(b["val_top1"], abs=0.3)  # one val image
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def test_an_early_rung_epoch_reads_a_small_sample_until_it_takes_its_steps():
    r0, r1, r2, last = ladder([0.02, 0.1, 0.5, 1.0])  # 16 steps at least
    # the demo's samples (50, 108, 539 of 1078 train images) at batch 64: 8 passes at most,
    # ceil(1 / fraction) at most, ceil(16 x 64 / rows) at most
    assert [r0.passes(50, 64), r1.passes(108, 64), r2.passes(539, 64), last.passes(1078, 64)
            ] == [8, 8, 2, 1]
    assert r0.passes(23_064, 128) == 1  # ImageNet's rung 0 takes 180 steps read once
    assert Rung(0, 0.3, min_steps=3).passes(40, 32) == 3  # ceil(3 x 32 / 40)
    assert Rung(0, 0.3, min_steps=100).passes(40, 32) == 4  # ceil(1 / 0.3): a whole epoch
    assert Rung(0, 0.02, min_steps=1).passes(50, 64) == 2
    feats = FeatureTensors({(0, 1): torch.arange(5.0).reshape(5, 1, 1, 1)},
                           torch.tensor([0, 1, 2, 3, 4]))
    views = ViewCycle([feats, FeatureTensors({(0, 1): -feats.feats[(0, 1)]}, feats.labels)])
    rep = repeat_for(views, Rung(0, 0.3, 1, 2.0, min_steps=3), batch_size=5)
    assert isinstance(rep, Repeated) and len(rep) == 15 and rep.shapes() == feats.shapes()
    loader = torch.utils.data.DataLoader(rep, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = torch.cat([y for _, y in loader])
    assert torch.bincount(seen).tolist() == [3] * 5  # every image 3 times in one epoch
    rep.set_epoch(1)  # reaches the views: epoch 1 reads view 1
    assert rep[7][0][(0, 1)].item() == -2.0
    assert repeat_for(feats, last, 64) is feats and repeat_for(feats, None, 64) is feats


def test_a_rung_epoch_that_reads_its_sample_more_often_trains_the_head_further():
    """Rung 0 of digits is 50 train images, one SGD step per epoch at batch 64: read 8 times
    an epoch, the head's train loss after 2 epochs is far lower (a rung ranks trained
    heads, not untrained ones)."""
    losses = {}
    for steps in (1, 16):  # 1: read once (one step); 16: read 8 times
        hist = run(resolve(CFG), source=DirectFeatures(),
                   rungs=ladder(FRACTIONS, min_steps=steps)[:1])[1]
        losses[steps] = hist[-1]["train_loss"]
    assert losses[16] < 0.7 * losses[1]
