"""The contract every head kind of the registry keeps, on the demo U-Net: output shape,
training moves only the head, state_dict round trip, seeded builds, the checkpoint format,
and what the kind declares (its requests are what its forward reads)."""

from __future__ import annotations

import copy

import pytest
import torch

from difftune.trainables import heads
from difftune.trainables.config import TrialConfig
from difftune.trainables.heads import DifFeed
from difftune.trainables.model.features import Extractor
from difftune.trainables.model.unet import load_unet
from difftune.trainables.pipeline import clamp_requests

N, CLASSES = 6, 10
TINY = dict(dim=32, heads=2, depth=1, mlp_ratio=2.0, pre_pool=4)
CONFIGS = {
    "linear": dict(head="linear", block=10, t=50, pool=2),
    "mlp": dict(head="mlp", block=13, t=50, pool=2, hidden=[16]),
    "attention": dict(head="attention", block=13, t=50, **TINY),
    "difformer": dict(head="difformer", blocks=[10, 16], timesteps=[10, 50], norm="batchnorm",
                      **TINY),
    "diffeed": dict(head="diffeed", block=13, t=50, feedback_blocks=[11, 14, 17], **TINY),
}


@pytest.fixture(scope="module")
def unet():
    return load_unet("demo")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 3, 16, 16, generator=g) * 2 - 1
    labels = torch.randint(CLASSES, (N,), generator=g)
    return x, labels


_FEATS: dict[str, dict[tuple[int, int], torch.Tensor]] = {}


def make(name: str, unet, images, *, seed: int = 0):
    """``(head, inputs)`` for head ``name``; inputs are what its forward takes."""
    model, diffusion = unet
    x, _ = images
    cfg = TrialConfig.from_dict({**CONFIGS[name], "seed": seed})
    if heads.head_kind(name).live_unet:
        return (heads.build_head(cfg, {}, CLASSES, unet=unet),
                {"image": x, "index": torch.arange(N)})
    if name not in _FEATS:  # features do not depend on the head's seed: extract once
        extractor = Extractor(model, diffusion)
        _FEATS[name] = {(t, b): extractor.extract(x, t, [b], pool=p)[b]
                        for t, b, p in clamp_requests(model, heads.feature_requests(cfg))}
    feats = _FEATS[name]
    shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
    return heads.build_head(cfg, shapes, CLASSES), feats


def test_every_registered_kind_has_a_contract_config():
    assert set(CONFIGS) == set(heads.KINDS)


@pytest.mark.parametrize("name", list(CONFIGS))
class TestHeadContract:
    def test_output_shape(self, name, unet, images):
        head, inputs = make(name, unet, images)
        head.eval()
        with torch.no_grad():
            out = head(inputs)
        assert out.shape == (N, CLASSES)
        assert torch.isfinite(out).all()

    def test_step_changes_only_trainable_parameters(self, name, unet, images):
        model, _ = unet
        unet_before = {k: v.clone() for k, v in model.state_dict().items()}
        head, inputs = make(name, unet, images)
        head_before = {k: v.clone() for k, v in head.named_parameters()}
        unet_ids = {id(p) for p in model.parameters()}
        assert not unet_ids & {id(p) for p in head.parameters()}
        head.train()
        opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
        loss = torch.nn.functional.cross_entropy(head(inputs), images[1])
        opt.zero_grad()
        loss.backward()
        for k, p in head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {k}"
        opt.step()
        assert not model.training
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())
        for k, v in model.state_dict().items():
            assert torch.equal(v, unet_before[k]), f"U-Net tensor {k} changed"
        changed = [k for k, p in head.named_parameters() if not torch.equal(p, head_before[k])]
        assert changed == [k for k, _ in head.named_parameters()]

    def test_state_dict_round_trip(self, name, unet, images):
        head, inputs = make(name, unet, images)
        head.train()
        with torch.no_grad():
            head(inputs)  # moves BatchNorm running statistics away from their defaults
        fresh, _ = make(name, unet, images, seed=1)
        fresh.load_state_dict(copy.deepcopy(head.state_dict()))
        head.eval()
        fresh.eval()
        with torch.no_grad():
            assert torch.equal(head(inputs), fresh(inputs))
        if isinstance(head, DifFeed):
            n_unet = len(unet[0].state_dict())
            assert len(head.state_dict()) < n_unet
            assert not any(k.startswith(("input_blocks", "middle_block", "output_blocks",
                                         "time_embed", "out.")) for k in head.state_dict())

    def test_same_seed_same_head(self, name, unet, images):
        outs = []
        for seed in (3, 3, 4):
            head, inputs = make(name, unet, images, seed=seed)
            head.eval()
            with torch.no_grad():
                outs.append(head(inputs))
        assert torch.equal(outs[0], outs[1])
        assert not torch.allclose(outs[0], outs[2])

    def test_checkpoint_round_trip(self, name, unet, images, tmp_path):
        from difftune.trainables.heads.checkpoint import load_head, save_head

        head, inputs = make(name, unet, images, seed=2)
        cfg = TrialConfig.from_dict({**CONFIGS[name], "seed": 2})
        shapes = {} if isinstance(head, DifFeed) else {k: tuple(v.shape[1:])
                                                       for k, v in inputs.items()}
        save_head(tmp_path, head, cfg, epoch=1, shapes=shapes, num_classes=CLASSES)
        loaded, loaded_cfg, _ = load_head(tmp_path)
        assert loaded_cfg == cfg and type(loaded) is type(head)
        head.eval()
        with torch.no_grad():
            assert torch.equal(head(inputs), loaded(inputs))

    def test_declared_settings_and_blocks(self, name, unet, images):
        kind = heads.head_kind(name)
        cfg = TrialConfig.from_dict(CONFIGS[name])
        assert set(kind.settings) <= set(TrialConfig.__dataclass_fields__)
        if not kind.live_unet:  # a feature head reads exactly the maps it requests
            head, inputs = make(name, unet, images)
            assert {(t, b) for t, b, _ in kind.requests(cfg)} == set(inputs)
            assert kind.blocks(cfg) == sorted({b for _, b in inputs})
