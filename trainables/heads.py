"""Heads trained on frozen U-Net features, and the registry that builds them by name.

Every feature head takes ``feats``: a dict ``(t, block) -> [N x C x h x w] Tensor`` and
returns ``[N x classes]`` logits. A head declares which features it needs with
``feature_requests(cfg)``: a list of ``(t, block, pool)``, so that the trainable (and the
feature cache) can fetch exactly those.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ConfigError, TrialConfig

Key = tuple[int, int]  # (t, block)
Shape = tuple[int, int, int]  # (C, h, w)


class LinearHead(nn.Module):
    """BatchNorm (no affine, as in MAE's linear probe) + one linear layer on the pooled,
    flattened map of a single (t, block)."""

    def __init__(self, key: Key, shape: Shape, num_classes: int):
        super().__init__()
        self.key = key
        dim = shape[0] * shape[1] * shape[2]
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, feats: dict[Key, torch.Tensor]) -> torch.Tensor:
        """:param feats: (t, block) -> [N x C x p x p]; :return: [N x classes] logits."""
        return self.fc(self.norm(feats[self.key].flatten(1).float()))


class MLPHead(nn.Module):
    """BatchNorm + an MLP (``hidden`` sizes, ReLU, dropout) on a single (t, block)."""

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
        return self.net(feats[self.key].flatten(1).float())


def _single(cfg: TrialConfig) -> list[tuple[int, int, int]]:
    return [(cfg.t, cfg.block, cfg.pool)]


HeadBuilder = Callable[[TrialConfig, dict[Key, Shape], int], nn.Module]

#: head name -> (feature_requests(cfg), build(cfg, shapes, num_classes))
REGISTRY: dict[str, tuple[Callable[[TrialConfig], list[tuple[int, int, int]]], HeadBuilder]] = {
    "linear": (_single, lambda cfg, shapes, n: LinearHead((cfg.t, cfg.block),
                                                         shapes[(cfg.t, cfg.block)], n)),
    "mlp": (_single, lambda cfg, shapes, n: MLPHead((cfg.t, cfg.block),
                                                   shapes[(cfg.t, cfg.block)], n,
                                                   cfg.hidden, cfg.dropout)),
}


def register(name: str, requests: Callable[[TrialConfig], list[tuple[int, int, int]]],
             builder: HeadBuilder) -> None:
    """Add a head type (used by the attention / DifFormer / DifFeed modules)."""
    REGISTRY[name] = (requests, builder)


def _ensure_all() -> None:
    """Register the attention, DifFormer and DifFeed heads (their modules import this one)."""
    from . import diffeed, heads_attention  # noqa: F401


def feature_requests(cfg: TrialConfig) -> list[tuple[int, int, int]]:
    """The ``(t, block, pool)`` feature maps the head of ``cfg`` reads."""
    _ensure_all()
    return REGISTRY[cfg.head][0](cfg)


def build_head(cfg: TrialConfig, shapes: dict[Key, Shape], num_classes: int) -> nn.Module:
    """Build the head of ``cfg`` for features of ``shapes`` ((t, block) -> (C, h, w))."""
    _ensure_all()
    if cfg.head not in REGISTRY:
        raise ConfigError(f"head={cfg.head!r} is not available; allowed: {sorted(REGISTRY)}")
    torch.manual_seed(cfg.seed)
    return REGISTRY[cfg.head][1](cfg, shapes, num_classes)
