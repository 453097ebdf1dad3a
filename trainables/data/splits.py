"""The three splits and which images each holds: ``train`` fits heads, ``val`` selects
(ASHA, Optuna, the champion), ``test`` is reported and never seen by a search.

- digits: a fixed stratified 60/20/20 split of the 1797 images (:func:`digits_positions`).
- An ImageFolder with ``train/`` and ``val/`` (ImageNet's layout): ``test`` is ``val/``, and
  ``val`` is a seeded stratified holdout of ``train/`` (:func:`holdout_positions`), which
  ``train`` then lacks; with a ``test/`` folder too, one folder per split
  (:func:`split_source`).

A split is a :class:`SplitPart` of a base set (all digits, or one folder): its items keep their
positions in that set (:func:`dataset_indices`), the keys of their seeded noise. A label
fraction keeps a seeded stratified subset of ``train`` (:func:`label_subset`). How many images
a split holds is known without reading one (:func:`class_counts`, :func:`subset_size`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from difftune.trainables.errors import DataError

SPLITS = ("train", "val", "test")
#: the seed of the holdout of ``train/`` that becomes the selection split: fixed, so that every
#: trial (whatever its own seed) selects on the same images
HOLDOUT_SEED = 0
DEFAULT_HOLDOUT = 0.1
#: the split definitions (part of every data fingerprint: entries of another scheme never hit)
SPLIT_SCHEME = "splits-v2:digits-60/20/20:folder-holdout"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_number(x: object) -> bool:
    """Whether ``x`` reads as a number (a label fraction, not a file list)."""
    try:
        float(x)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


class SplitPart(Dataset):
    """The items of ``base`` at ``positions``: one split of a larger set of images.

    ``positions`` index ``base`` (the whole digits set, or one folder of an ImageFolder
    tree), so an image keeps one index whichever split, holdout or label subset it lands in:
    the key of its seeded noise (:func:`dataset_indices`).
    """

    def __init__(self, base: Dataset, positions: Sequence[int]):
        self.base, self.positions = base, [int(p) for p in positions]
        self.classes = list(base.classes)
        base_targets = list(base.targets)
        self.targets = [base_targets[p] for p in self.positions]
        base_samples = getattr(base, "samples", None)
        self.samples = [base_samples[p] for p in self.positions] if base_samples else None

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.base[self.positions[i]]



def digits_positions(split: str) -> list[int]:
    """Positions in the 1797 digits of ``split``: a fixed stratified 60/20/20 split."""
    # scikit-learn is imported only for the digits (an ImageFolder search never needs it)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    idx = np.arange(len(target))
    train, rest = train_test_split(idx, test_size=0.4, stratify=target, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=target[rest], random_state=0)
    return sorted({"train": train, "val": val, "test": test}[split].tolist())


def holdout_positions(targets: Sequence[int], fraction: float, *, seed: int = HOLDOUT_SEED
                      ) -> tuple[list[int], list[int]]:
    """``(fit, holdout)`` positions of a seeded stratified holdout of ``targets``: about
    ``fraction`` of every class (at least one image) is held out, at least one is kept."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction < 1:
        raise DataError(f"holdout={fraction!r} is invalid; allowed: a fraction in (0, 1), "
                        "e.g. 0.1 (the share of train/ held out as the selection split)")
    rng = np.random.default_rng(seed)
    arr = np.asarray(targets)
    held: list[int] = []
    for c in np.unique(arr):
        members = np.flatnonzero(arr == c)
        if len(members) < 2:
            raise DataError(f"class {int(c)} has {len(members)} image in train/: the holdout "
                            "(the selection split) needs at least 2 images per class")
        k = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        held.extend(rng.choice(members, size=k, replace=False).tolist())
    held_set = set(held)
    return [i for i in range(len(arr)) if i not in held_set], sorted(held)


def split_source(root: Path, split: str) -> tuple[str, str]:
    """``(folder, part)`` an ImageFolder split is read from: ``part`` is ``all``, or ``fit``
    / ``holdout`` of a seeded holdout of ``train/``.

    With ``train/``, ``val/`` and ``test/``: one folder per split. With ``train/`` and
    ``val/`` only (ImageNet's layout): ``test`` is ``val/`` and the selection split ``val``
    is a holdout of ``train/``."""
    if (root / "test").is_dir():
        return split, "all"
    return {"train": ("train", "fit"), "val": ("train", "holdout"),
            "test": ("val", "all")}[split]


def dataset_indices(ds: Dataset) -> list[int]:
    """Positions of ``ds``'s items in their base set (the keys of their seeded noise)."""
    if isinstance(ds, SplitPart):
        return list(ds.positions)
    if isinstance(ds, Subset):
        base = dataset_indices(ds.dataset)
        return [base[i] for i in ds.indices]
    return list(range(len(ds)))


