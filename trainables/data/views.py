"""Views of a training image: the paper's augmentation (a random crop + horizontal flip, as
guided-diffusion's ``random_crop_arr`` / ``random_flip``) and the seeded views the feature
cache stores (``views: K``).

- View 0 of an image is the image itself with the contract's seeded noise (keyed by (noise
  seed, t, index)): exactly what a cache with ``views: 1`` has always held.
- View v >= 1 is a seeded random crop (a square of 80-100 % of the side, resized back) +
  flip of the image, with its own seeded noise draw. View v is the same whatever K is, so the
  entries of K = 1 serve view 0 of K = 4.

Epoch e of a trial reads view ``e mod K`` (:class:`ViewCycle`). The online source (the
paper's way, ``--no-cache``) draws a fresh crop, flip and noise at every forward pass instead.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

#: the smallest crop side, as a fraction of the image side (guided-diffusion's min_crop_frac)
MIN_CROP = 0.8


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random crop + flip of each image of ``x`` ([N x C x H x W], square).

    :param generator: draws the crops and flips (None: torch's global generator).
    """
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    lo = math.ceil(MIN_CROP * h)
    for i in range(n):
        side = int(torch.randint(lo, h + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
        flip = bool(torch.rand((), generator=generator) < 0.5)
        crop = x[i:i + 1, :, top:top + side, left:left + side]
        if side != h:
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False,
                                 antialias=True)
        out[i] = crop[0].flip(-1) if flip else crop[0]
    return out


def view_batch(x0: torch.Tensor, indices: Sequence[int], *, t: int, seed: int, view: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, noise)`` of view ``view`` of the images ``x0`` with dataset ``indices``.

    :return: view 0: ``(x0, None)`` (the extractor draws the contract's seeded noise);
        view v >= 1: the seeded crop + flip of every image and its own seeded noise.
    """
    if view == 0:
        return x0, None
    images = torch.empty_like(x0)
    noise = torch.empty_like(x0)
    g = torch.Generator()
    for row, idx in enumerate(indices):
        g.manual_seed(_seed("view", seed, int(idx), view))
        images[row] = crop_flip(x0[row:row + 1], g)[0]
        g.manual_seed(_seed("noise", seed, t, int(idx), view))
        noise[row] = torch.randn(x0.shape[1:], generator=g)
    return images, noise


class ViewCycle(Dataset):
    """A training set of K views: epoch e reads view ``e mod K`` (``set_epoch``, called by
    :func:`~difftune.trainables.train.loop.train_heads` before every epoch). Items and labels are those of the views,
    which hold the same images in the same order."""

    def __init__(self, views: Sequence[Dataset]):
        if not views:
            raise ValueError("ViewCycle needs at least one view")
        self.views = list(views)
        self.current = 0

    def set_epoch(self, epoch: int) -> None:
        self.current = epoch % len(self.views)

    def __len__(self) -> int:
        return len(self.views[0])

    def __getitem__(self, i: int):
        return self.views[self.current][i]

    def __getitems__(self, indices: Sequence[int]):
        ds = self.views[self.current]
        if hasattr(ds, "__getitems__"):
            return ds.__getitems__(indices)
        return [ds[i] for i in indices]

    def __getattr__(self, name: str):  # shapes(), classes, labels: those of view 0
        if name in ("views", "current"):
            raise AttributeError(name)
        return getattr(self.views[0], name)
