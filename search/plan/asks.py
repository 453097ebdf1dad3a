"""What the trials of a space can ask for (:func:`space_asks`), with the probability of each
setting as the space samples it, and what a trial's U-Net passes cost per image and epoch in
expectation (:class:`TrialCost`): one pass per timestep, stopping after the deepest block
asked at it (:func:`combo_cost`); a live head (DifFeed) a feedback pass to its deepest
fed-back block and a second pass to its own block (:func:`live_cost`)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from difftune.search.space.spec import Space
from difftune.trainables.config import TrialConfig
from difftune.trainables.heads import head_kind
from difftune.trainables.model.cost import BlockCost

logger = logging.getLogger(__name__)

__all__ = ["LIVE_PASSES", "SCALAR_KEYS", "Asks", "TrialCost", "combo_cost", "head_gflops",
           "live_cost", "mean_cost", "space_asks", "subset_odds"]

#: settings of one value per trial that decide what a feature head reads
SCALAR_KEYS = ("block", "t", "pool", "pre_pool")
#: passes a live head (DifFeed) runs per image and epoch: feedback pass + second pass
LIVE_PASSES = 2


@dataclass
class Asks:
    """What the trials of a space can ask the cache for (feature heads), and what runs the
    U-Net itself (live heads)."""

    combos: list[list[tuple[int, int, int]]]  # per trial setting: its (t, block, pool)s
    live: bool  # a live head (DifFeed) can be chosen
    live_blocks: tuple[int, ...] = ()
    #: per live setting: (the head's block, the deepest block its first pass runs to, its
    #: probability)
    live_passes: tuple[tuple[int, int, float], ...] = ()
    #: the probability of each of ``combos`` (None: all alike)
    weights: list[float] | None = None
    #: the trial config each of ``combos`` was read from (its head, block, t, ...)
    configs: list[TrialConfig] | None = None


#: subsets of more members than this are not enumerated: a trial is priced as asking them all
MAX_SUBSET = 12


def subset_odds(members: list[Any], least: int = 1) -> list[tuple[tuple[Any, ...], float]]:
    """Every subset a trial can draw of a ``subset`` setting, with its probability under the
    search space's sampling (:mod:`difftune.search.space.distributions`: each member in or out
    with even odds, members forced in when just enough are left for ``min``)."""
    out: list[tuple[tuple[Any, ...], float]] = []

    def walk(i: int, chosen: tuple[Any, ...], p: float) -> None:
        if i == len(members):
            out.append((chosen, p))
        elif least - len(chosen) >= len(members) - i:  # forced in
            walk(i + 1, (*chosen, members[i]), p)
        else:
            walk(i + 1, (*chosen, members[i]), p / 2)
            walk(i + 1, chosen, p / 2)

    walk(0, (), 1.0)
    return out


def _list_odds(spec: dict[str, Any] | None, values: list[Any]
               ) -> list[tuple[tuple[Any, ...], float]]:
    """The lists a trial can hold for a list setting (``blocks``, ``timesteps``,
    ``feedback_blocks``), with their probabilities: a subset's subsets, a choice's lists
    alike; otherwise (a fixed list, a subset too large to enumerate) every value at once."""
    flat = tuple(sorted({m for v in values for m in (v if isinstance(v, list) else [v])}))
    if spec and "subset" in spec and len(spec["subset"]) <= MAX_SUBSET:
        return subset_odds(list(spec["subset"]), int(spec.get("min", 1)))
    if spec and isinstance(spec.get("choice"), list):
        lists = [tuple(v if isinstance(v, list) else [v]) for v in spec["choice"]]
        return [(v, 1 / len(lists)) for v in lists]
    return [(flat, 1.0)]


def _specs(space: Space, head: str) -> dict[str, dict[str, Any]]:
    """The sampled settings' specs of a trial of ``head`` (as :meth:`Space.values` reads)."""
    specs = {k: v for k, v in space.params.items() if k != "head"}
    sub = space.params.get("head", {}).get("choice")
    if isinstance(sub, dict):
        specs.update(sub.get(head) or {})
    return specs


# ------------------------------------------------------------------------------ the space


