"""One seeded order of a split's images that interleaves the classes, so that every prefix of
it is close to stratified: the sample of a rung over images (a search's early rungs see a
fraction of each split) is a prefix of the next rung's sample, and a cache entry over a prefix
extends by the new images only (:mod:`difftune.trainables.cache.prefix`).

The order is :data:`ORDER` (its name is part of the cache key of prefix entries):

- *which class* comes at each position depends only on the images per class: an
  earliest-deadline schedule (:func:`class_sequence`) in which image j of a class of n_c
  (of N) images is released at slot ``j N / n_c`` and due by slot ``(j + 1) N / n_c``; in
  every prefix of length k, class c then holds within 1 of its proportional share
  ``k n_c / N`` (a balanced split is a round-robin over the classes);
- *which image* of that class: the class's images in a seeded shuffle (:data:`ORDER_SEED`,
  fixed like the holdout's seed, so every trial of every search reads the same samples).

:func:`sample_size` gives a rung's prefix length from the images per class alone (no image
is read: ``difftune plan`` can price rungs).
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset, Subset

from difftune.trainables.data.splits import targets_of
from difftune.trainables.errors import DataError

logger = logging.getLogger(__name__)

#: the name of the order below (part of prefix entries' keys: another order never hits)
ORDER = "interleaved-v1"
#: the seed of the shuffle within each class: fixed, so every trial reads the same samples
ORDER_SEED = 0
#: images per class a rung's sample holds at least (while the class has them)
DEFAULT_FLOOR = 5
#: the fewest SGD steps one epoch at an early rung takes where its sample allows
#: (:meth:`Rung.passes`)
DEFAULT_STEPS = 16
#: the most times one epoch reads a rung's sample
MAX_PASSES = 8


@functools.lru_cache(maxsize=16)
def _sequence(counts: tuple[int, ...]) -> np.ndarray:
    n = sum(counts)
    out = np.empty(n, dtype=np.int64)
    taken = [0] * len(counts)
    # released images, by deadline (j + 1) N / n_c then class; not yet released, by release
    ready = [(n / c, k) for k, c in enumerate(counts) if c]  # image 0: released at 0
    heapq.heapify(ready)
    waiting: list[tuple[float, int]] = []
    for slot in range(n):  # slot k (0-based) spans [k, k + 1)
        while waiting and waiting[0][0] <= slot:
            _, k = heapq.heappop(waiting)
            heapq.heappush(ready, ((taken[k] + 1) * n / counts[k], k))
        _, k = heapq.heappop(ready)  # never empty: more than k images are released by k
        out[slot] = k
        taken[k] += 1
        if taken[k] < counts[k]:
            heapq.heappush(waiting, (taken[k] * n / counts[k], k))
    out.flags.writeable = False
    return out


def class_sequence(counts: Sequence[int]) -> np.ndarray:
    """The class (an index into ``counts``) at each position of the interleaved order of a
    split with ``counts[c]`` images of class c.

    :return: an [N] int64 array (read-only; N = ``sum(counts)``), class c ``counts[c]``
        times; in its first k entries class c appears within 1 of ``k counts[c] / N``.
    """
    counts = tuple(int(c) for c in counts)
    if any(c < 0 for c in counts):
        raise ValueError(f"images per class must be >= 0, got {list(counts)}")
    return _sequence(counts)


def interleaved_order(targets: Sequence[int], seed: int = ORDER_SEED) -> np.ndarray:
    """The split's images in the interleaved order: :func:`class_sequence` over the classes
    present (in label order), each class's images in a seeded shuffle.

    :param targets: [N] label of each image of the split, by its position in the split.
    :return: an [N] int64 permutation of ``0..N-1`` (positions in the split).
    """
    labels = np.asarray(targets, dtype=np.int64)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    grouped = np.argsort(inverse.reshape(-1), kind="stable")  # class 0's positions, then 1's
    members = np.split(grouped, np.cumsum(counts)[:-1]) if len(counts) else []
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(m) for m in members]
    slots = _slots([len(m) for m in members])
    out = np.empty(len(labels), dtype=np.int64)
    out[slots] = np.concatenate(shuffled) if shuffled else np.zeros(0, dtype=np.int64)
    return out  # class k's slots, in order, take its shuffled images


def _slots(counts: Sequence[int]) -> np.ndarray:
    """[N] positions in the order of class 0's images, then class 1's, ... (each in order)."""
    return np.argsort(class_sequence(counts), kind="stable")


def sample_size(counts: Sequence[int], fraction: float, floor_per_class: int = DEFAULT_FLOOR
                ) -> int:
    """The prefix length of a rung: ``ceil(fraction N)`` images of a split with ``counts[c]``
    images of class c (N in all), lengthened until every class holds at least
    ``floor_per_class`` images of the prefix (or all of its images, if it has fewer).

    :param fraction: in (0, 1]; 1 gives N.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction <= 1:
        raise DataError(f"image rung {fraction!r} is invalid; allowed: a fraction in (0, 1]")
    if isinstance(floor_per_class, bool) or not isinstance(floor_per_class, int) \
            or floor_per_class < 0:
        raise DataError(f"floor of images per class {floor_per_class!r} is invalid; allowed: "
                        "an int >= 0")
    n = int(sum(counts))
    if n == 0:
        return 0
    size = min(n, max(1, math.ceil(round(fraction * n, 9))))
    slots, first = _slots(counts), 0
    for c in counts:
        need = min(int(c), floor_per_class)
        if need:  # the position of this class's need-th image, counted from 1
            size = max(size, int(slots[first + need - 1]) + 1)
        first += int(c)
    return size


