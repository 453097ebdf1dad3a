"""Classify images with a trained head end to end: noise each image to the head's step t, run
the frozen U-Net, read the blocks the head reads (pooled as in training), apply the head.

A head alone reads features (``{(t, block): map}``) or, for a live head (DifFeed), images with
their dataset index; this module turns plain images into what the head reads. An image's
noise is seeded by its content (:func:`image_keys`) instead of a dataset index, so an image
gets the same label in any batch, on any machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from difftune.trainables.config import TrialConfig
from difftune.trainables.errors import UserError
from difftune.trainables.heads import head_kind
from difftune.trainables.model.features import Extractor
from difftune.trainables.pipeline import clamp_requests


def image_keys(images: torch.Tensor) -> list[int]:
    """A key per image of [N x 3 x H x W] from its values: the index its seeded noise is
    drawn for."""
    flat = images.detach().to("cpu", torch.float32).contiguous().numpy()
    return [int.from_bytes(hashlib.blake2b(x.tobytes(), digest_size=8).digest(), "little")
            & ((1 << 62) - 1) for x in flat]


def check_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """``images`` as float32 [N x 3 x image_size x image_size]; a :class:`UserError`
    naming the shape that is expected otherwise."""
    images = torch.as_tensor(images)
    want = (3, image_size, image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise UserError(f"images of shape {tuple(images.shape)} cannot be classified; allowed: "
                        f"[N x 3 x {image_size} x {image_size}] in [-1, 1]")
    return images.float()


@torch.no_grad()
def classify(unet: tuple[nn.Module, object], head: nn.Module, cfg: TrialConfig,
             images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Class probabilities [N x classes] of ``images`` [N x 3 x H x W] in [-1, 1].

    :param unet: ``(model, diffusion)`` the head was trained on (a live head holds its own).
    :param head: the trained head in eval mode, on the U-Net's device.
    :param cfg: the head's trial config (what it reads: t, blocks, pools, noise seed).
    """
    model, diffusion = unet
    images = check_images(images, model.image_size)
    kind = head_kind(cfg.head)
    extractor = Extractor(model, diffusion)
    by_t: dict[int, dict[int, int]] = {}
    for t, b, p in clamp_requests(model, kind.requests(cfg)):
        by_t.setdefault(t, {})[b] = p
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        keys = image_keys(x)
        if kind.live_unet:
            logits = head({"image": x, "index": torch.tensor(keys)})
        else:
            logits = head(_features(extractor, x, keys, by_t, cfg.noise_seed))
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def _features(extractor: Extractor, x: torch.Tensor, keys: Sequence[int],
              by_t: dict[int, dict[int, int]], seed: int) -> dict[tuple[int, int], torch.Tensor]:
    feats = {}
    for t, pools in by_t.items():
        for b, f in extractor.extract(x, t, pools, indices=keys, seed=seed).items():
            feats[(t, b)] = f
    return feats
