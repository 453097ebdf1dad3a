"""The linear probe: BatchNorm without affine (as in MAE's linear probe) + one linear layer on
the pooled, flattened map of one ``(t, block)``."""

from __future__ import annotations

import torch
from torch import nn

from .base import HeadKind, Key, Shape


class LinearHead(nn.Module):
    """:param key: the ``(t, block)`` read; :param shape: its map ``(C, p, p)``."""

    def __init__(self, key: Key, shape: Shape, num_classes: int):
        super().__init__()
        self.key = key
        dim = shape[0] * shape[1] * shape[2]
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, feats: dict[Key, torch.Tensor]) -> torch.Tensor:
        """:param feats: (t, block) -> [N x C x p x p]; :return: [N x classes] logits."""
        return self.fc(self.norm(feats[self.key].flatten(1).float()))


def single_request(cfg) -> list[tuple[int, int, int]]:
    """``[(t, block, pool)]``: the one map a linear or MLP head reads."""
    return [(cfg.t, cfg.block, cfg.pool)]


def _build(cfg, shapes: dict[Key, Shape], num_classes: int, unet=None) -> LinearHead:
    key = (cfg.t, cfg.block)
    return LinearHead(key, shapes[key], num_classes)


LINEAR = HeadKind(name="linear", build=_build, requests=single_request,
                  settings=("block", "t", "pool"), gpus=0.1)
