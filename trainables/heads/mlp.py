"""The MLP head: BatchNorm + hidden layers (ReLU, dropout) on one pooled ``(t, block)`` map."""

from __future__ import annotations

import torch
from torch import nn

from difftune.trainables.errors import ConfigError
from difftune.trainables.heads.base import HeadKind, Key, Shape
from difftune.trainables.heads.linear import single_request


class MLPHead(nn.Module):
    """:param hidden: widths of the hidden layers; :param dropout: after each of them."""

    def __init__(self, key: Key, shape: Shape, num_classes: int, hidden: list[int],
                 dropout: float = 0.0):
        super().__init__()
        self.key = key
        dim = shape[0] * shape[1] * shape[2]
        layers: list[nn.Module] = [nn.BatchNorm1d(dim, affine=False)]
        for width in hidden:
            layers += [nn.Linear(dim, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            dim = width
        layers.append(nn.Linear(dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, feats: dict[Key, torch.Tensor]) -> torch.Tensor:
        """:param feats: (t, block) -> [N x C x p x p]; :return: [N x classes] logits."""
        return self.net(feats[self.key].flatten(1).float())


def _validate(cfg) -> None:
    if not cfg.hidden or any(w <= 0 for w in cfg.hidden):
        raise ConfigError(f"hidden={cfg.hidden} must list positive layer widths, e.g. [256]")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout={cfg.dropout} must be in [0, 1)")


def _build(cfg, shapes: dict[Key, Shape], num_classes: int, unet=None) -> MLPHead:
    key = (cfg.t, cfg.block)
    return MLPHead(key, shapes[key], num_classes, cfg.hidden, cfg.dropout)


MLP = HeadKind(name="mlp", build=_build, requests=single_request,
               settings=("block", "t", "pool", "hidden", "dropout"), gpus=0.1,
               validate=_validate)
