"""The paper's attention head and DifFormer on frozen U-Net feature maps.

Both read ``feats``: a dict ``(t, block) -> [N x C x s x s]`` of maps pooled to ``min(pre_pool,
native size)`` by the feature source, and return ``[N x classes]`` logits.

- **Attention head** (``head: attention``): the map of one ``(t, block)`` goes through a
  :class:`~.transformer.PreLayer` (LayerNorm over ``[C, s, s]`` or BatchNorm2d, a 1x1 conv to
  ``dim``, ``s * s`` tokens plus a learned positional embedding); a learnable CLS token is put
  first; ``depth`` pre-norm transformer blocks; the CLS output goes into a linear classifier.
  The paper's setting is ``Attention:1024:8:4:2`` on block 24, t 150, pre-pool 16.
- **DifFormer** (``head: difformer``): one pre-layer per block of ``cfg.blocks`` (shared across
  timesteps); per timestep the tokens of all blocks are concatenated behind one CLS token and
  go through one transformer shared across timesteps; the CLS outputs of all timesteps of
  ``cfg.timesteps`` are concatenated (``T * dim``) into one linear classifier.

The attention head is the DifFormer of one block and one timestep.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from difftune.trainables.errors import ConfigError
from difftune.trainables.heads.base import HeadKind, Key, Shape
from difftune.trainables.heads.transformer import (
    TRANSFORMER_SETTINGS,
    CLSTransformer,
    PreLayer,
    check_transformer_settings,
    transformer_kwargs,
)


class DifFormer(nn.Module):
    """Pre-layers per block, one transformer shared across timesteps, a linear classifier on
    the concatenated CLS outputs of all timesteps.

    :param blocks: block numbers, in token order.
    :param timesteps: diffusion steps, in classifier-input order.
    :param shapes: ``(t, block) -> (C, s, s)`` for every block and timestep.
    """

    def __init__(self, blocks: Sequence[int], timesteps: Sequence[int], shapes: dict[Key, Shape],
                 num_classes: int, *, dim: int = 1024, heads: int = 8, depth: int = 2,
                 mlp_ratio: float = 4.0, norm: str = "layernorm"):
        super().__init__()
        self.blocks = list(dict.fromkeys(int(b) for b in blocks))
        self.timesteps = list(dict.fromkeys(int(t) for t in timesteps))
        if not self.blocks or not self.timesteps:
            raise ConfigError("blocks and timesteps must each name at least one value")
        missing = [(t, b) for t in self.timesteps for b in self.blocks if (t, b) not in shapes]
        if missing:
            raise ValueError(f"no feature shapes for (t, block) {missing}")
        for b in self.blocks:
            first = tuple(shapes[(self.timesteps[0], b)])
            other = {t: tuple(shapes[(t, b)]) for t in self.timesteps if tuple(shapes[(t, b)]) != first}
            if other:
                raise ValueError(f"block {b} has map {first} at t={self.timesteps[0]} but {other}")
        self.pre = nn.ModuleDict({str(b): PreLayer(shapes[(self.timesteps[0], b)], dim, norm)
                                  for b in self.blocks})
        self.transformer = CLSTransformer(dim, heads, depth, mlp_ratio)
        self.fc = nn.Linear(len(self.timesteps) * dim, num_classes)

    def forward(self, feats: dict[Key, torch.Tensor]) -> torch.Tensor:
        """:param feats: (t, block) -> [N x C x s x s]; :return: [N x classes] logits."""
        steps = len(self.timesteps)
        # all timesteps at once: [T*N x C x s x s] per block -> [T*N x L_b x dim]
        tokens = torch.cat(
            [self.pre[str(b)](torch.cat([feats[(t, b)] for t in self.timesteps]))
             for b in self.blocks],
            dim=1,
        )
        cls = self.transformer(tokens)  # [T*N x dim]
        n = len(cls) // steps
        cls = cls.reshape(steps, n, -1).transpose(0, 1).reshape(n, -1)  # [N x T*dim]
        return self.fc(cls)


class AttentionHead(DifFormer):
    """The attention head: a DifFormer on a single ``(t, block)``."""

    def __init__(self, key: Key, shape: Shape, num_classes: int, **kwargs):
        t, b = key
        super().__init__([b], [t], {key: shape}, num_classes, **kwargs)


def attention_requests(cfg) -> list[tuple[int, int, int]]:
    """``[(t, block, pre_pool)]``: the pipeline clamps ``pre_pool`` to the native size."""
    return [(cfg.t, cfg.block, cfg.pre_pool)]


def difformer_requests(cfg) -> list[tuple[int, int, int]]:
    """``(t, block, pre_pool)`` for every timestep of ``cfg.timesteps`` x block of
    ``cfg.blocks``."""
    return [(t, b, cfg.pre_pool) for t in dict.fromkeys(cfg.timesteps)
            for b in dict.fromkeys(cfg.blocks)]


def _build_attention(cfg, shapes: dict[Key, Shape], num_classes: int, unet=None) -> AttentionHead:
    key = (cfg.t, cfg.block)
    return AttentionHead(key, shapes[key], num_classes, **transformer_kwargs(cfg))


def _build_difformer(cfg, shapes: dict[Key, Shape], num_classes: int, unet=None) -> DifFormer:
    return DifFormer(cfg.blocks, cfg.timesteps, shapes, num_classes, **transformer_kwargs(cfg))


def _check_difformer(cfg) -> None:
    check_transformer_settings(cfg)
    if not cfg.blocks or not cfg.timesteps:
        raise ConfigError("difformer needs non-empty blocks and timesteps")


ATTENTION = HeadKind(name="attention", build=_build_attention, requests=attention_requests,
                     settings=("block", "t", *TRANSFORMER_SETTINGS), gpus=0.25,
                     validate=check_transformer_settings)
DIFFORMER = HeadKind(name="difformer", build=_build_difformer, requests=difformer_requests,
                     settings=("blocks", "timesteps", *TRANSFORMER_SETTINGS), gpus=0.5,
                     validate=_check_difformer)
