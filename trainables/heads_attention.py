"""The paper's attention head and DifFormer: transformer heads on frozen U-Net feature maps.

Both read ``feats``: a dict ``(t, block) -> [N x C x s x s]`` of maps already adaptive-avg-
pooled to ``min(pre_pool, native size)`` by the feature source, and return ``[N x classes]``
logits.

- **Attention head** (``head: attention``): the map of one ``(t, block)`` goes through a
  :class:`PreLayer` (LayerNorm over ``[C, s, s]`` or BatchNorm2d, a 1x1 conv to ``dim``,
  flattened to ``s * s`` tokens plus a learned positional embedding); a learnable CLS token
  is put first; ``depth`` pre-norm transformer blocks (``heads`` heads, MLP ratio
  ``mlp_ratio``, no qkv bias); the CLS output goes into a linear classifier. The paper's
  setting is ``Attention:1024:8:4:2`` (dim 1024, 8 heads, ratio 4, 2 blocks) on block 24,
  t 150, pre-pool 16.
- **DifFormer** (``head: difformer``): one pre-layer per block of ``cfg.blocks`` (shared
  across timesteps); per timestep the tokens of all blocks are concatenated behind one CLS
  token and go through one transformer shared across timesteps; the CLS outputs of all
  timesteps of ``cfg.timesteps`` are concatenated (``T * dim``) into one linear classifier.

The attention head is the DifFormer of one block and one timestep.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import heads
from .config import ConfigError, TrialConfig
from .heads import Key, Shape

logger = logging.getLogger(__name__)

NORMS = ("layernorm", "batchnorm")


def check_transformer_settings(cfg: TrialConfig) -> None:
    """Raise :class:`ConfigError` for transformer settings that cannot build a head."""
    if cfg.norm not in NORMS:
        raise ConfigError(f"norm={cfg.norm!r} is unknown; allowed: {list(NORMS)}")
    if cfg.dim <= 0 or cfg.heads <= 0 or cfg.dim % cfg.heads != 0:
        raise ConfigError(
            f"dim={cfg.dim} must be a positive multiple of heads={cfg.heads} "
            "(each head gets dim / heads channels)"
        )
    if cfg.depth < 1:
        raise ConfigError(f"depth={cfg.depth} must be >= 1 (number of transformer blocks)")
    if cfg.mlp_ratio <= 0 or int(cfg.dim * cfg.mlp_ratio) < 1:
        raise ConfigError(f"mlp_ratio={cfg.mlp_ratio} must be > 0 (MLP width = dim * mlp_ratio)")


class PreLayer(nn.Module):
    """Normalise one block's map, project it to ``dim`` channels, flatten it to tokens.

    :param shape: ``(C, s, s)`` of the (pooled) map.
    :param norm: ``layernorm`` (over ``[C, s, s]``, the paper's choice) or ``batchnorm``.
    """

    def __init__(self, shape: Shape, dim: int, norm: str = "layernorm"):
        super().__init__()
        channels, h, w = shape
        self.shape = tuple(shape)
        if norm == "layernorm":
            self.norm: nn.Module = nn.LayerNorm([channels, h, w])
        elif norm == "batchnorm":
            self.norm = nn.BatchNorm2d(channels)
        else:
            raise ConfigError(f"norm={norm!r} is unknown; allowed: {list(NORMS)}")
        self.proj = nn.Conv2d(channels, dim, kernel_size=1)
        self.pos = nn.Parameter(torch.zeros(1, h * w, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x C x s x s] Tensor; :return: an [N x s*s x dim] Tensor of tokens."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"pre-layer built for maps {self.shape}, got {tuple(x.shape[1:])}")
        x = self.proj(self.norm(x.float()))
        return x.flatten(2).transpose(1, 2) + self.pos


class Attention(nn.Module):
    """Multi-head self-attention without qkv bias (output projection with bias)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x L x D] Tensor; :return: an [N x L x D] Tensor."""
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N x heads x L x D/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x L x D] Tensor; :return: an [N x L x D] Tensor."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLSTransformer(nn.Module):
    """A CLS token put before the tokens, ``depth`` blocks, a final LayerNorm; reads the CLS
    output."""

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """:param tokens: an [N x L x D] Tensor; :return: the [N x D] CLS output."""
        cls = self.cls_token.expand(len(tokens), -1, -1).to(tokens.dtype)
        x = self.blocks(torch.cat([cls, tokens], dim=1))
        return self.norm(x[:, 0])


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


def transformer_kwargs(cfg: TrialConfig) -> dict:
    check_transformer_settings(cfg)
    return dict(dim=cfg.dim, heads=cfg.heads, depth=cfg.depth, mlp_ratio=cfg.mlp_ratio,
                norm=cfg.norm)


def attention_requests(cfg: TrialConfig) -> list[tuple[int, int, int]]:
    """``[(t, block, pre_pool)]``: the pipeline clamps ``pre_pool`` to the native size."""
    return [(cfg.t, cfg.block, cfg.pre_pool)]


def difformer_requests(cfg: TrialConfig) -> list[tuple[int, int, int]]:
    """``(t, block, pre_pool)`` for every timestep of ``cfg.timesteps`` x block of
    ``cfg.blocks``."""
    if not cfg.blocks or not cfg.timesteps:
        raise ConfigError("difformer needs non-empty blocks and timesteps")
    return [(t, b, cfg.pre_pool) for t in dict.fromkeys(cfg.timesteps)
            for b in dict.fromkeys(cfg.blocks)]


def build_attention(cfg: TrialConfig, shapes: dict[Key, Shape], num_classes: int) -> AttentionHead:
    key = (cfg.t, cfg.block)
    return AttentionHead(key, shapes[key], num_classes, **transformer_kwargs(cfg))


def build_difformer(cfg: TrialConfig, shapes: dict[Key, Shape], num_classes: int) -> DifFormer:
    return DifFormer(cfg.blocks, cfg.timesteps, shapes, num_classes, **transformer_kwargs(cfg))


heads.register("attention", attention_requests, build_attention)
heads.register("difformer", difformer_requests, build_difformer)
