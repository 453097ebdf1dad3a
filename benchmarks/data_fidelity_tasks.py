"""The made tasks of :mod:`benchmarks.data_fidelity` (written as ImageFolder trees from
scikit-learn's digits as the demo sees them, 16 x 16, in the demo's train / val / test
splits; no image changes split, so the U-Net never saw a val or test digit):

- ``noisy`` (:func:`noisy_digits`): harder, the same size;
- ``augmented`` (:func:`augmented_digits`): harder and larger, so that a rung of 2 % holds
  more than the floor of 5 images per class, as at paper scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

#: the images of one digit (``[1 x 16 x 16]`` in [-1, 1]) drawn with a seeded generator
Draw = Callable[[torch.Tensor, np.random.Generator], Iterable[np.ndarray]]


def noisy_digits(root: Path, *, sigma: float, patch: int, seed: int = 0) -> Path:
    """The harder task: every digit with seeded Gaussian pixel noise of ``sigma`` (images in
    [-1, 1]) and a ``patch`` x ``patch`` square blanked at a seeded place. :return: the
    tree's root."""

    def draw(x: torch.Tensor, rng: np.random.Generator) -> list[np.ndarray]:
        z = x[0].numpy() + sigma * rng.standard_normal(x.shape[1:])
        r, c = rng.integers(0, 16 - patch + 1, size=2)
        z[r:r + patch, c:c + patch] = -1.0
        return [z]

    return write_tree(root, draw, seed)


def augmented_digits(root: Path, *, copies: int, degrees: float, shift: int, sigma: float,
                     seed: int = 0) -> Path:
    """The larger task: every digit ``copies`` times, each copy seeded-rotated by up to
    ``degrees``, shifted by up to ``shift`` pixels and given Gaussian pixel noise of
    ``sigma`` (the copies of a digit stay in its split). ``copies`` times the images puts a
    rung of 2 % above the floor of 5 images per class in train and val, as at paper scale,
    where the demo's rung 0 (50 train + 50 val images) is 7 % of its 1,437. :return: the
    tree's root."""
    from torchvision.transforms.v2 import functional as F

    def draw(x: torch.Tensor, rng: np.random.Generator) -> Iterable[np.ndarray]:
        for _ in range(copies):
            angle = float(rng.uniform(-degrees, degrees))
            dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
            z = F.affine(x + 1.0, angle=angle, translate=[dx, dy], scale=1.0, shear=[0.0],
                         interpolation=F.InterpolationMode.BILINEAR)[0].numpy() - 1.0
            yield z + sigma * rng.standard_normal(z.shape)

    return write_tree(root, draw, seed)


def write_tree(root: Path, draw: Draw, seed: int) -> Path:
    """Every digit of each split as the images ``draw`` makes of it (one generator seeded
    ``seed``, drawn in split order), written ``SPLIT/CLASS/NNNN_C.png`` (NNNN: the digit's
    place in its split, C: the copy). :return: ``root``."""
    from PIL import Image

    from difftune.trainables.data.datasets import load_dataset

    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        ds, classes = load_dataset("digits", split=split, image_size=16)
        for i in range(len(ds)):
            x, y = ds[i]
            folder = root / split / classes[y]
            folder.mkdir(parents=True, exist_ok=True)
            for c, z in enumerate(draw(x, rng)):
                pixels = np.round((np.clip(z, -1, 1) + 1) * 127.5).astype(np.uint8)
                Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2)).save(
                    folder / f"{i:04d}_{c}.png")
    return root


#: task -> (the prefix of its parameters in a RESULTS row, what makes its tree)
MAKERS: dict[str, tuple[str, Callable[..., Path]]] = {
    "noisy": ("noise", noisy_digits), "augmented": ("aug", augmented_digits)}


def task_images(root: Path, task: str, params: dict) -> Path:
    """The ImageFolder tree of a made ``task`` with its ``params`` under ``root``."""
    return MAKERS[task][1](root, **params)
