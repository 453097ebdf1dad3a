"""The arithmetic of a plan (:mod:`.plan`): what the trials of a space can ask the cache
for, and what a set of :class:`Levers` (timesteps, cache pool, label fraction, policy,
concurrency) costs in cache bytes and U-Net image-passes. Cheap enough to evaluate many
times (:mod:`.plan_fit` does, to find changes that fit a budget).

Bounds are worst cases: a trial that misses pays one pass per image and timestep it asks;
with the ``block-set`` policy only the first trial at each timestep does. Which pool an
entry is stored at is :func:`difftune.trainables.cache.policy.stored_pool`, as in the cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from difftune.search.space.spec import Space
from difftune.trainables.cache.policy import stored_pool
from difftune.trainables.config import TrialConfig
from difftune.trainables.errors import UserError
from difftune.trainables.heads import head_kind
from difftune.trainables.model.cost import ROW_OVERHEAD, BlockCost
from difftune.trainables.model.unet import full_flags, resolve

logger = logging.getLogger(__name__)

DTYPE = "float16"
DTYPE_BYTES = 2
#: settings of one value per trial that decide what a feature head reads
SCALAR_KEYS = ("block", "t", "pool", "pre_pool")
#: passes a live head (DifFeed) runs per image and epoch: feedback pass + second pass
LIVE_PASSES = 2


class PlanError(UserError):
    """A search does not fit its budget (exit code 2, before anything is written)."""


@dataclass(frozen=True)
class DataSize:
    """Images a search reads per split.

    :param train_all: train images before any label fraction.
    :param val: val images (never subsampled).
    :param classes: classes (for a stratified fraction of a stand-in dataset).
    :param per_class: train images per class (None: ``train_all / classes`` each).
    """

    train_all: int
    val: int
    classes: int
    source: str
    per_class: tuple[int, ...] | None = None

    def train(self, fraction: float | str | None) -> int:
        from difftune.trainables.data.datasets import subset_size

        counts = list(self.per_class) if self.per_class else \
            [self.train_all // self.classes + (i < self.train_all % self.classes)
             for i in range(self.classes)]
        return subset_size(counts, fraction)


@dataclass(frozen=True)
class Levers:
    """What a plan may change to fit a budget (:mod:`.plan_fit`)."""

    timesteps: tuple[int, ...]
    cache_pool: int | None
    label_fraction: float | str | None
    policy: str
    max_concurrent: int
    max_pool: int | None = None  # pools asked above this are asked at it (None: as asked)
    views: int = 1  # cached views of every train image (a trial's ``views``: K passes, K x bytes)


@dataclass
class Asks:
    """What the trials of a space can ask the cache for (feature heads), and what runs the
    U-Net itself (live heads)."""

    combos: list[list[tuple[int, int, int]]]  # per trial setting: its (t, block, pool)s
    live: bool  # a live head (DifFeed) can be chosen
    live_blocks: tuple[int, ...] = ()


# ------------------------------------------------------------------------------ the space


def space_asks(space: Space, costs: dict[int, BlockCost]) -> Asks:
    """Every (t, block, pool) set a trial of ``space`` can read, pools clamped to the maps."""
    combos: list[list[tuple[int, int, int]]] = []
    live, live_blocks = False, set()
    for head in space.head_types():
        kind = head_kind(head)
        values = space.values(head)
        base = TrialConfig(head=head)
        lists = {k: sorted({m for v in values[k] for m in (v if isinstance(v, list) else [v])})
                 for k in ("blocks", "timesteps") if k in values}
        if kind.live_unet:
            live = True
            cfg = dataclasses.replace(base, **lists)
            for b in values.get("block", [cfg.block]):
                for fb in values.get("feedback_blocks", [cfg.feedback_blocks]):
                    live_blocks.update([b, *(fb if isinstance(fb, list) else [fb])])
            continue
        scalars = {k: values[k] for k in SCALAR_KEYS if k in values and k in kind.settings}
        names = list(scalars)
        for combo in itertools.product(*(scalars[k] for k in names)):
            cfg = dataclasses.replace(base, **lists, **dict(zip(names, combo, strict=True)))
            combos.append(sorted({(t, b, min(p, costs[b].side))
                                  for t, b, p in kind.requests(cfg)}))
    return Asks(combos=combos, live=live, live_blocks=tuple(sorted(live_blocks)))


def row_bytes(costs: dict[int, BlockCost], block: int, pool: int) -> int:
    """Bytes one image adds to an entry of ``block`` stored at ``pool``."""
    return costs[block].channels * pool * pool * DTYPE_BYTES + ROW_OVERHEAD


# ----------------------------------------------------------------------------- the arithmetic


@dataclass
class Numbers:
    """What one set of :class:`Levers` costs (no entry list: cheap to evaluate often)."""

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


def evaluate(asks: Asks, costs: dict[int, BlockCost], data: DataSize, lv: Levers, *,
             trials: int, epochs: int, budget: int | None, confirm_top: int,
             confirm_fraction: float | None, cached: bool = True) -> Numbers:
    """The cost of a search under levers ``lv``: the policy it gets (``lv.policy`` or, for
    ``auto``, block-set when it fits, else per-request), its cache bounds and passes."""
    allowed, top = set(lv.timesteps), lv.max_pool or 1 << 30
    combos = [c for c in (sorted({(t, b, min(p, top)) for t, b, p in combo if t in allowed})
                          for combo in asks.combos) if c]
    requests = sorted({r for c in combos for r in c})
    timesteps = sorted({t for t, _, _ in requests})
    blocks = sorted({b for _, b, _ in requests})
    tpt = max((len({t for t, _, _ in c}) for c in combos), default=0)
    r_train, r_val = data.train(lv.label_fraction), data.val
    views = max(1, int(lv.views))
    r_search = r_train * views + r_val  # cached: K views of every train image, one of val
    r_paper = r_train + r_val  # the paper's way draws a fresh view at every pass, stores none
    confirm_k = min(confirm_top, trials)
    same = confirm_fraction in (None, 1, 1.0) and lv.label_fraction in (None, 1, 1.0) or \
        confirm_fraction == lv.label_fraction
    r_conf = 0 if same or not confirm_k else data.train(confirm_fraction)
    per_trial = max((sum(row_bytes(costs, b, p) for _, b, p in c) for c in combos), default=0)
    # the paper's way: every epoch of every trial reruns the U-Net (live heads: two passes)
    per_pass = max(tpt, LIVE_PASSES if asks.live else 0)
    paper = (trials * r_paper + confirm_k * ((r_conf or r_train) + r_val)) * epochs * per_pass
    live_trial = epochs * LIVE_PASSES * r_paper if asks.live else 0

    store = lv.cache_pool or max((p for _, _, p in requests), default=None)
    stored = {b: stored_pool(min(store, costs[b].side), costs[b].side, store) if store else 1
              for b in blocks}
    unserved = [(t, b, p) for t, b, p in requests if stored[b] % p != 0]
    per_t = sum(row_bytes(costs, b, stored[b]) for b in blocks)
    confirm_bytes = confirm_k * per_trial * r_conf * views
    confirm_working = min(confirm_k, lv.max_concurrent) * per_trial * (r_conf * views + r_val) \
        if r_conf else 0

    def worst(feature_passes) -> int:  # trials split between live and feature heads
        if not asks.live:
            return feature_passes(trials)
        if not combos:
            return trials * live_trial
        return max(n * live_trial + feature_passes(trials - n) for n in range(trials + 1))

    # block-set: every block of every timestep asked, at the store pool; odd pools apart
    k = min(trials * tpt, len(timesteps))
    bs_unserved = min(sum(row_bytes(costs, b, p) for _, b, p in unserved),
                      trials * max((sum(row_bytes(costs, b, p) for _, b, p in c
                                        if (_, b, p) in unserved) for c in combos), default=0))
    bs_total = (k * per_t + bs_unserved) * r_search + confirm_bytes
    bs_passes = worst(lambda n: (n * tpt if unserved else min(n * tpt, len(timesteps)))
                      * r_search)
    # per-request: what each trial asks, evicting beyond the budget
    pr_unevicted = min(sum(row_bytes(costs, b, p) for _, b, p in requests),
                       trials * per_trial) * r_search + confirm_bytes
    pr_working = max(min(trials, lv.max_concurrent) * per_trial * r_search, confirm_working)
    pr_passes = worst(lambda n: n * tpt * r_search)
    conf_passes = confirm_k * max(tpt * ((r_conf * views or r_search - r_val) + r_val)
                                  if combos else 0, live_trial if asks.live else 0)

    limit = float("inf") if budget is None else budget
    if not cached or not combos:  # --no-cache, or only live heads: nothing is cached
        policy, fits, bound, unevicted, working = "none", True, 0, 0, 0
        passes = paper if not cached else worst(lambda n: 0) + confirm_k * live_trial
    else:
        policy = lv.policy
        if policy == "auto":
            policy = "block-set" if bs_total <= limit else "per-request"
        if policy == "block-set":
            fits, bound, unevicted, working = bs_total <= limit, bs_total, bs_total, bs_total
            passes = bs_passes + (conf_passes if r_conf else 0)
        else:
            fits, unevicted, working = pr_working <= limit, pr_unevicted, pr_working
            bound = int(min(pr_unevicted, limit))
            passes = pr_passes + conf_passes
    return Numbers(policy=policy, fits=fits, bound=int(bound), unevicted=int(unevicted),
                   working=int(working), evicts=cached and policy == "per-request"
                   and unevicted > limit, passes=int(passes), passes_paper=int(paper),
                   timesteps=timesteps, blocks=blocks,
                   store_pool=store if policy == "block-set" else None,
                   layout={"requests": requests, "stored": stored, "unserved": unserved,
                           "rows": {"train": r_train, "val": r_val, "confirm": r_conf},
                           "views": views})


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
    return passes / max(img_per_s, 1e-9) / 3600


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
