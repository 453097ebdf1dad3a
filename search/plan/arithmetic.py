"""The arithmetic of a plan (:mod:`.estimate`): what the trials of a space can ask the cache
for, and what a set of :class:`Levers` (timesteps, cache pool, label fraction, policy,
concurrency) costs in cache bytes, U-Net image-passes and GFLOPs. Cheap enough to evaluate
many times (:mod:`.fit` does, to find changes that fit a budget).

Cache bytes are worst cases. Passes are priced on both sides of every comparison alike:

- each U-Net pass at the GFLOPs of the deepest block that pass needs (a pass stops after
  it): the block-set policy's passes to the deepest block of the set, a per-request miss and
  the paper's way (``--no-cache``) to the trial's own deepest block at each of its
  timesteps, a live head (DifFeed) to its deepest fed-back block and then to its own block;
- a trial's cost is the mean over the space's settings (every (t, block, pool) set a trial
  can read, as :func:`space_asks` lists them, equally likely);
- epochs a trial runs are the expected epochs under the search's early stopping
  (:mod:`.stopping`); every epoch (``max_t``) is the bound kept beside them. Confirm trials
  run every epoch (no scheduler). Under rungs over images (:mod:`.rungs`) each rung's
  extension of an entry is paid by the trials that reach it, which run every epoch there.

A trial that misses pays one pass per image and timestep it asks; with the ``block-set``
policy only the first trial at each timestep does. Which pool an entry is stored at is
:func:`difftune.trainables.cache.policy.stored_pool`, as in the cache.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from difftune.search.plan.asks import (
    Asks,
    TrialCost,
    combo_cost,
    live_cost,
    mean_cost,
)
from difftune.search.plan.data import DataSize
from difftune.search.plan.rungs import Rungs, running_rows
from difftune.search.space.spec import Space
from difftune.trainables.cache.policy import stored_pool
from difftune.trainables.errors import UserError
from difftune.trainables.model.cost import ROW_OVERHEAD, BlockCost
from difftune.trainables.model.unet import full_flags, resolve

logger = logging.getLogger(__name__)

DTYPE = "float16"
DTYPE_BYTES = 2


class PlanError(UserError):
    """A search does not fit its budget (exit code 2, before anything is written)."""


@dataclass(frozen=True)
class Levers:
    """What a plan may change to fit a budget (:mod:`.fit`)."""

    timesteps: tuple[int, ...]
    cache_pool: int | None
    label_fraction: float | str | None
    policy: str
    max_concurrent: int
    max_pool: int | None = None  # pools asked above this are asked at it (None: as asked)
    views: int = 1  # cached views of every train image (a trial's ``views``: K passes, K x bytes)


def row_bytes(costs: dict[int, BlockCost], block: int, pool: int) -> int:
    """Bytes one image adds to an entry of ``block`` stored at ``pool``."""
    return costs[block].channels * pool * pool * DTYPE_BYTES + ROW_OVERHEAD


# ----------------------------------------------------------------------------- the arithmetic


@dataclass
class Numbers:
    """What one set of :class:`Levers` costs (no entry list: cheap to evaluate often).

    Passes and GFLOPs are expected values (see the module docstring); ``*_bound`` counts
    every trial to its last epoch. ``policies``: what each caching policy would cost
    (``fits``, ``cache_bytes``, ``image_passes``, ``gflops``), the comparison ``auto``
    decides by.
    """

    policy: str
    fits: bool
    bound: int
    unevicted: int
    working: int
    evicts: bool
    passes: int
    passes_paper: int
    timesteps: list[int]
    blocks: list[int]
    store_pool: int | None
    layout: dict[str, Any]
    gflops: float = 0.0
    gflops_paper: float = 0.0
    passes_paper_bound: int = 0
    gflops_paper_bound: float = 0.0
    trial: TrialCost = TrialCost(0.0, 0.0)
    policies: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    test_passes: int = 0
    test_gflops: float = 0.0
    test_evaluations: int = 0
    #: per rung (one without rungs): the trials' (passes, GFLOPs), cache bytes, trials
    rung_costs: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    rung_bytes: list[float] = dataclasses.field(default_factory=list)
    rung_trials: list[float] = dataclasses.field(default_factory=list)
    #: the probe rung's (passes, GFLOPs) and cache bytes: rung 0's sample of every timestep
    probe: tuple[float, float] = (0.0, 0.0)
    probe_bytes: float = 0.0
    #: head training GFLOPs: the search's per rung (confirm apart), and the paper's way's
    rung_heads: list[float] = dataclasses.field(default_factory=list)
    head_gflops: float = 0.0
    head_gflops_paper: float = 0.0
    #: the paper's way with the same rungs (every epoch of a rung reruns its sample): passes,
    #: GFLOPs
    paper_rungs: tuple[float, float] = (0.0, 0.0)


def _add(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] + b[0], a[1] + b[1]


def _sum(costs: list[tuple[float, float]]) -> tuple[float, float]:
    return sum(p for p, _ in costs), sum(g for _, g in costs)


def _addl(a: list[tuple[float, float]], b: list[tuple[float, float]]
          ) -> list[tuple[float, float]]:
    return [_add(x, y) for x, y in zip(a, b, strict=True)]


def evaluate(asks: Asks, costs: dict[int, BlockCost], data: DataSize, lv: Levers, *,
             trials: int, epochs: int, budget: int | None, confirm_top: int,
             confirm_fraction: float | None, cached: bool = True,
             expected_epochs: float | None = None, rungs: Rungs | None = None,
             head_gflops: float = 0.0) -> Numbers:
    """The cost of a search under levers ``lv``: the policy it gets (``lv.policy`` or, for
    ``auto``, of the policies that fit the budget the one with fewer GFLOPs, i.e.
    GPU-hours, then fewer bytes; per-request when none fits), its cache bounds, passes and
    GFLOPs, and the paper's way's.

    :param epochs: the most epochs a trial runs (``max_t``).
    :param expected_epochs: the epochs a search trial runs in expectation under the early
        stopping (:func:`.stopping.early_stopping`; default ``epochs``); not under rungs,
        where a trial runs every epoch at each rung it reaches.
    :param rungs: rungs over images (:mod:`.rungs`): each rung's extension priced for the
        trials that reach it (None: one rung of every image).
    :param head_gflops: GFLOPs per image of a head's forward (mean over the space).
    """
    expected = float(epochs if expected_epochs is None else expected_epochs)
    allowed, top = set(lv.timesteps), lv.max_pool or 1 << 30
    weights = asks.weights or [1.0] * len(asks.combos)
    kept = [(c, w) for c, w in ((sorted({(t, b, min(p, top)) for t, b, p in combo
                                         if t in allowed}), w)
                                for combo, w in zip(asks.combos, weights, strict=True)) if c]
    combos = [c for c, _ in kept]
    requests = sorted({r for c in combos for r in c})
    timesteps = sorted({t for t, _, _ in requests})
    blocks = sorted({b for _, b, _ in requests})
    tpt = max((len({t for t, _, _ in c}) for c in combos), default=0)
    r_train, r_val = data.train(lv.label_fraction), data.val
    views = max(1, int(lv.views))
    r_search = r_train * views + r_val  # cached: K views of every train image, one of val
    r_paper = r_train + r_val  # the paper's way draws a fresh view at every pass, stores none
    # per rung: trials of n reaching it, rows it adds to an entry, its images, an epoch's rows
    reach = rungs.trials if rungs else (lambda n: [float(n)])
    added = rungs.added(views) if rungs else [r_search]
    sample = [t + v for t, v in zip(rungs.train, rungs.val, strict=True)] if rungs else None
    read = [t + v for t, v in zip(rungs.trained(), rungs.val, strict=True)] if rungs else None
    confirm_k = min(confirm_top, trials)
    same = confirm_fraction in (None, 1, 1.0) and lv.label_fraction in (None, 1, 1.0) or \
        confirm_fraction == lv.label_fraction
    r_conf = 0 if same or not confirm_k else data.train(confirm_fraction)
    per_trial = max((sum(row_bytes(costs, b, p) for _, b, p in c) for c in combos), default=0)
    feature = mean_cost([(*combo_cost(costs, c), w) for c, w in kept])
    live = live_cost(costs, asks) if asks.live else TrialCost(0.0, 0.0)
    # the paper's way: every epoch a trial runs reruns the U-Net to the trial's own blocks
    paper_kind = max([feature] * bool(combos) + [live] * asks.live, key=lambda k: k.gflops,
                     default=TrialCost(0.0, 0.0))
    conf_rows = confirm_k * ((r_conf or r_train) + r_val)  # confirm trials: every epoch

    def paper_of(e: float) -> tuple[float, float]:
        rows = trials * r_paper * e + conf_rows * epochs
        return rows * paper_kind.passes, rows * paper_kind.gflops

    paper, paper_bound = paper_of(expected), paper_of(epochs)
    live_confirm = (epochs * r_paper * live.passes, epochs * r_paper * live.gflops)

    def live_of(n: float) -> list[tuple[float, float]]:  # live heads rerun every epoch
        rows = [n * expected * r_paper] if not rungs else \
            [m * epochs * r for m, r in zip(reach(n), read, strict=True)]
        return [(r * live.passes, r * live.gflops) for r in rows]

    # head training: 3 forwards per train row, 1 per val row, per epoch of each rung reached
    conf_heads = confirm_k * epochs * (3 * (r_conf or r_train) + r_val) * head_gflops
    heads_single = trials * expected * (3 * r_train + r_val) * head_gflops
    rung_heads = [m * epochs * (3 * t + v) * head_gflops for m, t, v in zip(
        reach(trials), rungs.trained(), rungs.val, strict=True)] if rungs else [heads_single]
    # the paper's way under the same rungs: every epoch of each rung on its sample
    paper_list = [paper] if not rungs else [
        (m * r * epochs * paper_kind.passes, m * r * epochs * paper_kind.gflops)
        for m, r in zip(reach(trials), read, strict=True)]
    paper_rungs = _add(_sum(paper_list), (conf_rows * epochs * paper_kind.passes,
                                          conf_rows * epochs * paper_kind.gflops)) \
        if rungs else (0.0, 0.0)

    store = lv.cache_pool or max((p for _, _, p in requests), default=None)
    stored = {b: stored_pool(min(store, costs[b].side), costs[b].side, store) if store else 1
              for b in blocks}
    unserved = [(t, b, p) for t, b, p in requests if stored[b] % p != 0]
    per_t = sum(row_bytes(costs, b, stored[b]) for b in blocks)
    confirm_bytes = confirm_k * per_trial * r_conf * views
    confirm_working = min(confirm_k, lv.max_concurrent) * per_trial * (r_conf * views + r_val) \
        if r_conf else 0

    def worst(feature_cost) -> list[tuple[float, float]]:  # trials: live and feature
        if not asks.live:
            return feature_cost(trials)
        if not combos:
            return live_of(trials)
        return max((_addl(live_of(n), feature_cost(trials - n)) for n in range(trials + 1)),
                   key=lambda costs: _sum(costs)[1])

    # block-set: every block of every timestep asked, at the store pool (odd pools apart),
    # each pass to the deepest block of the set
    deep_gflops = costs[blocks[-1]].gflops_to if blocks else 0.0
    odd_all = sum(row_bytes(costs, b, p) for _, b, p in unserved)
    odd_one = max((sum(row_bytes(costs, b, p) for _, b, p in c if (_, b, p) in unserved)
                   for c in combos), default=0)
    # an entry extends to the deepest rung reached at it: each rung's rows, its timesteps
    bs_bytes = [(min(m * tpt, len(timesteps)) * per_t + min(odd_all, m * odd_one)) * d
                for m, d in zip(reach(trials), added, strict=True)]
    bs_total = sum(bs_bytes) + confirm_bytes
    probed = bool(rungs and rungs.probe and combos)  # its entries serve the trials' rung 0

    def bs_cost(n: float) -> list[tuple[float, float]]:
        out = []
        for m, d in zip(reach(n), added, strict=True):
            p = (m * tpt if unserved else min(m * tpt, len(timesteps))) * d
            out.append((p, p * deep_gflops))
        return probe_served(out)

    def probe_served(out: list) -> list:
        return [(0.0, 0.0), *out[1:]] if probed else out

    # per-request: what each trial asks (a pass per timestep to its deepest block), evicted
    all_bytes = sum(row_bytes(costs, b, p) for _, b, p in requests)
    pr_bytes = [min(all_bytes, m * per_trial) * d
                for m, d in zip(reach(trials), added, strict=True)]
    pr_unevicted = sum(pr_bytes) + confirm_bytes
    pr_working = max(per_trial * running_rows(rungs, trials, lv.max_concurrent, r_search,
                                              views), confirm_working)

    def pr_cost(n: float) -> list[tuple[float, float]]:
        return probe_served([(m * feature.passes * d, m * feature.gflops * d)
                             for m, d in zip(reach(n), added, strict=True)])

    conf_train = (r_conf * views or r_search - r_val) + r_val
    conf = max(((feature.passes * conf_train, feature.gflops * conf_train) if combos
                else (0.0, 0.0)), live_confirm if asks.live else (0.0, 0.0),
               key=lambda pg: pg[1])
    conf = (confirm_k * conf[0], confirm_k * conf[1])
    limit = float("inf") if budget is None else budget
    probe, probe_bytes = (0.0, 0.0), 0.0
    if probed:  # every timestep once, to the deepest block (every block stored)
        probe = (len(timesteps) * sample[0], len(timesteps) * sample[0] * deep_gflops)
        probe_bytes = len(timesteps) * per_t * sample[0]
        bs_bytes[0], pr_bytes[0] = max(bs_bytes[0], probe_bytes), max(pr_bytes[0], probe_bytes)
        bs_total, pr_unevicted = sum(bs_bytes) + confirm_bytes, sum(pr_bytes) + confirm_bytes
    # confirm trials that did not reach the last rung extend their timesteps' entries
    late = max(0.0, confirm_k - reach(trials)[-1]) * tpt * r_search if rungs else 0.0
    bs_rungs, pr_rungs = worst(bs_cost), worst(pr_cost)
    bs = _add(_add(_sum(bs_rungs), conf if r_conf else (late, late * deep_gflops)), probe)
    pr = _add(_add(_sum(pr_rungs), conf), probe)
    options = {
        "block-set": {"fits": bs_total <= limit, "cache_bytes": int(bs_total),
                      "image_passes": int(round(bs[0])), "gflops": bs[1]},
        "per-request": {"fits": pr_working <= limit, "cache_bytes": int(min(pr_unevicted,
                                                                             limit)),
                        "cache_bytes_unevicted": int(pr_unevicted),
                        "working_set_bytes": int(pr_working),
                        "image_passes": int(round(pr[0])), "gflops": pr[1]},
    } if cached and combos else {}
    if not cached or not combos:  # --no-cache, or only live heads: nothing is cached
        policy, fits, bound, unevicted, working = "none", True, 0, 0, 0
        zero = [(0.0, 0.0)] * len(added)
        chosen = paper_list if not cached else worst(lambda n: zero)
        chosen_bytes = [0.0] * len(added)
        passes, gflops = (paper_rungs if rungs else paper) if not cached else _add(
            _sum(chosen), (confirm_k * live_confirm[0], confirm_k * live_confirm[1]))
    else:
        policy = lv.policy
        if policy == "auto":
            fitting = [p for p in options if options[p]["fits"]]
            policy = min(fitting, key=lambda p: (options[p]["gflops"],
                                                 options[p]["cache_bytes"])) \
                if fitting else "per-request"
        if policy == "block-set":
            fits, bound, unevicted, working = bs_total <= limit, bs_total, bs_total, bs_total
            (passes, gflops), chosen, chosen_bytes = bs, bs_rungs, bs_bytes
        else:
            fits, unevicted, working = pr_working <= limit, pr_unevicted, pr_working
            bound = int(min(pr_unevicted, limit))
            (passes, gflops), chosen, chosen_bytes = pr, pr_rungs, pr_bytes
    # the test split: the champion and each confirmed config, once, to its own blocks
    evaluations = max(confirm_k, 1)
    return Numbers(policy=policy, fits=fits, bound=int(bound), unevicted=int(unevicted),
                   working=int(working), evicts=cached and policy == "per-request"
                   and unevicted > limit, passes=int(round(passes)),
                   passes_paper=int(round(paper[0])), timesteps=timesteps, blocks=blocks,
                   store_pool=store if policy == "block-set" else None,
                   layout={"requests": requests, "stored": stored, "unserved": unserved,
                           "rows": {"train": r_train, "val": r_val, "confirm": r_conf,
                                    "test": data.test},
                           "views": views},
                   gflops=gflops, gflops_paper=paper[1],
                   passes_paper_bound=int(round(paper_bound[0])),
                   gflops_paper_bound=paper_bound[1], trial=paper_kind, policies=options,
                   test_passes=int(round(evaluations * data.test * paper_kind.passes)),
                   test_gflops=evaluations * data.test * paper_kind.gflops,
                   test_evaluations=evaluations, rung_costs=chosen, rung_bytes=chosen_bytes,
                   rung_trials=reach(trials), probe=probe, probe_bytes=probe_bytes,
                   rung_heads=rung_heads,
                   head_gflops=sum(rung_heads) + conf_heads,
                   head_gflops_paper=heads_single + conf_heads, paper_rungs=paper_rungs)



def entries(n: Numbers, costs: dict[int, BlockCost]) -> list[dict[str, Any]]:
    """Every entry the policy of ``n`` can write: stage, split, rows, t, block, pool, dtype,
    bytes."""
    rows = n.layout["rows"]
    if n.policy == "block-set":
        search = [(t, b, n.layout["stored"][b]) for t in n.timesteps for b in n.blocks]
        search += n.layout["unserved"]
    elif n.policy == "per-request":
        search = list(n.layout["requests"])
    else:
        return []
    views = n.layout.get("views", 1)
    splits = [("train", v) for v in range(views)] + [("val", 0)]  # K views of train
    out = [{"stage": "search", "split": split, "view": v, "rows": rows[split], "t": t,
            "block": b, "pool": p, "dtype": DTYPE, "bytes": rows[split] * row_bytes(costs, b, p)}
           for split, v in splits for t, b, p in search]
    if rows["confirm"]:
        out += [{"stage": "confirm", "split": "train", "view": v, "rows": rows["confirm"],
                 "t": t, "block": b, "pool": p, "dtype": DTYPE,
                 "bytes": rows["confirm"] * row_bytes(costs, b, p)}
                for v in range(views) for t, b, p in n.layout["requests"]]
    return out


def model_flags(space: Space) -> dict[str, Any]:
    """The complete flags of the space's model (no checkpoint is read)."""
    flags, _ = resolve(space.model, checkpoint=space.checkpoint)
    return full_flags(flags)


