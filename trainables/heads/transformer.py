"""Transformer building blocks of the attention, DifFormer and DifFeed heads (the paper's
``Attention:1024:8:4:2``: dim 1024, 8 heads, MLP ratio 4, 2 blocks, no qkv bias), and the one
check of their settings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difftune.trainables.errors import ConfigError
from difftune.trainables.heads.base import Shape

NORMS = ("layernorm", "batchnorm")
#: the trial settings a transformer head reads
TRANSFORMER_SETTINGS = ("pre_pool", "dim", "heads", "depth", "mlp_ratio", "norm")


def check_transformer_settings(cfg) -> None:
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


def transformer_kwargs(cfg) -> dict:
    """The keyword arguments of a transformer head built for ``cfg`` (checked)."""
    check_transformer_settings(cfg)
    return dict(dim=cfg.dim, heads=cfg.heads, depth=cfg.depth, mlp_ratio=cfg.mlp_ratio,
                norm=cfg.norm)
