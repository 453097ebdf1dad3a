"""Rungs over images, as a plan prices them (``search: image_rungs: [...]``).

Under rungs a trial trains its heads from scratch at each rung k on that rung's sample of
train and scores them on that rung's sample of val, for its full epochs; ASHA, on
``rung_budget`` (grace 1, reduction r, ``max_t = r**(K-1)`` for K rungs), keeps the top 1/r
at the end of each rung. So in expectation a fraction ``r**-k`` of the trials reaches rung k;
the first trial to reach a rung always goes on (Ray's cutoff is asynchronous), so at least
one trial reaches every rung: ``trials_k = min(n, max(1, n r**-k))`` (:meth:`Rungs.trials`).

A rung's sample of a split is the first ``sample_size(counts, fraction, floor)`` images of
the split's interleaved order (:func:`difftune.trainables.data.order.sample_size`, from the
images per class alone), so each rung's sample holds the previous one's: a prefix entry
extends by the new images only, and an entry's U-Net passes are the images of the deepest
rung any trial at it reached. :mod:`.arithmetic` prices each rung's *extension* (rows
``n_k - n_{k-1}``) for the trials that reach it; one rung ``[1.0]`` is the single-fidelity
search.

The probe rung (``probe_rung: true``) passes rung 0's sample once per timestep the space can
ask, to the deepest block it can ask (every block read on the way), and stores it as prefix
entries (every block at the store pool), which the trials' rung 0 then reads: its passes
replace theirs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from difftune.search.plan.data import DataSize
from difftune.search.space.checks import SEARCH_LIMITS, is_rungs
from difftune.search.space.spec import Space
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.order import DEFAULT_FLOOR, DEFAULT_STEPS, ladder, sample_size
from difftune.trainables.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["RungError", "Rungs", "rung_table", "running_rows", "rungs_of", "split_counts"]

#: head training per image and epoch, in forwards: a forward and a backward (about two
#: forwards) on train, a forward on val to score the epoch
TRAIN_FORWARDS = 3


class RungError(UserError):
    """``search.image_rungs`` the plan cannot price (exit code 2)."""


@dataclass(frozen=True)
class Rungs:
    """The rungs of a search: fractions, the sample of each split at each, who reaches each.

    :param fractions: [K] increasing, the last 1.0.
    :param train: [K] train rows of each rung's sample (of the label fraction's subset).
    :param val: [K] val rows of each rung's sample.
    :param reach: [K] the fraction of trials that reaches each rung, before the cap of one
        (``reduction_factor ** -k``).
    :param passes: [K] times an epoch reads each rung's train sample
        (:meth:`~difftune.trainables.data.order.Rung.passes` at the space's fixed batch size;
        head training only).
    """

    fractions: tuple[float, ...]
    floor: int
    reduction_factor: float
    train: tuple[int, ...]
    val: tuple[int, ...]
    reach: tuple[float, ...]
    probe: bool = False
    passes: tuple[int, ...] = ()

    def trained(self) -> list[int]:
        """[K] train rows one epoch of each rung reads (its sample, :attr:`passes` times)."""
        return [t * (self.passes[k] if self.passes else 1) for k, t in enumerate(self.train)]

    def trials(self, n: float) -> list[float]:
        """[K] trials of ``n`` that reach each rung in expectation, at least one (the first
        at a rung always goes on), at most ``n``."""
        return [min(n, max(1.0, n * r)) if n > 0 else 0.0 for r in self.reach]

    def rows(self, views: int = 1) -> list[int]:
        """[K] rows a trial's entries hold after each rung: ``views`` per train image, one
        per val image."""
        return [t * views + v for t, v in zip(self.train, self.val, strict=True)]

    def added(self, views: int = 1) -> list[int]:
        """[K] rows each rung adds to an entry (the first rung: all of its rows)."""
        rows = self.rows(views)
        return [r - (rows[k - 1] if k else 0) for k, r in enumerate(rows)]

    def to_dict(self) -> dict[str, Any]:
        return {"fractions": list(self.fractions), "floor": self.floor,
                "reduction_factor": self.reduction_factor, "train_rows": list(self.train),
                "val_rows": list(self.val), "reach": list(self.reach), "probe": self.probe,
                "passes": list(self.passes)}


def split_counts(data: DataSize, label_fraction: float | str | None
                 ) -> tuple[list[int], list[int]]:
    """``(train, val)`` images per class: train as the label fraction keeps it (a stratified
    ``round(fraction n)``, at least 1, per class; a file list spread evenly), val whole."""
    per = list(data.per_class) if data.per_class else _even(data.train_all, data.classes)
    if label_fraction is not None:
        try:
            frac = float(label_fraction)
        except (TypeError, ValueError):  # a file list: its size, spread evenly
            per = _even(data.train(label_fraction), data.classes)
        else:
            per = [max(1, int(round(frac * n))) for n in per if n]
    val = list(data.val_per_class) if data.val_per_class else _even(data.val, data.classes)
    return per, val


def _even(n: int, classes: int) -> list[int]:
    return [n // classes + (i < n % classes) for i in range(max(classes, 1))]


def rungs_of(space: Space, data: DataSize, *, label_fraction: float | str | None = None,
             fractions: Any = "space") -> Rungs | None:
    """The rungs of ``space`` on ``data`` (None without ``image_rungs``): each split's
    sample size at each rung by :func:`sample_size`, the trials reaching each by ASHA.

    :param fractions: the rungs to price instead of the space's (None: no rungs).
    """
    s = space.search
    given = s.get("image_rungs") if fractions == "space" else fractions
    if not given:
        return None
    if not is_rungs(list(given) if isinstance(given, tuple) else given):
        raise RungError(f"search.image_rungs={given!r} is invalid; allowed: "
                        f"{SEARCH_LIMITS['image_rungs'][1]}")
    fr = tuple(float(f) for f in given)
    floor = int(s.get("image_floor") or DEFAULT_FLOOR)
    rf = float(s["reduction_factor"])
    train, val = split_counts(data, label_fraction)
    train_rows = tuple(sample_size(train, f, floor) for f in fr)
    batch = int(space.fixed.get("batch_size", TrialConfig.batch_size))
    by_rung = ladder(fr, min_steps=int(s.get("rung_steps") or DEFAULT_STEPS))
    return Rungs(fractions=fr, floor=floor, reduction_factor=rf, train=train_rows,
                 val=tuple(sample_size(val, f, floor) for f in fr),
                 reach=tuple(rf ** -k for k in range(len(fr))),
                 probe=bool(s.get("probe_rung", False)),
                 passes=tuple(r.passes(n, batch)
                              for r, n in zip(by_rung, train_rows, strict=True)))


def running_rows(rungs: Rungs | None, trials: int, at_once: int, rows: int,
                 views: int = 1) -> int:
    """Rows the ``at_once`` trials holding the most hold together: without rungs every
    trial holds ``rows``; under rungs the trials reaching the last rung (rounded up) hold
    all of its rows, those stopped a rung before it that rung's, and so on."""
    if not rungs:
        return min(trials, at_once) * rows
    counts = [math.ceil(m - 1e-9) for m in rungs.trials(trials)]
    held, left, total = rungs.rows(views), at_once, 0
    for k in reversed(range(len(counts))):
        take = min(left, max(0, counts[k] - (counts[k + 1] if k + 1 < len(counts) else 0)))
        total, left = total + take * held[k], left - take
    return total