def targets_of(ds: Dataset) -> list[int]:
    """Labels of every item of ``ds`` without loading images."""
    if isinstance(ds, Subset):
        base = targets_of(ds.dataset)
        return [base[i] for i in ds.indices]
    return list(ds.targets)


def split_dir(root: Path, split: str) -> Path:
    """The split folder of an ImageFolder root; a clear error if it or its classes are missing."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(
            f"data folder {root} has no {split}/ subfolder (expected {root}/train/CLASS/*.jpg "
            f"and {root}/val/CLASS/*.jpg)"
        )
    if not any(d.is_dir() for d in os.scandir(split_dir)):
        raise DataError(f"data folder {split_dir} has no class subfolders (expected {split_dir}/CLASS/*.jpg)")
    return split_dir


def check_data(name_or_path: str) -> None:
    """Check the layout of a dataset cheaply (no image is read): the driver does this before
    any trial starts."""
    if name_or_path == "digits":
        return
    root = Path(name_or_path)
    if not root.is_dir():
        raise DataError(
            f"data {name_or_path!r} is neither 'digits' nor an existing folder with "
            "train/ and val/ ImageFolder trees"
        )
    for folder in ("train", "val"):
        split_dir(root, folder)


def label_subset(targets: list[int], label_fraction: float | str | Path, seed: int,
                 samples: list | None) -> list[int]:
    """Positions (in ``targets``) of the images a label fraction keeps: a seeded, stratified
    fraction of every class (at least one image), or the images a file lists (by file name
    or ``CLASS/NAME``; ``samples``: the ``(path, label)`` of each image)."""
    if isinstance(label_fraction, (str, Path)) and not is_number(label_fraction):
        path = Path(label_fraction)
        if not path.is_file():
            raise DataError(f"label_fraction file {path} does not exist")
        wanted = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        if samples is None:
            raise DataError("label_fraction as a file list works only with an image folder")
        keep = [i for i, (p, _) in enumerate(samples)
                if os.path.basename(p) in wanted or _rel(p) in wanted]
        if not keep:
            raise DataError(f"label_fraction file {path} names none of the training images")
        return keep
    frac = float(label_fraction)
    if not 0 < frac <= 1:
        raise DataError(f"label_fraction must be in (0, 1], got {frac}")
    if frac == 1:
        return list(range(len(targets)))
    rng = np.random.default_rng(seed)
    targets_arr = np.asarray(targets)
    keep: list[int] = []
    for c in np.unique(targets_arr):
        members = np.flatnonzero(targets_arr == c)
        k = max(1, int(round(frac * len(members))))
        keep.extend(rng.choice(members, size=k, replace=False).tolist())
    return sorted(keep)


def _rel(p: str) -> str:
    parts = Path(p).parts
    return "/".join(parts[-2:])


def class_counts(name_or_path: str, split: str, *, holdout: float = DEFAULT_HOLDOUT
                 ) -> list[int]:
    """Images per class of a split as :func:`load_dataset` defines it (the digits 60/20/20
    split; an ImageFolder split's folder, less or only its holdout), without reading an
    image (``difftune plan``)."""
    if name_or_path == "digits":
        from sklearn.datasets import load_digits  # scikit-learn: only for the digits

        targets = load_digits().target[digits_positions(split)]
        return np.bincount(targets, minlength=10).tolist()
    root = Path(name_or_path)
    source, part = split_source(root, split)
    folder = split_dir(root, source)
    counts = [sum(1 for f in os.scandir(d) if f.name.lower().endswith(IMAGE_EXTENSIONS))
              for d in sorted(os.scandir(folder), key=lambda d: d.name) if d.is_dir()]
    if part == "all":
        return counts
    held = [min(n - 1, max(1, int(round(holdout * n)))) if n > 1 else 0 for n in counts]
    return held if part == "holdout" else [n - k for n, k in zip(counts, held, strict=True)]


def subset_size(counts: list[int], label_fraction: float | str | None) -> int:
    """Images :func:`load_dataset` keeps of a split with ``counts`` images per class: every
    image without a fraction, a stratified ``round(fraction * n)`` (at least 1) per class
    with one, the lines of a file list."""
    if label_fraction is None:
        return int(sum(counts))
    if not is_number(label_fraction):
        path = Path(label_fraction)
        if not path.is_file():
            raise DataError(f"label_fraction file {path} does not exist")
        return len({ln.strip() for ln in path.read_text().splitlines() if ln.strip()})
    frac = float(label_fraction)
    if not 0 < frac <= 1:
        raise DataError(f"label_fraction must be in (0, 1], got {frac}")
    return int(sum(max(1, int(round(frac * n))) for n in counts if n))
