"""The paper's way (``--no-cache``): run the frozen U-Net on every batch of every epoch, with
a fresh noise draw at every forward pass and, while training, a fresh random crop + flip of
every image (:func:`~.views.crop_flip`), instead of reading stored features.

:class:`OnlineFeatures` is a :class:`~.pipeline.FeatureSource` whose datasets hold
images and whose ``wrap(head)`` puts the live U-Net in front of the head. The wrapper's
``state_dict()`` and ``parameters()`` are the head's only: checkpoints stay head-sized and
load into the bare head.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import ImageItems
from difftune.trainables.data.order import Rung, rung_subset
from difftune.trainables.data.views import crop_flip
from difftune.trainables.heads import Request
from difftune.trainables.model.features import Extractor, block_shapes
from difftune.trainables.pipeline import SPLITS, TrialData, UNetSource, trial_dataset

logger = logging.getLogger(__name__)


class OnlineHead(nn.Module):
    """``head(features of a live U-Net pass)``; the U-Net is held in a plain attribute (the
    :class:`Extractor`), never as a submodule, so it is neither trained, saved nor moved."""

    def __init__(self, head: nn.Module, extractor: Extractor, requests: Sequence[Request]):
        super().__init__()
        self.head = head
        self.extractor = extractor  # not an nn.Module: not registered
        self.by_t: dict[int, dict[int, int]] = {}
        for t, b, p in requests:
            self.by_t.setdefault(t, {})[b] = p

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """:param inputs: ``{"image": [N x 3 x H x W], "index": [N]}``;
        :return: [N x classes] logits."""
        x = inputs["image"]
        if self.training:  # the paper's augmentation, fresh at every pass
            x = crop_flip(x)
        try:
            target = next(self.head.parameters()).device
        except StopIteration:
            target = x.device
        feats: dict[tuple[int, int], torch.Tensor] = {}
        for t, pools in self.by_t.items():
            noise = torch.randn(x.shape, device=x.device)  # fresh at every pass, as the paper
            for b, f in self.extractor.extract(x, t, pools, noise=noise).items():
                feats[(t, b)] = f.to(target)
        return self.head(feats)

    def state_dict(self, *args, **kwargs):
        return self.head.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.head.load_state_dict(state_dict, strict=strict, assign=assign)


class OnlineFeatures(UNetSource):
    """Feature source that recomputes features on every batch (no cache)."""

    def prepare(self, cfg: TrialConfig, requests: Sequence[Request],
                splits: Sequence[str] = SPLITS, *, rung: Rung | None = None) -> TrialData:
        model = self.unet_for(cfg)
        loaded = {s: trial_dataset(cfg, s, model.image_size) for s in splits}
        loaded = {s: (rung_subset(ds, rung), c) for s, (ds, c) in loaded.items()}
        native = block_shapes(model)
        shapes = {(t, b): (native[b][0], p, p) for t, b, p in requests}
        extractor = self.extractor
        classes = next(iter(loaded.values()))[1]
        return TrialData({s: ImageItems(ds) for s, (ds, _) in loaded.items()}, shapes,
                         len(classes), wrap=lambda head: OnlineHead(head, extractor, requests))
