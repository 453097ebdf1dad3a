"""How many images a plan counts per split, by the splits' own rule
(:mod:`difftune.trainables.data.splits`): for ImageNet's layout (``train/`` + ``val/``, no
``test/``) the selection split ``val`` is a seeded holdout of ``train/`` and ``test`` is
``val/``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["DataSize", "holdout_counts"]


@dataclass(frozen=True)
class DataSize:
    """Images a search reads per split (:mod:`difftune.trainables.data.splits`).

    :param train_all: train images before any label fraction (of an ImageNet-like folder:
        ``train/`` less the holdout).
    :param val: val (selection) images, never subsampled (of an ImageNet-like folder: the
        seeded holdout of ``train/``).
    :param classes: classes (for a stratified fraction of a stand-in dataset).
    :param per_class: train images per class (None: ``train_all / classes`` each).
    :param test: test images (of an ImageNet-like folder: ``val/``), read once per config
        reported on test, never by the search.
    """

    train_all: int
    val: int
    classes: int
    source: str
    per_class: tuple[int, ...] | None = None
    test: int = 0
    holdout: float | None = None
    #: val images per class (None: ``val / classes`` each)
    val_per_class: tuple[int, ...] | None = None

    @classmethod
    def folder_layout(cls, images: int, classes: int, *, test: int, holdout: float,
                      source: str) -> DataSize:
        """A folder with ``train/`` (``images`` in ``classes`` even classes) and ``val/``
        (``test`` images) and no ``test/``: by the splits' rule, ``val`` is a seeded holdout
        of ``train/`` (:func:`holdout_counts`) and ``test`` is ``val/``."""
        counts = [images // classes + (i < images % classes) for i in range(classes)]
        held = holdout_counts(counts, holdout)
        fit = tuple(n - k for n, k in zip(counts, held, strict=True))
        return cls(train_all=sum(fit), val=sum(held), classes=classes, source=source,
                   per_class=fit, test=test, holdout=holdout, val_per_class=tuple(held))

    def train(self, fraction: float | str | None) -> int:
        from difftune.trainables.data.datasets import subset_size

        counts = list(self.per_class) if self.per_class else \
            [self.train_all // self.classes + (i < self.train_all % self.classes)
             for i in range(self.classes)]
        return subset_size(counts, fraction)


def holdout_counts(counts: list[int], holdout: float) -> list[int]:
    """Images held out of each class of ``train/`` as the selection split: the rule of
    :func:`difftune.trainables.data.splits.holdout_positions` (``round(holdout * n)``, at
    least one, at most ``n - 1``), as :func:`~difftune.trainables.data.datasets.class_counts`
    counts it."""
    return [min(n - 1, max(1, int(round(holdout * n)))) if n > 1 else 0 for n in counts]
