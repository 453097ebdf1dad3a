"""Heads trained on frozen U-Net features, and the one registry of head kinds.

Every kind declares what it reads, how much GPU a trial of it needs, whether it runs the live
U-Net, and which settings it reads (:class:`~.base.HeadKind`). A new head is one new module
with its ``HeadKind`` and one line in :data:`KINDS`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difftune.trainables.config import TrialConfig
from difftune.trainables.errors import ConfigError
from difftune.trainables.heads.base import HeadKind, Key, Request, Shape, UNet
from difftune.trainables.heads.diffeed import DIFFEED, DifFeed, build_diffeed
from difftune.trainables.heads.difformer import ATTENTION, DIFFORMER, AttentionHead, DifFormer
from difftune.trainables.heads.linear import LINEAR, LinearHead
from difftune.trainables.heads.mlp import MLP, MLPHead

#: every head kind by its ``head`` setting, in the order help texts list them
KINDS: dict[str, HeadKind] = {k.name: k for k in (LINEAR, MLP, ATTENTION, DIFFORMER, DIFFEED)}
HEAD_TYPES: tuple[str, ...] = tuple(KINDS)

__all__ = ["HEAD_TYPES", "KINDS", "AttentionHead", "DifFeed", "DifFormer", "HeadKind", "Key",
           "LinearHead", "MLPHead", "Request", "Shape", "UNet", "build_diffeed", "build_head",
           "checked_config", "feature_requests", "head_kind"]


def head_kind(name: str) -> HeadKind:
    """The kind of head ``name``; :class:`ConfigError` naming the allowed ones otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"head={name!r} is unknown; allowed: {list(HEAD_TYPES)}") from None


def checked_config(settings: dict[str, Any] | TrialConfig) -> TrialConfig:
    """A trial's settings as a :class:`TrialConfig` its head kind can build: the checks of
    :meth:`TrialConfig.from_dict`, the head's name and the head kind's own checks;
    :class:`ConfigError` naming the setting and what is allowed otherwise."""
    cfg = settings if isinstance(settings, TrialConfig) else TrialConfig.from_dict(settings)
    kind = head_kind(cfg.head)
    if kind.validate is not None:
        kind.validate(cfg)
    return cfg


def feature_requests(cfg) -> list[Request]:
    """The ``(t, block, pool)`` maps the head of ``cfg`` reads (empty for a live head)."""
    return head_kind(cfg.head).requests(cfg)


def build_head(cfg, shapes: dict[Key, Shape], num_classes: int, *,
               unet: UNet | None = None) -> nn.Module:
    """The head of ``cfg``, seeded by ``cfg.seed``, for features of ``shapes`` ((t, block) ->
    (C, h, w)); a live head (DifFeed) is built around ``unet`` = ``(model, diffusion)``."""
    kind = head_kind(cfg.head)
    torch.manual_seed(cfg.seed)
    return kind.build(cfg, shapes, num_classes, unet)
