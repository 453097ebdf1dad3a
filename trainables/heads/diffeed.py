"""DifFeed: feed decoder features of a frozen U-Net back into its encoder, then read a block
of the second pass with the attention head.

One forward of :class:`DifFeed` on images ``x0`` at diffusion step ``t``:

1. **First pass** (no gradients) through blocks ``1..max(feedback_blocks)`` of the frozen
   U-Net on ``x_t = q_sample(x0, t, seeded noise)``; it keeps the outputs of the decoder
   blocks ``b`` of ``cfg.feedback_blocks`` (paper: 21, 24, 27, 30, 33, 36 at t 150).
2. Each kept map goes through its own **feedback module** (mapping its channels to those of
   the *mirror* encoder block ``m = N + 1 - b`` of an ``N``-block U-Net, e.g. 17, 14, 11,
   8, 5, 2 for the 37-block paper256 model), is resized bilinearly to block ``m``'s spatial
   size and is **added to the output of block m** during
3. a **second pass** through blocks ``1..cfg.block`` on the same ``x_t``. This pass runs
   with gradients (through the frozen U-Net, whose weights never change) so that the
   feedback modules learn.
4. Block ``cfg.block`` of the second pass, adaptive-avg-pooled to ``min(pre_pool, size)``,
   feeds the attention head (:class:`~.difformer.AttentionHead`).

Feedback modules (``cfg.feedback_arch``) are written in the paper's letter codes, joined by
``_`` and read left to right:

- ``C``: the first ``C`` is a 1x1 conv without bias from the decoder block's channels to the
  mirror block's channels; a later ``C`` is a depthwise 3x3 conv without bias on them;
- ``B``: BatchNorm2d;  ``R``: ReLU;  ``S``: SiLU;  ``G``: GroupNorm (32 groups or fewer).

So ``C`` is a plain projection, ``C_B`` projection + BatchNorm, ``C_R`` projection + ReLU,
``C_B_R`` (the paper's) projection + BatchNorm + ReLU, ``C_B_R_C`` adds a depthwise 3x3 conv.
A code must start with ``C`` (the channel mapping).

The U-Net is held outside the module's registered children: ``state_dict()`` and
``parameters()`` hold only the feedback modules and the head, and ``.train()`` never puts
the U-Net out of eval mode. Both passes are counted as U-Net image-passes
(:attr:`DifFeed.unet_images`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difftune.trainables.errors import ConfigError
from difftune.trainables.heads.base import HeadKind
from difftune.trainables.heads.difformer import AttentionHead
from difftune.trainables.heads.transformer import (
    TRANSFORMER_SETTINGS,
    check_transformer_settings,
    transformer_kwargs,
)
from difftune.trainables.model.features import (
    ExtractionError,
    Extractor,
    autocast_for,
    block_shapes,
    check_timestep,
    model_timesteps,
    run_blocks,
)
from difftune.trainables.model.geometry import geometry_of_model

logger = logging.getLogger(__name__)

FEEDBACK_CODES = ("C", "B", "R", "S", "G")

def mirror_block(model: nn.Module, block: int) -> int:
    """The encoder block mirroring decoder block ``block``: ``N + 1 - block``."""
    return geometry_of_model(model).mirror(block)


def make_feedback(arch: str, in_channels: int, out_channels: int) -> nn.Sequential:
    """A feedback module from its letter code (see the module docstring).

    :return: a module mapping [N x in_channels x h x w] to [N x out_channels x h x w].
    """
    codes = [c for c in arch.split("_") if c]
    if not codes or codes[0] != "C" or any(c not in FEEDBACK_CODES for c in codes):
        raise ConfigError(
            f"feedback_arch={arch!r} is invalid; use letters {list(FEEDBACK_CODES)} joined by "
            "'_', starting with C (e.g. C, C_B, C_R, C_B_R)"
        )
    layers: list[nn.Module] = []
    for i, code in enumerate(codes):
        if code == "C" and i == 0:
            layers.append(nn.Conv2d(in_channels, out_channels, 1, bias=False))
        elif code == "C":
            layers.append(nn.Conv2d(out_channels, out_channels, 3, padding=1,
                                    groups=out_channels, bias=False))
        elif code == "B":
            layers.append(nn.BatchNorm2d(out_channels))
        elif code == "R":
            layers.append(nn.ReLU())
        elif code == "S":
            layers.append(nn.SiLU())
        else:  # G
            layers.append(nn.GroupNorm(math.gcd(32, out_channels), out_channels))
    return nn.Sequential(*layers)


def check_diffeed(cfg, model: nn.Module, diffusion: Any) -> None:
    """Raise a user error naming the valid range for bad blocks, timestep or feedback."""
    geo = geometry_of_model(model)
    n, middle = geo.num_blocks, geo.middle
    check_timestep(diffusion, cfg.t)
    if isinstance(cfg.block, bool) or not 1 <= cfg.block <= n:
        raise ExtractionError(f"block={cfg.block} is out of range; this model has blocks 1..{n}")
    if not cfg.feedback_blocks:
        raise ExtractionError(
            f"feedback_blocks is empty; allowed: decoder blocks {middle + 1}..{n}")
    if len(set(cfg.feedback_blocks)) != len(cfg.feedback_blocks):
        raise ExtractionError(f"feedback_blocks={cfg.feedback_blocks} repeats a block")
    bad = [b for b in cfg.feedback_blocks if not middle < b <= n]
    if bad:
        raise ExtractionError(
            f"feedback_blocks {bad} are not decoder blocks; allowed: {middle + 1}..{n} "
            f"(the middle block is {middle})"
        )
    deepest_mirror = max(mirror_block(model, b) for b in cfg.feedback_blocks)
    if cfg.block < deepest_mirror:
        raise ExtractionError(
            f"block={cfg.block} is read before the feedback of block "
            f"{n + 1 - deepest_mirror} is added at block {deepest_mirror}; allowed: "
            f"block {deepest_mirror}..{n} for feedback_blocks {cfg.feedback_blocks}"
        )


def _add_feedback(feedback: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return h + feedback.to(h.dtype)


class DifFeed(nn.Module):
    """Feedback modules + attention head around a frozen U-Net (kept out of the state).

    :param model: a frozen guided-diffusion U-Net (eval mode, gradients off).
    :param diffusion: its diffusion (for ``q_sample`` and timestep scaling).
    """

    def __init__(self, cfg, model: nn.Module, diffusion: Any, num_classes: int):
        super().__init__()
        check_diffeed(cfg, model, diffusion)
        model.eval().requires_grad_(False)
        # a plain tuple: not a registered child, so no U-Net in state_dict() / parameters()
        self._frozen = (model, diffusion, Extractor(model, diffusion))
        self.t, self.block, self.noise_seed = cfg.t, cfg.block, cfg.noise_seed
        self.feedback_blocks = sorted(cfg.feedback_blocks)
        self.mirrors = {b: mirror_block(model, b) for b in self.feedback_blocks}
        shapes = block_shapes(model)
        self.mirror_sizes = {m: shapes[m][1] for m in self.mirrors.values()}
        self.feedback = nn.ModuleDict({
            str(b): make_feedback(cfg.feedback_arch, shapes[b][0], shapes[m][0])
            for b, m in self.mirrors.items()
        })
        channels, side = shapes[cfg.block]
        self.pool = min(cfg.pre_pool, side)
        self.attention = AttentionHead((cfg.t, cfg.block), (channels, self.pool, self.pool),
                                       num_classes, **transformer_kwargs(cfg))

    @property
    def unet(self) -> nn.Module:
        return self._frozen[0]

    @property
    def diffusion(self) -> Any:
        return self._frozen[1]

    @property
    def unet_images(self) -> int:
        """Images passed through the U-Net so far (two passes per image per batch)."""
        return self._frozen[2].forward_images

    def noised(self, x0: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, model timesteps)`` for images [N x 3 x H x W] with dataset ``indices``."""
        x_t = self._frozen[2].noised(x0, self.t, indices=[int(i) for i in indices],
                                     seed=self.noise_seed)
        ts = model_timesteps(self.diffusion, torch.full((len(x0),), self.t, dtype=torch.long,
                                                         device=x0.device))
        return x_t, ts

    def first_pass(self, x_t: torch.Tensor, ts: torch.Tensor) -> dict[int, torch.Tensor]:
        """Decoder maps of the feedback blocks, without gradients: block -> [N x C x h x w]."""
        kept: dict[int, torch.Tensor] = {}

        def keep(b: int, h: torch.Tensor) -> None:
            if b in self.mirrors:
                kept[b] = h

        with torch.no_grad():
            run_blocks(self.unet, x_t, ts, upto=self.feedback_blocks[-1], on_block=keep)
        self._count(len(x_t))
        return kept

    def _count(self, n: int) -> None:
        extractor = self._frozen[2]
        extractor.forward_batches += 1
        extractor.forward_images += n

    def feedback_maps(self, first: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Mirror block -> feedback [N x C_m x s_m x s_m] to add to its output."""
        out = {}
        for b, m in self.mirrors.items():
            fb = self.feedback[str(b)](first[b])
            side = self.mirror_sizes[m]
            if fb.shape[-1] != side or fb.shape[-2] != side:
                fb = F.interpolate(fb, size=(side, side), mode="bilinear", align_corners=False)
            out[m] = fb
        return out

    def second_pass(self, x_t: torch.Tensor, ts: torch.Tensor, feedback: dict[int, torch.Tensor],
                    *, on_block: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Blocks ``1..cfg.block`` with the feedback added; :return: [N x C x s x s] output
        of the head's block (with gradients to the feedback)."""
        inject = {m: functools.partial(_add_feedback, fb) for m, fb in feedback.items()}
        out = run_blocks(self.unet, x_t, ts, upto=self.block, inject=inject, on_block=on_block)
        self._count(len(x_t))
        return out

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """:param inputs: ``{"image": [N x 3 x H x W] in [-1, 1], "index": [N] dataset
        indices}``; :return: [N x classes] logits."""
        if self.unet.training:
            self.unet.eval()
        device = next(self.unet.parameters()).device
        x0 = inputs["image"].to(device, torch.float32)
        indices = inputs["index"]
        indices = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        with autocast_for(device):
            x_t, ts = self.noised(x0, indices)
            h = self.second_pass(x_t, ts, self.feedback_maps(self.first_pass(x_t, ts)))
            pooled = F.adaptive_avg_pool2d(h.float(), self.pool)
            return self.attention({(self.t, self.block): pooled})


def build_diffeed(cfg, model: nn.Module, diffusion: Any, num_classes: int) -> DifFeed:
    """Build a seeded (``cfg.seed``) :class:`DifFeed` around a loaded frozen U-Net."""
    torch.manual_seed(cfg.seed)
    return DifFeed(cfg, model, diffusion, num_classes)


def _validate(cfg) -> None:
    check_transformer_settings(cfg)
    with torch.random.fork_rng():  # checking draws no number a trial would draw
        make_feedback(cfg.feedback_arch, 1, 1)  # the letter code alone


def _build(cfg, shapes: dict, num_classes: int, unet=None) -> DifFeed:
    if unet is None:
        raise ValueError("a DifFeed head is built around its frozen U-Net: pass unet=")
    model, diffusion = unet
    return DifFeed(cfg, model, diffusion, num_classes)


DIFFEED = HeadKind(name="diffeed", build=_build, requests=lambda cfg: [],
                   settings=("block", "t", "feedback_blocks", "feedback_arch",
                             *TRANSFORMER_SETTINGS),
                   gpus=1.0, live_unet=True, validate=_validate)
