"""DifFeed on the demo U-Net (19 blocks, middle 10): feedback wiring, validation, frozen
U-Net kept out of the state, seeded noise per image, and one tiny trial."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difftune.trainables import heads
from difftune.trainables.config import TrialConfig
from difftune.trainables.errors import UserError
from difftune.trainables.heads.diffeed import (
    DifFeed,
    build_diffeed,
    make_feedback,
    mirror_block,
)
from difftune.trainables.model.features import block_shapes, run_blocks
from difftune.trainables.model.unet import load_unet, shared_unet

N = 4
BASE = dict(head="diffeed", t=50, block=13, feedback_blocks=[11, 14, 17], dim=32, heads=2,
            depth=1, pre_pool=4)


@pytest.fixture(scope="module")
def unet():
    """The shipped demo U-Net."""
    return load_unet("demo")


def cfg(**overrides) -> TrialConfig:
    return TrialConfig.from_dict({**BASE, **overrides})


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(N, 3, 16, 16, generator=g) * 2 - 1, torch.arange(10, 10 + N)


def passes(module: DifFeed, x: torch.Tensor, idx: torch.Tensor):
    """Block outputs 1..cfg.block of a plain pass and of the second pass with feedback."""
    module.eval()
    x_t, ts = module.noised(x, idx.tolist())
    plain: dict[int, torch.Tensor] = {}
    fed: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        run_blocks(module.unet, x_t, ts, upto=module.block,
                   on_block=lambda b, h: plain.__setitem__(b, h.clone()))
        feedback = module.feedback_maps(module.first_pass(x_t, ts))
        module.second_pass(x_t, ts, feedback, on_block=lambda b, h: fed.__setitem__(b, h.clone()))
    return plain, fed, feedback


def test_mirrors_and_shapes(unet):
    model, diffusion = unet
    module = build_diffeed(cfg(), model, diffusion, 10)
    assert module.mirrors == {11: 9, 14: 6, 17: 3}
    assert mirror_block(model, 19) == 1
    shapes = block_shapes(model)
    assert len(shapes) == 19
    for b, m in module.mirrors.items():
        conv = module.feedback[str(b)][0]
        assert (conv.in_channels, conv.out_channels) == (shapes[b][0], shapes[m][0])
        assert conv.bias is None


def test_zero_feedback_leaves_second_pass_equal_to_first(unet, batch):
    model, diffusion = unet
    module = build_diffeed(cfg(), model, diffusion, 10)
    with torch.no_grad():
        for seq in module.feedback.values():
            seq[0].weight.zero_()
    plain, fed, feedback = passes(module, *batch)
    assert all(not fb.any() for fb in feedback.values())
    assert sorted(plain) == sorted(fed) == list(range(1, 14))
    for b in plain:
        assert torch.equal(plain[b], fed[b]), f"block {b} changed under zero feedback"


def test_feedback_changes_blocks_from_the_shallowest_injection_on(unet, batch):
    model, diffusion = unet
    module = build_diffeed(cfg(), model, diffusion, 10)
    plain, fed, feedback = passes(module, *batch)
    assert sorted(feedback) == [3, 6, 9]
    for m, fb in feedback.items():
        assert fb.shape == fed[m].shape  # resized to the mirror block's map
        assert fb.abs().sum() > 0
    for b in plain:
        if b < 3:
            assert torch.equal(plain[b], fed[b]), f"block {b} before the first injection changed"
        else:
            assert not torch.allclose(plain[b], fed[b]), f"block {b} ignores the feedback"


def test_feedback_resized_bilinearly_to_mirror_size(unet, batch):
    model, diffusion = unet
    # block 16 (upsampled to 16x16) feeds back into block 4 (downsampled to 8x8)
    module = build_diffeed(cfg(feedback_blocks=[16], block=13), model, diffusion, 10)
    shapes = block_shapes(model)
    assert shapes[16][1] != shapes[4][1]
    _, fed, feedback = passes(module, *batch)
    assert feedback[4].shape[-1] == shapes[4][1] == fed[4].shape[-1]


def test_unet_out_of_state_and_parameters_and_frozen(unet, batch):
    model, diffusion = unet
    module = build_diffeed(cfg(), model, diffusion, 10)
    unet_params = {id(p) for p in model.parameters()}
    assert not unet_params & {id(p) for p in module.parameters()}
    assert all(k.startswith(("feedback.", "attention.")) for k in module.state_dict())
    module.train()
    assert not model.training
    model.train()  # even if someone flips it, the forward puts it back
    module(dict(image=batch[0], index=batch[1]))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_noise_is_seeded_per_image(unet, batch):
    model, diffusion = unet
    module = build_diffeed(cfg(), model, diffusion, 10).eval()
    x, idx = batch
    with torch.no_grad():
        together = module(dict(image=x, index=idx))
        alone = torch.cat([module(dict(image=x[i:i + 1], index=idx[i:i + 1]))
                           for i in range(N)])
        other = module(dict(image=x, index=idx + 100))
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together, other)


@pytest.mark.parametrize("arch, kinds", [
    ("C", [nn.Conv2d]),
    ("C_B", [nn.Conv2d, nn.BatchNorm2d]),
    ("C_R", [nn.Conv2d, nn.ReLU]),
    ("C_B_R", [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]),
    ("C_B_R_C", [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]),
    ("C_G_S", [nn.Conv2d, nn.GroupNorm, nn.SiLU]),
])
def test_feedback_codes(arch, kinds):
    module = make_feedback(arch, 8, 16)
    assert [type(m) for m in module] == kinds
    assert module(torch.randn(2, 8, 4, 4)).shape == (2, 16, 4, 4)


@pytest.mark.parametrize("overrides, message", [
    (dict(feedback_blocks=[10, 14]), "11..19"),
    (dict(feedback_blocks=[20]), "11..19"),
    (dict(block=20), "1..19"),
    (dict(block=5), "block 9..19"),
    (dict(t=1000), "0..999"),
    (dict(feedback_arch="B_R"), "starting with C"),
    (dict(feedback_arch="C_X"), "starting with C"),
    (dict(norm="groupnorm"), "layernorm"),
    (dict(dim=30, heads=4), "multiple of heads"),
])
def test_invalid_settings_are_user_errors(unet, overrides, message):
    model, diffusion = unet
    with pytest.raises(UserError, match=message):
        build_diffeed(cfg(**overrides), model, diffusion, 10)


def test_registry_knows_diffeed():
    assert heads.feature_requests(cfg()) == []
    kind = heads.head_kind("diffeed")
    assert kind.live_unet and kind.gpus == 1.0
    assert kind.blocks(cfg()) == [11, 13, 14, 17]


def test_both_passes_are_counted_as_unet_images(unet, batch):
    """A DifFeed forward runs the U-Net twice per image: both passes count."""
    model, diffusion = unet
    module = build_diffeed(cfg(), model, diffusion, 10)
    assert module.unet_images == 0
    with torch.no_grad():
        module.eval()(dict(image=batch[0], index=batch[1]))
    assert module.unet_images == 2 * len(batch[0])


def test_tiny_trial_through_run_trial():
    from difftune.trainables.pipeline import run_trial

    seen = []
    small = cfg(epochs=1, batch_size=16, label_fraction=0.02, block=9, feedback_blocks=[11])
    module, history = run_trial(small, on_epoch=lambda epoch, metrics, *rest: seen.append(epoch))
    assert seen == [1] and len(history) == 1
    assert {"train_loss", "val_top1", "val_top5", "val_loss"} <= set(history[-1])
    assert isinstance(module, DifFeed) and not module.unet.training
    fresh = build_diffeed(small, module.unet, module.diffusion, 10)
    fresh.load_state_dict(module.state_dict())


def test_checkpoint_round_trip_through_trainable_files(tmp_path, batch):
    from difftune.trainables.heads.checkpoint import load_head, save_head

    model, diffusion = shared_unet("demo", None, "cpu")
    module = build_diffeed(cfg(seed=5), model, diffusion, 10)
    with torch.no_grad():
        module.train()(dict(image=batch[0], index=batch[1]))  # non-default BN statistics
    save_head(tmp_path, module, cfg(seed=5), epoch=1, shapes={}, num_classes=10)
    loaded, _, _ = load_head(tmp_path)
    assert isinstance(loaded, DifFeed)
    module.eval()
    loaded.eval()
    with torch.no_grad():
        x = dict(image=batch[0], index=batch[1])
        assert torch.equal(module(x), loaded(x))
