"""When a search does not fit its cache budget: the cheapest changes that would.

Each *lever* is tried alone at its mildest setting that fits: the largest label fraction
(``label_fraction``), the most timesteps (fewer ``t`` values), the largest ``cache_pool``
(with the pools trials ask, ``pool`` or ``pre_pool``, capped to it),
the ``per-request`` policy (when ``block-set`` was asked for), the most trials at once
(``max_concurrent``, which sets the per-request working set). When no lever fits alone, a
label fraction is tried together with each other lever at its strongest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from difftune.search.plan.arithmetic import Levers, Numbers, evaluate

#: label fractions tried, largest first
FRACTIONS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)


def _spread(values: tuple[int, ...], k: int) -> tuple[int, ...]:
    """``k`` of ``values``, evenly spread (first and last kept)."""
    if k >= len(values):
        return values
    if k == 1:
        return (values[len(values) // 2],)
    step = (len(values) - 1) / (k - 1)
    return tuple(sorted({values[round(i * step)] for i in range(k)}))


def _fractions(lv: Levers) -> list[float]:
    current = lv.label_fraction if isinstance(lv.label_fraction, (int, float)) else 1.0
    return [f for f in FRACTIONS if f < current]


def _options(lv: Levers, top_pool: int | None) -> dict[str, list[tuple[str, Levers]]]:
    """Per lever: (what to write, levers), mildest first."""
    ts = lv.timesteps
    pools, p = [], (lv.cache_pool or top_pool or 1) // 2
    while p >= 1:
        pools.append(p)
        p //= 2
    return {
        "label_fraction": [(f"label_fraction: {f}", dataclasses.replace(lv, label_fraction=f))
                           for f in _fractions(lv)],
        "timesteps": [(f"{k} timestep{'s' * (k > 1)} instead of {len(ts)} (e.g. t: {{choice: "
                       f"{list(_spread(ts, k))}}})",
                       dataclasses.replace(lv, timesteps=_spread(ts, k), policy="block-set"))
                      for k in range(len(ts) - 1, 0, -1)],
        "cache_pool": [(f"cache_pool: {q} and pools (pool, pre_pool) of at most {q}",
                        dataclasses.replace(lv, cache_pool=q, max_pool=q, policy="block-set"))
                       for q in pools],
        "policy": [("cache_policy: per-request", dataclasses.replace(lv, policy="per-request"))]
        if lv.policy == "block-set" else [],
        "max_concurrent": [(f"max_concurrent: {c}",
                            dataclasses.replace(lv, max_concurrent=c, policy="per-request"))
                           for c in range(lv.max_concurrent - 1, 0, -1)],
    }


def changes_that_fit(lv: Levers, run: Callable[[Levers], Numbers], *,
                     top_pool: int | None) -> list[str]:
    """The mildest setting of each lever that makes ``run(levers)`` fit; pairs of a label
    fraction and another lever when no lever fits alone. Empty when nothing tried fits."""
    options = _options(lv, top_pool)
    found = []
    for choices in options.values():
        hit = _mildest(choices, run)
        if hit is not None:
            text, n = hit
            found.append(f"{text} ({n.policy}, cache <= {_size(n.bound)})")
    if found:
        return found
    for name, choices in options.items():
        if name == "label_fraction" or not choices:
            continue
        text, strongest = choices[-1]
        for ftext, fl in options["label_fraction"]:
            n = run(dataclasses.replace(strongest, label_fraction=fl.label_fraction))
            if n.fits:
                found.append(f"{ftext} with {text} ({n.policy}, cache <= {_size(n.bound)})")
                break
    return found


def _mildest(choices: list[tuple[str, Levers]], run: Callable[[Levers], Numbers]
             ) -> tuple[str, Numbers] | None:
    """The first of ``choices`` (mildest first, each stronger than the one before) that fits,
    found by bisection."""
    lo, hi, best = 0, len(choices) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        n = run(choices[mid][1])
        if n.fits:
            best, hi = (choices[mid][0], n), mid - 1
        else:
            lo = mid + 1
    return best


def fitter(asks, costs, data, *, rungs=None, **kwargs) -> Callable[[Levers], Numbers]:
    """``evaluate`` with everything but the levers fixed; ``rungs(label_fraction)`` gives
    the rungs over images at the levers' label fraction (None: no rungs)."""
    return lambda lv: evaluate(asks, costs, data, lv,
                               rungs=rungs(lv.label_fraction) if rungs else None, **kwargs)


def _size(n: int) -> str:
    from difftune.search.space.sizes import format_size

    return format_size(n)
