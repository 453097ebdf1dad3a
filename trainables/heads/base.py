"""What every kind of head declares: the one interface the pipeline, the checkpoint format,
the driver's resources and the search space use, so that a new head is one new module and
one line in :mod:`difftune.trainables.heads`.

A head is an ``nn.Module`` whose forward takes what its kind reads and returns ``[N x
classes]`` logits:

- a *feature head* (``live_unet`` False) reads ``feats``: a dict ``(t, block) -> [N x C x p x
  p]`` of stored (or freshly extracted) maps, those of ``requests(cfg)``;
- a *live head* (``live_unet`` True, DifFeed) reads images ``{"image": [N x 3 x H x W],
  "index": [N]}`` and runs the frozen U-Net itself, which it gets at build time.

All heads are trained by :func:`difftune.trainables.train.loop.train_heads` and saved in one format
(:mod:`difftune.trainables.heads.checkpoint`): ``state_dict()`` holds the trainable head only, never
the U-Net.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from difftune.trainables.config import TrialConfig

Key = tuple[int, int]  # (t, block)
Shape = tuple[int, int, int]  # (C, h, w)
Request = tuple[int, int, int]  # (t, block, pool)
#: ``(model, diffusion)`` of the frozen U-Net
UNet = tuple[nn.Module, Any]


@dataclass(frozen=True)
class HeadKind:
    """One kind of head.

    :param name: the value of the ``head`` setting.
    :param build: ``build(cfg, shapes, num_classes, unet)`` -> the head module; ``shapes``
        maps each requested ``(t, block)`` to ``(C, p, p)``; ``unet`` is the frozen
        ``(model, diffusion)`` (only live heads use it).
    :param requests: ``requests(cfg)`` -> the ``(t, block, pool)`` maps the head reads (a
        pool larger than a block's map is clamped to it by the feature source); empty for a
        live head.
    :param settings: the trial settings the head reads besides the training recipe (the
        search need not vary the others for this head).
    :param gpus: the GPU fraction a trial of this head asks for by default.
    :param live_unet: the head runs the U-Net itself on every batch (reads images).
    :param validate: raises :class:`~difftune.trainables.errors.ConfigError` for settings
        that cannot build this head (None: any settings :class:`TrialConfig` allows).
    """

    name: str
    build: Callable[..., nn.Module]
    requests: Callable[[TrialConfig], list[Request]]
    settings: tuple[str, ...]
    gpus: float
    live_unet: bool = False
    validate: Callable[[TrialConfig], None] | None = None

    def blocks(self, cfg: TrialConfig) -> list[int]:
        """The U-Net blocks a trial of this head reads (for its extraction cost)."""
        if self.live_unet:
            return sorted({cfg.block, *getattr(cfg, "feedback_blocks", [])})
        return sorted({b for _, b, _ in self.requests(cfg)})