def rung_rows(targets: Sequence[int], fraction: float, floor_per_class: int = DEFAULT_FLOOR
              ) -> int:
    """:func:`sample_size` of a split from its labels: the rows a rung reads of the split's
    :func:`interleaved_order` (what ``FeatureCache.get_prefix`` is asked for).

    :param targets: [N] label of each image of the split.
    """
    counts = np.unique(np.asarray(targets, dtype=np.int64), return_counts=True)[1]
    return sample_size(counts.tolist(), fraction, floor_per_class)


@dataclass(frozen=True)
class Rung:
    """One rung of a search's rungs over images: it reads the first :func:`rung_rows` images
    of each split's :func:`interleaved_order` (``fraction`` of them, at least ``floor`` per
    class).

    :param index: 0-based (the last rung reads every image).
    :param factor: the scheduler's reduction factor: the rung's end is reported at
        ``rung_budget = factor ** index`` (ASHA's milestones, :meth:`budget`).
    :param min_steps: the fewest SGD steps one epoch of the rung takes (:meth:`passes`).
    """

    index: int
    fraction: float
    floor: int = DEFAULT_FLOOR
    factor: float = 2.0
    min_steps: int = DEFAULT_STEPS

    def passes(self, rows: int, batch_size: int) -> int:
        """Times one training epoch reads the rung's train sample of ``rows`` images at
        ``batch_size`` (each pass reshuffled): enough for ``min_steps`` SGD steps, at most
        ``ceil(1 / fraction)`` (no more steps than an epoch over the whole split) and at most
        :data:`MAX_PASSES`; 1 at the last rung. (Read once, the demo's rung 0, 50 images at
        batch 64, gives a head one step per epoch: too few to rank configs by. ImageNet's,
        23,000 images, gives 180 at batch 128, and is read once.)"""
        if self.fraction >= 1 or rows <= 0:
            return 1
        need = math.ceil(self.min_steps * batch_size / rows)
        return max(1, min(MAX_PASSES, math.ceil(round(1 / self.fraction, 9)), need))

    def rows(self, ds: Dataset) -> int:
        """The images of ``ds`` (a split) this rung reads: its prefix length."""
        return rung_rows(targets_of(ds), self.fraction, self.floor)

    def budget(self, *, end: bool) -> float:
        """The ``rung_budget`` a trial reports: ``factor ** index`` at the rung's last epoch
        (ASHA decides there), the previous rung's value before it (0 at rung 0), where ASHA
        has nothing to decide."""
        if end:
            return float(self.factor ** self.index)
        return float(self.factor ** (self.index - 1)) if self.index else 0.0


def ladder(fractions: Sequence[float], *, floor: int = DEFAULT_FLOOR, factor: float = 2.0,
           min_steps: int = DEFAULT_STEPS) -> list[Rung]:
    """The rungs of ``fractions`` (increasing, the last 1.0), each a :class:`Rung`."""
    return [Rung(i, float(f), floor, float(factor), int(min_steps))
            for i, f in enumerate(fractions)]


class Repeated(Dataset):
    """``ds`` read ``passes`` times in one epoch: item i is ``ds[i mod len(ds)]`` (a shuffled
    loader reshuffles every pass's items together). ``set_epoch``, ``shapes()``,
    ``classes`` and ``labels`` are those of ``ds``."""

    def __init__(self, ds: Dataset, passes: int):
        self.ds, self.passes, self.n = ds, int(passes), len(ds)

    def __len__(self) -> int:
        return self.n * self.passes

    def __getitem__(self, i: int):
        return self.ds[i % self.n]

    def __getitems__(self, indices: Sequence[int]):
        rows = [i % self.n for i in indices]
        if hasattr(self.ds, "__getitems__"):
            return self.ds.__getitems__(rows)
        return [self.ds[i] for i in rows]

    def __getattr__(self, name: str):  # set_epoch, shapes(), classes, labels: those of ds
        if name in ("ds", "passes", "n"):
            raise AttributeError(name)
        return getattr(self.ds, name)


def repeat_for(ds: Dataset, rung: Rung | None, batch_size: int) -> Dataset:
    """A rung's train sample as one epoch reads it: :meth:`Rung.passes` times (``ds`` itself
    without a rung, or at one pass)."""
    passes = rung.passes(len(ds), batch_size) if rung is not None else 1
    return Repeated(ds, passes) if passes > 1 else ds


def rung_subset(ds: Dataset, rung: Rung | None) -> Dataset:
    """The images of ``ds`` a rung reads (the first :func:`rung_rows` of its
    :func:`interleaved_order`), in split order (``ds`` itself without a rung, or at a rung
    that reads every image: the last rung trains on what a search without rungs does)."""
    if rung is None:
        return ds
    targets = targets_of(ds)
    rows = rung_rows(targets, rung.fraction, rung.floor)
    if rows >= len(targets):
        return ds
    return Subset(ds, np.sort(interleaved_order(targets)[:rows]).tolist())
