"""The made tasks of :mod:`benchmarks.data_fidelity` (written as ImageFolder trees from
scikit-learn's digits as the demo sees them, 16 x 16, in the demo's train / val / test
splits; no image changes split, so the U-Net never saw a val or test digit):

- ``noisy`` (:func:`noisy_digits`): harder, the same size;
- ``augmented`` (:func:`augmented_digits`): harder and larger, so that a rung of 2 % holds
  more than the floor of 5 images per class, as at paper scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def noisy_digits(root: Path, *, sigma: float, patch: int, seed: int = 0) -> Path:
    """The harder task: scikit-learn's digits as the demo sees them (16 x 16, in the same
    train / val / test splits), each with seeded Gaussian pixel noise of ``sigma`` (images in
    [-1, 1]) and a ``patch`` x ``patch`` square blanked at a seeded place, written as an
    ImageFolder tree (``train/``, ``val/``, ``test/``: one folder per split, so no image
    changes split and the U-Net never saw a val or test digit). :return: the tree's root."""
    from PIL import Image

    from difftune.trainables.data.datasets import load_dataset

    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        ds, classes = load_dataset("digits", split=split, image_size=16)
        for i in range(len(ds)):
            x, y = ds[i]
            x = x[0].numpy() + sigma * rng.standard_normal(x.shape[1:])
            r, c = rng.integers(0, 16 - patch + 1, size=2)
            x[r:r + patch, c:c + patch] = -1.0
            pixels = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)
            folder = root / split / classes[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2)).save(folder / f"{i:04d}.png")
    return root


def augmented_digits(root: Path, *, copies: int, degrees: float, shift: int, sigma: float,
                     seed: int = 0) -> Path:
    """The larger task: every digit of each split (16 x 16, the demo's splits) ``copies``
    times, each copy seeded-rotated by up to ``degrees``, shifted by up to ``shift`` pixels
    and given Gaussian pixel noise of ``sigma``, written as an ImageFolder tree (the copies of
    a digit stay in its split). ``copies`` times the images puts a rung of 2 % above the floor
    of 5 images per class in train and val, as at paper scale, where the demo's 50-image rung
    0 is 7 % of its 1,437. :return: the tree's root."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from difftune.trainables.data.datasets import load_dataset

    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        ds, classes = load_dataset("digits", split=split, image_size=16)
        for i in range(len(ds)):
            x, y = ds[i]
            folder = root / split / classes[y]
            folder.mkdir(parents=True, exist_ok=True)
            for c in range(copies):
                angle = float(rng.uniform(-degrees, degrees))
                dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
                z = F.affine(x + 1.0, angle=angle, translate=[dx, dy], scale=1.0, shear=[0.0],
                             interpolation=F.InterpolationMode.BILINEAR)[0].numpy() - 1.0
                z = z + sigma * rng.standard_normal(z.shape)
                pixels = np.round((np.clip(z, -1, 1) + 1) * 127.5).astype(np.uint8)
                Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2)).save(
                    folder / f"{i:04d}_{c}.png")
    return root


def task_images(root: Path, params: dict) -> Path:
    """The ImageFolder tree of a made task (:data:`TASKS`'s ``params``) under ``root``."""
    if "copies" in params:
        return augmented_digits(root, **params)
    return noisy_digits(root, **params)
