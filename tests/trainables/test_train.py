"""Heads and the training loop (trainables.train, via trainables.pipeline.run_trial on the demo
model and data): the loss falls, runs are seeded, divergence is caught, metrics are right."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from difftune.trainables.config import TrialConfig
from difftune.trainables.heads import LinearHead, MLPHead, build_head
from difftune.trainables.pipeline import run_trial
from difftune.trainables.train.loop import FeatureTensors, TrainingDiverged, evaluate, train_head

KEY = (90, 10)


def random_features(n: int = 64, shape=(8, 2, 2), classes: int = 4, seed: int = 0,
                    separable: bool = True) -> FeatureTensors:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.randn(n, *shape, generator=g)
    if separable:
        x[torch.arange(n), labels] += 3.0  # class c lights up channel c
    return FeatureTensors({KEY: x}, labels)


def small_cfg(**kw) -> TrialConfig:
    base = dict(block=KEY[1], t=KEY[0], pool=2, epochs=3, batch_size=16, seed=0)
    return TrialConfig(**(base | kw))


# --------------------------------------------------------------------------------------
# heads train on the demo model's features (end to end through run_trial)
# --------------------------------------------------------------------------------------


def demo_cfg(**kw) -> TrialConfig:
    # block 4 (the first downsampling) keeps extraction cheap: it stops early
    base = dict(model="demo", data="digits", label_fraction=0.25, block=4, t=30, pool=2,
                epochs=4, batch_size=32, seed=0)
    return TrialConfig.from_dict(base | kw)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_head_trains_and_loss_falls_on_demo_data(head):
    cfg = demo_cfg(head=head, hidden=[64], optimizer="adamw", lr=1e-3)
    model, history = run_trial(cfg)
    assert isinstance(model, LinearHead if head == "linear" else MLPHead)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    losses = [m["train_loss"] for m in history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert losses[0] < math.log(10) * 1.5  # starts near chance, not diverging
    assert history[-1]["val_top1"] > 40, history[-1]  # chance is 10%


def test_paper_recipe_loss_falls_on_demo_data():
    _, history = run_trial(demo_cfg(head="linear", epochs=3))  # SGD lr 1e-2, no momentum
    losses = [m["train_loss"] for m in history]
    assert losses[2] < losses[1] < losses[0], losses


def test_same_config_same_metrics():
    cfg = demo_cfg(head="mlp", hidden=[32], dropout=0.2, epochs=2)
    head_a, a = run_trial(cfg)
    head_b, b = run_trial(cfg)
    assert a == b
    for k, v in head_a.state_dict().items():
        assert torch.equal(v, head_b.state_dict()[k]), k
    _, c = run_trial(demo_cfg(head="mlp", hidden=[32], dropout=0.2, epochs=2, seed=1))
    assert c != a  # the seed matters


# --------------------------------------------------------------------------------------
# divergence
# --------------------------------------------------------------------------------------


def test_inf_features_raise_training_diverged():
    ds = random_features()
    ds.feats[KEY][5, 0, 0, 0] = float("inf")
    cfg = small_cfg()
    head = build_head(cfg, ds.shapes(), 4)
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        train_head(head, ds, random_features(seed=1), cfg)


def test_huge_lr_raises_training_diverged():
    # two layers: weights that grow by lr per step overflow their product to inf, then NaN
    cfg = small_cfg(head="mlp", hidden=[16], lr=1e30, epochs=5)
    ds = random_features()
    head = build_head(cfg, ds.shapes(), 4)
    with pytest.raises(TrainingDiverged, match="loss became"):
        train_head(head, ds, random_features(seed=1), cfg)


# --------------------------------------------------------------------------------------
# the loop itself
# --------------------------------------------------------------------------------------


def test_metrics_every_epoch():
    cfg = small_cfg(epochs=3, optimizer="adamw", lr=1e-2)
    ds, val = random_features(), random_features(seed=1)
    seen = []
    head = build_head(cfg, ds.shapes(), 4)
    history = train_head(head, ds, val, cfg,
                         on_epoch=lambda epoch, metrics, *rest: seen.append((epoch, metrics)))
    assert [e for e, _ in seen] == [1, 2, 3]
    assert [m for _, m in seen] == history
    for m in history:
        assert {"epoch", "train_loss", "val_top1", "val_top5"} <= set(m)
        assert m["val_top5"] == 100.0  # 4 classes: the top 5 hold every label
        assert m["train_loss"] > 0
    # the last epoch's metrics are the trained head's on val
    final = evaluate(head, val)
    assert {k: history[-1][k] for k in final} == pytest.approx(final)
    assert history[-1]["val_top1"] > 90  # separable toy data


def test_step_lr_schedule_of_the_paper(monkeypatch):
    cfg = small_cfg(epochs=9)  # defaults: SGD lr 1e-2, StepLR 7 x 0.1
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.step_size, cfg.gamma) == (
        "sgd", 1e-2, 0.0, 7, 0.1)
    ds = random_features()
    used = []  # the lr each epoch trains with
    opts = []

    def hook(module, args):
        if module.training and opts:
            used.append(opts[-1].param_groups[0]["lr"])

    head = build_head(cfg, ds.shapes(), 4)
    head.register_forward_pre_hook(hook)
    real_sgd = torch.optim.SGD

    class SpySGD(real_sgd):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            opts.append(self)

    monkeypatch.setattr(torch.optim, "SGD", SpySGD)
    train_head(head, ds, ds, cfg)
    per_epoch = [used[i * 4] for i in range(9)]  # 64 items / 16 = 4 steps per epoch
    assert per_epoch == pytest.approx([1e-2] * 7 + [1e-3] * 2)
    assert isinstance(opts[0], real_sgd) and opts[0].defaults["momentum"] == 0


def test_adamw_option():
    cfg = small_cfg(optimizer="adamw", lr=1e-3, weight_decay=0.05)
    ds = random_features()
    kinds = []
    train_head(build_head(cfg, ds.shapes(), 4), ds, ds, cfg,
               on_epoch=lambda e, m, head, opt, sched: kinds.append(type(opt)))
    assert kinds == [torch.optim.AdamW] * 3


def test_resume_gives_the_same_metrics():
    cfg = small_cfg(epochs=4)
    ds, val = random_features(), random_features(seed=1)
    straight = train_head(build_head(cfg, ds.shapes(), 4), ds, val, cfg)
    state = {}

    def save(epoch, metrics, head, opt, sched):
        if epoch == 2:
            state.update(head={k: v.clone() for k, v in head.state_dict().items()},
                         opt={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    first = train_head(build_head(cfg, ds.shapes(), 4), ds, val, cfg, on_epoch=save)
    head = build_head(small_cfg(epochs=4, seed=123), ds.shapes(), 4)  # other init, overwritten
    head.load_state_dict(state["head"])
    rest = train_head(head, ds, val, cfg, start_epoch=2, optimizer_state=state["opt"])
    assert first == straight
    assert straight[2:] == rest


def test_trailing_batch_of_one_does_not_break_batchnorm():
    cfg = small_cfg(batch_size=16, epochs=1)
    ds = random_features(n=33)
    history = train_head(build_head(cfg, ds.shapes(), 4), ds, ds, cfg)
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])


class Identity(nn.Module):
    def forward(self, feats):
        return feats[KEY].flatten(1)


def test_evaluate_top1_top5():
    logits = torch.tensor([
        [9, 8, 7, 6, 5, 0, 0],  # label 0: top-1 hit
        [9, 8, 7, 6, 5, 0, 0],  # label 4: top-5 hit only
        [9, 8, 7, 6, 5, 0, 0],  # label 6: miss
        [0, 0, 0, 0, 0, 1, 0],  # label 5: top-1 hit
    ], dtype=torch.float32)
    labels = torch.tensor([0, 4, 6, 5])
    ds = FeatureTensors({KEY: logits[:, :, None, None]}, labels)
    m = evaluate(Identity(), ds, batch_size=3)
    assert m["val_top1"] == pytest.approx(50.0)
    assert m["val_top5"] == pytest.approx(75.0)
    want = nn.functional.cross_entropy(logits, labels).item()
    assert m["val_loss"] == pytest.approx(want, rel=1e-5)


def test_mlp_hidden_sizes():
    cfg = small_cfg(head="mlp", hidden=[16, 8], dropout=0.1)
    head = build_head(cfg, {KEY: (8, 2, 2)}, 4)
    widths = [m.out_features for m in head.modules() if isinstance(m, nn.Linear)]
    assert widths == [16, 8, 4]
    linear = build_head(small_cfg(), {KEY: (8, 2, 2)}, 4)
    assert [m.in_features for m in linear.modules() if isinstance(m, nn.Linear)] == [32]


def test_epoch_e_reads_view_e_mod_k():
    """A training set of K views (the cache's ``views: K``) is told each epoch before it is
    read: epoch e trains on view e mod K."""
    from difftune.trainables.data.views import ViewCycle

    views = [random_features(seed=s) for s in range(3)]
    cycle = ViewCycle(views)
    read = []
    original = cycle.__getitems__

    def spy(indices):
        read.append(cycle.current)
        return original(indices)

    cycle.__getitems__ = spy
    head = build_head(small_cfg(), views[0].shapes(), 4)
    train_head(head, cycle, random_features(seed=9), small_cfg(epochs=5, batch_size=64))
    assert read == [0, 1, 2, 0, 1]  # one batch of 64 per epoch
