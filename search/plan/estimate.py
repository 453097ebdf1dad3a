"""What a search will cost before anything runs (``difftune plan``, and the first thing
``difftune search`` does): the timesteps and blocks the space can ask for, the U-Net
image-passes with the cache and the paper's way (every epoch of every trial reruns the
U-Net), GFLOPs and peak activation bytes per image of an extraction pass, every cache entry
the chosen policy can write and their bound, the policy, and GPU-hours.

Nothing needs the checkpoint or the data: the architecture comes from the model's flags and
image counts from the data folder's listing, or from ``--images``/``--classes`` for a dataset
that is not on this machine. The arithmetic is :mod:`.plan_math`'s; a budget nothing fits
gets the cheapest changes that would (:mod:`.plan_fit`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from difftune.search.plan import fit as plan_fit
from difftune.search.plan.arithmetic import (
    DataSize,
    PlanError,
    entries,
    gpu_hours,
    levers_of,
    model_flags,
    space_asks,
    weights_bytes,
)
from difftune.search.plan.sizes import format_size, parse_size
from difftune.search.space.spec import Space
from difftune.trainables.cache import throughput
from difftune.trainables.model.cost import activation_bytes_per_image, unet_costs

logger = logging.getLogger(__name__)

__all__ = ["DataSize", "Plan", "PlanError", "data_size", "extraction", "make_plan",
           "resolve_budget"]

#: ImageNet-1k's val split has 50 images per class: the default for a stand-in dataset
VAL_PER_CLASS = 50


@dataclass
class Plan:
    space: str
    model: str
    data: dict[str, Any]
    trials: int
    epochs: int
    max_concurrent: int
    label_fraction: Any
    timesteps: list[int]
    blocks: list[int]
    deepest_block: int
    policy: str
    policy_requested: str
    fits: bool
    budget_bytes: int | None
    budget_source: str
    cache_bytes_bound: int
    cache_bytes_unevicted: int
    working_set_bytes: int
    evicts: bool
    store_pool: int | None
    unet_image_passes: int
    unet_image_passes_paper: int
    gflops_per_image: float
    activation_bytes_per_image: int
    precision: str
    weights_bytes: int
    img_per_s: float
    img_per_s_source: str
    gpu_hours: float
    gpu_hours_paper: float
    confirm: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: policy, cache bound against the budget, passes, GPU-hours."""
        budget = (" (no budget)" if self.budget_bytes is None else
                  f" of a {format_size(self.budget_bytes)} budget ({self.budget_source})")
        cache = ("nothing cached" if self.policy == "none" else
                 f"{self.policy} cache policy, cache <= {format_size(self.cache_bytes_bound)}"
                 + budget + (", least recently used entries evicted" if self.evicts else ""))
        ratio = self.unet_image_passes_paper / max(self.unet_image_passes, 1)
        return (f"plan: {cache}; {self.unet_image_passes:,} U-Net image-passes "
                f"({self.unet_image_passes_paper:,} the paper's way, {ratio:.3g}x); "
                f"{self.gpu_hours:.3g} GPU-hours at {self.img_per_s:.3g} img/s; "
                f"{self.gflops_per_image:.4g} GFLOPs and "
                f"{format_size(self.activation_bytes_per_image)} of activations per image "
                f"to block {self.deepest_block}")




# ------------------------------------------------------------------------------ inputs


