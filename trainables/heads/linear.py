"""The linear probe: BatchNorm without affine (as in MAE's linear probe) + one linear layer on
the pooled, flattened map of one ``(t, block)``.

The linear layer runs through :func:`linear_heads`, the batched matmul a grid of linear heads
on the same input shares (:mod:`difftune.trainables.train.grid_heads`): a head alone is the case of
one, so a head trained alone and the same head trained in a grid compute the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from difftune.trainables.heads.base import HeadKind, Key, Shape


def linear_heads(x: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """``K`` linear layers on one input in one batched matmul.

    :param x: ``[N x D]`` input; :param weights: ``[K x classes x D]``; :param biases: ``[K x
        classes]``. :return: ``[K x N x classes]`` logits.

    On the CPU each head's slice is bitwise what it would be with ``K = 1`` (forward and
    gradients), which :class:`LinearHead` uses.
    """
    k = weights.shape[0]
    return torch.baddbmm(biases[:, None, :], x.expand(k, *x.shape), weights.transpose(1, 2))


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
        x = self.norm(feats[self.key].flatten(1).float())
        return linear_heads(x, self.fc.weight[None], self.fc.bias[None])[0]


def single_request(cfg) -> list[tuple[int, int, int]]:
    """``[(t, block, pool)]``: the one map a linear or MLP head reads."""
    return [(cfg.t, cfg.block, cfg.pool)]


def _build(cfg, shapes: dict[Key, Shape], num_classes: int, unet=None) -> LinearHead:
    key = (cfg.t, cfg.block)
    return LinearHead(key, shapes[key], num_classes)


LINEAR = HeadKind(name="linear", build=_build, requests=single_request,
                  settings=("block", "t", "pool"), gpus=0.1)