def rung_table(n: Any, single: Any, rungs: Rungs, rate: float, *, deepest: int
               ) -> dict[str, Any]:
    """Per rung: the trials reaching it, its sample of each split, the U-Net passes and
    GPU-hours of the entries' extensions, the cache bytes they add, head training; the probe
    rung; and the totals beside the same search without rungs (``single``) and the paper's
    way with the same rungs (``paper_rungs``). ``n``, ``single``: :class:`.arithmetic.Numbers`
    with and without rungs; ``rate``: effective GFLOP/s."""
    def hours(g: float) -> float:
        return g / max(rate, 1e-9) / 3600

    rows = [{"rung": k, "fraction": f, "trials": m, "train_rows": t, "val_rows": v,
             "image_passes": int(round(p)), "gpu_hours": hours(g), "cache_bytes": int(b),
             "head_gpu_hours": hours(h)}
            for k, (f, m, t, v, (p, g), b, h) in enumerate(zip(
                rungs.fractions, n.rung_trials, rungs.train, rungs.val, n.rung_costs,
                n.rung_bytes, n.rung_heads, strict=True))]
    probe = None
    if rungs.probe:
        probe = {"timesteps": len(n.timesteps), "block": deepest,
                 "train_rows": rungs.train[0], "val_rows": rungs.val[0],
                 "image_passes": int(round(n.probe[0])), "gpu_hours": hours(n.probe[1]),
                 "cache_bytes": int(n.probe_bytes)}
    rest = (n.passes - sum(r["image_passes"] for r in rows) - (probe or {}).get(
        "image_passes", 0), hours(n.gflops - sum(g for _, g in n.rung_costs) - n.probe[1]))
    return {**rungs.to_dict(), "max_t": round(rungs.reduction_factor ** (len(rows) - 1)),
            "rows": rows, "probe": probe,
            # confirm trials (and test apart): what the rows do not hold
            "confirm": {"image_passes": int(rest[0]), "gpu_hours": rest[1]},
            "total": {"image_passes": n.passes, "gpu_hours": hours(n.gflops),
                      "head_gpu_hours": hours(n.head_gflops),
                      "cache_bytes": n.unevicted},  # without eviction, as the rows
            "single": {"policy": single.policy, "image_passes": single.passes,
                       "gpu_hours": hours(single.gflops),
                       "head_gpu_hours": hours(single.head_gflops),
                       "cache_bytes": single.bound, "fits": single.fits},
            "paper_rungs": {"image_passes": int(round(n.paper_rungs[0])),
                            "gpu_hours": hours(n.paper_rungs[1]),
                            "head_gpu_hours": hours(n.head_gflops)}}
