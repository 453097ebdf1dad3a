"""The epochs a trial runs in expectation under the search's early stopping (ASHA), priced
the same on both sides of every comparison (the cache and the paper's way).

Ray Tune's ``ASHAScheduler(grace_period=g, reduction_factor=r, max_t=T)`` (as
:mod:`difftune.search.run.tuner` builds it) puts rungs at ``g, g*r, g*r**2, ...`` up to
``T`` (the count as Ray computes it: ``int(log(T/g) / log(r) + 1)``). A trial reaching a
rung continues when its metric is in the top ``1/r`` of those recorded there, so in
expectation a fraction ``(1/r)**k`` of the trials runs past the k-th rung (k = 1, 2, ...).
The expected epochs of a trial are the sum over the segments between rungs of the
surviving fraction times the segment's length::

    E = m_0 + sum_k (1/r)**(k+1) * (min(m_{k+1}, T) - m_k),  m_0 = g, ..., m_K = T

For g=7, r=3, T=28 (the paper presets): rungs 7 and 21, E = 7 + 14/3 + 7/9 = 12.4 of 28.
Every-epoch (``T``) is the bound beside it. Ray's cutoff is asynchronous: the first trial
to reach a rung always continues, so a small search promotes a little more than ``1/r``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

__all__ = ["EarlyStopping", "asha_rungs", "early_stopping"]


@dataclass(frozen=True)
class EarlyStopping:
    """What the scheduler lets a trial run: rungs, surviving fractions, expected epochs."""

    scheduler: str
    grace_period: int
    reduction_factor: float
    max_t: int
    rungs: tuple[int, ...]
    #: the fraction of trials still running after each rung (in expectation)
    survivors: tuple[float, ...]
    expected_epochs: float
    formula: str

    def to_dict(self) -> dict:
        return asdict(self)


def asha_rungs(grace: int, reduction: float, max_t: int) -> tuple[int, ...]:
    """The rungs of Ray Tune's ASHA bracket (``s = 0``), ascending: ``g * r**k`` for the
    ``int(log(T/g) / log(r) + 1)`` values of k Ray computes."""
    if grace >= max_t:
        return (max_t,)
    count = int(math.log(max_t / grace) / math.log(reduction) + 1)
    return tuple(int(round(grace * reduction ** k)) for k in range(count))


def early_stopping(grace: int, reduction: float, max_t: int) -> EarlyStopping:
    """The expected epochs of a trial under ASHA (see the module docstring)."""
    grace, max_t = int(grace), int(max_t)
    rungs = tuple(m for m in asha_rungs(grace, reduction, max_t) if m <= max_t)
    ends = [*rungs[1:], max_t]
    expected = float(min(rungs[0], max_t))
    survivors = []
    for k, (m, nxt) in enumerate(zip(rungs, ends, strict=True)):
        alive = (1 / reduction) ** (k + 1) if m < max_t else 0.0
        survivors.append(alive)
        expected += alive * max(0, min(nxt, max_t) - m)
    parts = " + ".join([f"{rungs[0]}"] + [
        f"{s:.3g}*({min(e, max_t)}-{m})" for m, e, s in zip(rungs, ends, survivors, strict=True)
        if m < max_t])
    return EarlyStopping(
        scheduler="ASHA", grace_period=grace, reduction_factor=float(reduction), max_t=max_t,
        rungs=rungs, survivors=tuple(survivors), expected_epochs=expected,
        formula=f"rungs at {', '.join(map(str, rungs))} of {max_t} epochs, 1/{reduction:g} "
        f"promoted at each: E = {parts} = {expected:.3g}")