def space_asks(space: Space, costs: dict[int, BlockCost]) -> Asks:
    """Every (t, block, pool) set a trial of ``space`` can read, pools clamped to the maps,
    with its probability (settings of a head alike; a subset's subsets as sampled)."""
    combos: list[list[tuple[int, int, int]]] = []
    weights: list[float] = []
    configs: list[TrialConfig] = []
    live, live_blocks, live_passes = False, set(), []
    heads = space.head_types()
    for head in heads:
        kind = head_kind(head)
        values = space.values(head)
        specs = _specs(space, head)
        base = TrialConfig(head=head)
        if kind.live_unet:
            live = True
            blocks = values.get("block", [base.block])
            fbs = _list_odds(specs.get("feedback_blocks"),
                             values.get("feedback_blocks", [base.feedback_blocks]))
            for b in blocks:
                for fed, p in fbs:
                    live_blocks.update([b, *fed])
                    live_passes.append((b, max([b, *fed]), p / len(blocks) / len(heads)))
            continue
        lists = {k: _list_odds(specs.get(k), values[k]) for k in ("blocks", "timesteps")
                 if k in values}
        scalars = {k: values[k] for k in SCALAR_KEYS if k in values and k in kind.settings}
        names, lnames = list(scalars), list(lists)
        n_scalar = 1
        for k in names:
            n_scalar *= len(scalars[k])
        for held in itertools.product(*(lists[k] for k in lnames)):
            chosen = {k: list(v) for k, (v, _) in zip(lnames, held, strict=True)}
            p_list = 1.0
            for _, p in held:
                p_list *= p
            for combo in itertools.product(*(scalars[k] for k in names)):
                cfg = dataclasses.replace(base, **chosen, **dict(zip(names, combo, strict=True)))
                combos.append(sorted({(t, b, min(p, costs[b].side))
                                      for t, b, p in kind.requests(cfg)}))
                weights.append(p_list / n_scalar / len(heads))
                configs.append(cfg)
    return Asks(combos=combos, live=live, live_blocks=tuple(sorted(live_blocks)),
                live_passes=tuple(live_passes), weights=weights, configs=configs)


#: head shapes counted per head kind at most (evenly spread over the distinct ones)
HEAD_SAMPLES = 16


def head_gflops(space: Space, asks: Asks, costs: dict[int, BlockCost], classes: int) -> float:
    """GFLOPs per image of one forward of a feature head, in expectation over the space's
    settings: each head kind built on the meta device (nothing allocated) with the space's
    fixed settings (TrialConfig's defaults for the sampled architecture settings) on the
    maps of its (t, block, pool) sets, at most :data:`HEAD_SAMPLES` distinct map sets per
    head kind, evenly spread and weighted as the space samples them. Live heads (DifFeed)
    are priced by their U-Net passes alone."""
    import torch

    from difftune.trainables.model.cost import module_gflops

    groups: dict[tuple[str, tuple], list] = {}  # (head, maps) -> [weight, config, combo]
    weights = asks.weights or [1.0] * len(asks.combos)
    for cfg, combo, w in zip(asks.configs or [], asks.combos, weights, strict=True):
        maps = tuple(sorted((b, p) for _, b, p in combo))  # what the head's size depends on
        group = groups.setdefault((cfg.head, maps), [0.0, cfg, combo])
        group[0] += w
    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    read = {*SCALAR_KEYS, "head", "blocks", "timesteps", "feedback_blocks"}
    fixed = {k: v for k, v in space.fixed.items() if k in fields and k not in read}
    total = weight = 0.0
    for head in sorted({h for h, _ in groups}):
        keys = sorted(k for k in groups if k[0] == head)
        step = max(1, len(keys) // HEAD_SAMPLES)
        for key in keys[::step][:HEAD_SAMPLES]:
            w, cfg, combo = groups[key]
            shapes = {(t, b): (costs[b].channels, p, p) for t, b, p in combo}
            with torch.random.fork_rng(), torch.device("meta"):
                module = head_kind(head).build(dataclasses.replace(cfg, **fixed), shapes,
                                               classes, None).eval()
                g = module_gflops(module, {k: torch.zeros(1, *s) for k, s in shapes.items()})
            total, weight = total + g * w * step, weight + w * step
    return total / weight if weight else 0.0


def combo_cost(costs: dict[int, BlockCost], combo: list[tuple[int, int, int]]
               ) -> tuple[int, float]:
    """``(passes, GFLOPs)`` per image of one trial setting: one pass per timestep it asks,
    each stopping after the deepest block asked at that timestep."""
    deepest: dict[int, int] = {}
    for t, b, _ in combo:
        deepest[t] = max(b, deepest.get(t, 0))
    return len(deepest), sum(costs[b].gflops_to for b in deepest.values())


@dataclass(frozen=True)
class TrialCost:
    """What one trial's U-Net passes cost per image and epoch, in expectation over the
    space's settings."""

    passes: float
    gflops: float


def mean_cost(items: list[tuple[float, float, float]]) -> TrialCost:
    """The expected ``(passes, GFLOPs)`` of ``(passes, GFLOPs, weight)`` items."""
    total = sum(w for _, _, w in items)
    if not items or total <= 0:
        return TrialCost(0.0, 0.0)
    return TrialCost(sum(p * w for p, _, w in items) / total,
                     sum(g * w for _, g, w in items) / total)


def live_cost(costs: dict[int, BlockCost], asks: Asks) -> TrialCost:
    """A live head's passes per image and epoch: the first pass to its deepest block (fed
    back), the second to its own block."""
    return mean_cost([(LIVE_PASSES, costs[deep].gflops_to + costs[b].gflops_to, w)
                      for b, deep, w in asks.live_passes])