def weights_bytes(flags: dict[str, Any]) -> int:
    """fp32 bytes of the model's weights (counted on the meta device)."""
    import torch

    from difftune.trainables.model.unet import build

    with torch.device("meta"):
        model, _ = build({**flags, "use_fp16": False})
    return sum(p.numel() for p in model.parameters()) * 4


def gpu_hours(passes: int, img_per_s: float) -> float:
    """Hours of ``passes`` image-passes at ``img_per_s`` (all to the same block)."""
    return passes / max(img_per_s, 1e-9) / 3600


def gflop_hours(gflops: float, gflops_per_s: float) -> float:
    """GPU-hours of ``gflops`` GFLOPs at an effective ``gflops_per_s``: passes to different
    blocks priced each at its own GFLOPs."""
    return gflops / max(gflops_per_s, 1e-9) / 3600


def levers_of(space: Space) -> Levers:
    """The levers as the space sets them."""
    s = space.search
    ts: set[int] = set()
    for head in space.head_types():
        values = space.values(head)
        for k in ("t", "timesteps"):
            for v in values.get(k, []):
                ts.update(v if isinstance(v, list) else [v])
    views = max((int(v) for head in space.head_types()
                 for v in space.values(head).get("views", [])), default=1)
    return Levers(timesteps=tuple(sorted(ts)), cache_pool=s.get("cache_pool"), views=views,
                  label_fraction=space.fixed.get("label_fraction", space.label_fraction),
                  policy=s.get("cache_policy", "auto"),
                  max_concurrent=int(s["max_concurrent"]))