def data_size(space: Space, *, images: int | None = None, classes: int | None = None,
              val_images: int | None = None) -> DataSize:
    """Images per split: ``--images``/``--classes`` (val: ``val_images``, default 50 per
    class as ImageNet-1k), or counted in the space's data without reading an image."""
    from difftune.trainables.data.datasets import check_data, class_counts

    if images is not None or classes is not None:
        if not images or not classes or images < 1 or classes < 1:
            raise PlanError("--images and --classes go together, both positive integers "
                            "(e.g. --images 1281167 --classes 1000 for ImageNet-1k)")
        val = val_images if val_images is not None else VAL_PER_CLASS * classes
        return DataSize(train_all=images, val=val, classes=classes,
                        source=f"--images {images} --classes {classes} (val {val})")
    check_data(space.data)
    holdout = space.setting("holdout")  # val: a holdout of train/ without a test/ folder
    train, val = (class_counts(space.data, split, holdout=holdout) for split in ("train", "val"))
    return DataSize(train_all=sum(train), val=sum(val), classes=len(train), source=space.data,
                    per_class=tuple(train))


def resolve_budget(cli: str | None, space: Space, cache: str | None
                   ) -> tuple[int | None, str, bool]:
    """``(bytes or None, where it came from, explicit)``: ``--cache-budget``, else the
    space's ``cache_budget``, else the free space of a local cache's filesystem; unlimited
    for an object store or without a cache."""
    if cli is not None:
        return parse_size(cli, what="--cache-budget"), "--cache-budget", True
    if space.search.get("cache_budget") is not None:
        return (parse_size(space.search["cache_budget"], what="search.cache_budget"),
                "search.cache_budget", True)
    if not cache or "://" in cache:
        return None, "unlimited (object store)" if cache else "no cache", False
    folder = os.path.abspath(cache)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free, f"free space of {folder}", False


def resolve_rate(flags: dict[str, Any], gflops: float, *, img_per_s: float | None,
                 cache: str | None, device: str | None) -> tuple[float, str, str | None]:
    """``(img/s of a pass to the deepest block, where it came from, precision measured)``:
    ``--img-per-s``, else what ``difftune extract`` measured for this architecture (and
    ``device`` kind) in the cache, converted by GFLOPs, else the documented default."""
    if img_per_s is not None:
        if img_per_s <= 0:
            raise PlanError(f"--img-per-s {img_per_s} must be positive")
        return img_per_s, "--img-per-s", None
    rec = None
    if cache:
        from difftune.trainables.cache.store import Store

        try:
            rec = throughput.best_record(Store(cache), flags, device=device)
        except OSError:
            rec = None
    if rec:
        return (rec["gflops_per_s"] / max(gflops, 1e-9),
                f"measured by difftune extract on {rec['device']} ({rec['precision']}, "
                f"{rec['measured']}: {rec['img_per_s']:.3g} img/s to block {rec['block']})",
                rec["precision"])
    rate = throughput.DEFAULT_GFLOPS_PER_S / max(gflops, 1e-9)
    return rate, (f"default: {throughput.DEFAULT_GFLOPS_PER_S / 1000:.0f} TFLOP/s effective "
                  "(an A10G in bf16)"), None


# ------------------------------------------------------------------------------ the plan


