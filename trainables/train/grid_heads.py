"""The heads of a grid as one module: dinov2's ``ModuleDict`` of classifiers, with linear heads
that read the same input fused into one batched matmul.

Each head is built exactly as a trial of its grid point would build it (seeded by the
trial's seed), so a head trained in a grid computes what it would compute trained alone: the
losses are summed, and a sum's gradient for one head's parameters is that head's own
gradient; each head gets its own param group; a head with dropout draws its masks from its
own random stream, started where a trial of it alone would start it. On the CPU the numbers
are bitwise those of the head trained alone.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from difftune.trainables.config import TrialConfig
from difftune.trainables.heads import Key, Shape, UNet, build_head
from difftune.trainables.heads.linear import LinearHead, linear_heads

logger = logging.getLogger(__name__)


def rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's global random state (CPU, and CUDA when there is one)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


class HeadGrid(nn.Module):
    """``K`` heads on the same inputs (a single head: ``K = 1``); ``forward`` returns each
    head's ``[N x classes]`` logits (None for a head switched off by :meth:`drop`).

    :param heads: the heads, in grid-point order.
    :param rng: each head's random state at the start of training (None: no own stream).
    :param points: each head's grid point.
    :param shapes: ``(t, block) -> (C, p, p)`` the heads were built for (empty: live heads);
        :param num_classes: their classes. :param gflops: each head's GFLOPs per image.
    """

    def __init__(self, heads: Sequence[nn.Module],
                 rng: Sequence[tuple[torch.Tensor, torch.Tensor | None] | None] | None = None,
                 *, points: Sequence[dict[str, Any]] = (),
                 shapes: dict[Key, Shape] | None = None, num_classes: int = 0,
                 gflops: Sequence[float] = ()):
        super().__init__()
        self.heads = nn.ModuleDict({str(i): h for i, h in enumerate(heads)})
        self.shapes, self.num_classes = dict(shapes or {}), num_classes
        self.points = list(points) or [{} for _ in heads]
        self.gflops = list(gflops) or [float("nan")] * len(heads)
        self.active = [True] * len(heads)
        self.rng = list(rng) if rng is not None else [None] * len(heads)
        groups: dict[Key, list[int]] = {}
        for i, h in enumerate(heads):
            if type(h) is LinearHead:
                groups.setdefault(h.key, []).append(i)
        #: indices of linear heads on one input, computed in one batched matmul
        self.fused: list[list[int]] = [g for g in groups.values() if len(g) > 1]
        fused = {i for g in self.fused for i in g}
        self.alone = [i for i in range(len(heads)) if i not in fused]

    def __len__(self) -> int:
        return len(self.heads)

    def head(self, i: int) -> nn.Module:
        return self.heads[str(i)]

    @property
    def unet_images(self) -> int:
        """Images the heads passed through a live U-Net themselves (DifFeed)."""
        return sum(int(getattr(h, "unet_images", 0)) for h in self.heads.values())

    def drop(self, i: int) -> None:
        """Stop computing head ``i`` (it diverged); a fused head's slice still runs."""
        self.active[i] = False

    def forward(self, feats: Any) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(self.heads)
        for group in self.fused:
            lead = self.head(group[0])
            x = lead.norm(feats[lead.key].flatten(1).float())
            fcs = [self.head(i).fc for i in group]
            logits = linear_heads(x, torch.stack([fc.weight for fc in fcs]),
                                  torch.stack([fc.bias for fc in fcs]))
            for i, x_i in zip(group, logits.unbind(0), strict=True):  # one backward op
                if self.active[i]:
                    out[i] = x_i
        for i in self.alone:
            if self.active[i]:
                out[i] = self._run(i, feats)
        return out

    def _run(self, i: int, feats: Any) -> torch.Tensor:
        state = self.rng[i]
        if not self.training or state is None:
            return self.head(i)(feats)
        outer = rng_state()
        _set_rng_state(state)
        try:
            return self.head(i)(feats)
        finally:
            self.rng[i] = rng_state()
            _set_rng_state(outer)

    def plain(self, i: int) -> nn.Module:
        """Head ``i`` alone, as a trial of its grid point would hold it (a copy, unless the
        grid holds one head); a fused head gets the shared BatchNorm statistics."""
        if len(self) == 1:
            return self.head(0)
        head = copy.deepcopy(self.head(i))
        for group in self.fused:
            if i in group and i != group[0]:
                head.norm.load_state_dict(self.head(group[0]).norm.state_dict())
        return head

    def extra_state(self) -> dict[str, Any]:
        """What resuming needs besides ``state_dict()``: which heads run, their streams."""
        return {"active": list(self.active), "rng": list(self.rng)}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.active = list(extra["active"])
        self.rng = [tuple(s) if s is not None else None for s in extra["rng"]]


def build_grid(cfgs: Sequence[TrialConfig], shapes: dict[Key, Shape], num_classes: int, *,
               unet: UNet | None = None) -> HeadGrid:
    """The heads of ``cfgs`` (one per grid point), each seeded as a trial of it alone."""
    heads, rng = [], []
    for cfg in cfgs:
        heads.append(build_head(cfg, shapes, num_classes, unet=unet))
        rng.append(rng_state())  # where a trial of this head alone starts training
    grid = HeadGrid(heads, rng, shapes=shapes, num_classes=num_classes)
    if grid.fused:
        logger.info("grid of %d heads: %d linear heads fused into %d batched matmul(s)",
                    len(grid), sum(len(g) for g in grid.fused), len(grid.fused))
    return grid