def make_plan(space: Space, data: DataSize, *, trials: int | None = None,
              budget: int | None = None, budget_source: str = "no budget",
              img_per_s: float | None = None, cache: str | None = None,
              cached: bool = True, precision: str | None = None,
              device: str | None = None) -> Plan:
    """The plan of ``space`` on ``data`` (see the module docstring).

    :param cached: False for ``--no-cache`` (policy ``none``: the paper's passes).
    :param precision: of the extraction (default: what the recorded throughput ran in, else
        bf16, a GPU's).
    """
    flags = model_flags(space)
    costs = unet_costs(flags)
    s = space.search
    trials = int(trials or s["trials"])
    epochs = space.max_epochs()
    asks = space_asks(space, costs)
    lv = levers_of(space)
    run = plan_fit.fitter(asks, costs, data, trials=trials, epochs=epochs, budget=budget,
                          confirm_top=int(s.get("confirm_top") or 0),
                          confirm_fraction=s.get("confirm_label_fraction"), cached=cached)
    n = run(lv)
    deepest = max([*n.blocks, *asks.live_blocks], default=0)
    gflops = costs[deepest].gflops_to if deepest else 0.0
    rate, source, measured = resolve_rate(flags, gflops, img_per_s=img_per_s, cache=cache,
                                          device=device)
    precision = precision or measured or "bf16"
    changes = [] if n.fits else plan_fit.changes_that_fit(
        lv, run, top_pool=max((p for c in asks.combos for _, _, p in c), default=None))
    k = min(int(s.get("confirm_top") or 0), trials)
    rows = n.layout["rows"]
    return Plan(
        space=space.name, model=space.model,
        data={"source": data.source, "train_images": data.train_all, "val_images": data.val,
              "classes": data.classes, "train_rows": rows["train"], "val_rows": rows["val"],
              "train_views": n.layout["views"]},
        trials=trials, epochs=epochs, max_concurrent=lv.max_concurrent,
        label_fraction=lv.label_fraction, timesteps=n.timesteps, blocks=n.blocks,
        deepest_block=deepest, policy=n.policy, policy_requested=lv.policy, fits=n.fits,
        budget_bytes=budget, budget_source=budget_source, cache_bytes_bound=n.bound,
        cache_bytes_unevicted=n.unevicted, working_set_bytes=n.working, evicts=n.evicts,
        store_pool=n.store_pool, unet_image_passes=n.passes,
        unet_image_passes_paper=n.passes_paper, gflops_per_image=gflops,
        activation_bytes_per_image=activation_bytes_per_image(
            flags, deepest, precision=precision)[0] if deepest else 0,
        precision=precision, weights_bytes=weights_bytes(flags), img_per_s=rate,
        img_per_s_source=source, gpu_hours=gpu_hours(n.passes, rate),
        gpu_hours_paper=gpu_hours(n.passes_paper, rate),
        confirm={"top": k, "label_fraction": s.get("confirm_label_fraction"),
                 "train_rows": rows["confirm"] or (rows["train"] if k else 0)},
        entries=entries(n, costs), changes=changes)


def extraction(plan: Plan, gpus: int = 1) -> dict[str, Any] | None:
    """What extracting the block-set policy's entries before the first trial costs (one
    U-Net pass per image of each split at each timestep), sharded over ``gpus`` GPUs at the
    plan's img/s each: image-passes, GPU-hours and wall hours. None for other policies (their
    trials extract what they ask)."""
    if plan.policy != "block-set":
        return None
    passes = len(plan.timesteps) * (plan.data["train_rows"] + plan.data["val_rows"])
    hours = gpu_hours(passes, plan.img_per_s)
    return {"gpus": gpus, "image_passes": passes, "gpu_hours": hours,
            "wall_hours": hours / max(gpus, 1),
            # a search extracts first only when its trials may ask every timestep: with more
            # timesteps than trials, extracting them all would pass more images than the
            # trials can ask (unet_image_passes), so trials extract what they ask
            "worth_it": passes <= plan.unet_image_passes}


def refusal(plan: Plan) -> str:
    """The one line a search that does not fit ends with."""
    need = plan.working_set_bytes if plan.policy == "per-request" else plan.cache_bytes_bound
    what = (f"the trials running at once need {format_size(need)} of cache "
            f"({plan.max_concurrent} x the largest trial)" if plan.policy == "per-request"
            else f"the cache needs {format_size(need)}")
    fix = ("; changes that fit: " + "; ".join(plan.changes)) if plan.changes else \
        ("; no smaller label fraction, fewer timesteps, smaller cache_pool or fewer trials "
         "at once fits: raise the budget")
    return (f"{what} (policy {plan.policy}) but the cache budget is "
            f"{format_size(plan.budget_bytes or 0)} ({plan.budget_source}){fix}")


def refuse_if_over(plan: Plan) -> None:
    """Raise :class:`PlanError` (exit code 2) with :func:`refusal` when the plan does not fit."""
    if not plan.fits:
        raise PlanError(refusal(plan))
