"""What a search will cost before anything runs (``difftune plan``, and the first thing
``difftune search`` does): the timesteps and blocks the space can ask for, the U-Net
image-passes and GPU-hours with the cache and the paper's way (every epoch a trial runs
reruns the U-Net to the trial's own blocks), both under the same early stopping (expected
epochs, with the every-epoch bound beside them), GFLOPs and peak activation bytes per image
of an extraction pass, every cache entry the chosen policy can write and their bound, the
policies compared (``auto`` takes the one of fewer GPU-hours that fits), and the test
evaluations apart.

GPU-hours are GFLOPs over an effective FLOP rate: each pass priced at the GFLOPs to the
deepest block it needs; a measured img/s (to the deepest block it was measured at) is
converted to that rate. Head training is priced apart at the same rate (3 head forwards per
train image and 1 per val image each epoch, alike on both sides).

With ``search: image_rungs`` the plan prices each rung (:mod:`.rungs`): the trials ASHA
lets reach it, each split's sample there, the passes and bytes that extend the entries to
it, head training on it, and the probe rung; the same search without rungs and the paper's
way on the same rungs beside it (:func:`~.rungs.rung_table`, ``Plan.rungs``).

Nothing needs the checkpoint or the data: the architecture comes from the model's flags and
image counts from the data folder's listing, or from ``--images``/``--classes`` for a dataset
that is not on this machine. The arithmetic is :mod:`.arithmetic`'s; a budget nothing fits
gets the cheapest changes that would (:mod:`.fit`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from difftune.search.plan import fit as plan_fit
from difftune.search.plan.arithmetic import (
    PlanError,
    entries,
    gflop_hours,
    gpu_hours,
    levers_of,
    model_flags,
    weights_bytes,
)
from difftune.search.plan.asks import head_gflops, space_asks
from difftune.search.plan.data import DataSize
from difftune.search.plan.rungs import rung_table, rungs_of
from difftune.search.plan.stopping import early_stopping
from difftune.search.space.sizes import format_size, parse_size
from difftune.search.space.spec import Space
from difftune.trainables.cache import throughput
from difftune.trainables.cache.policy import usage
from difftune.trainables.cache.store import Store
from difftune.trainables.model.cost import activation_bytes_per_image, unet_costs

logger = logging.getLogger(__name__)

__all__ = ["DataSize", "Plan", "PlanError", "data_size", "extraction", "make_plan",
           "resolve_budget"]

#: ImageNet-1k's val/ folder (the test split) has 50 images per class: the default for a
#: stand-in dataset
TEST_PER_CLASS = 50


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
    unet_image_passes_paper_bound: int
    early_stopping: dict[str, Any]
    expected_epochs: float
    gflops_per_image: float
    trial_gflops_per_image: float
    trial_passes_per_image: float
    activation_bytes_per_image: int
    precision: str
    weights_bytes: int
    img_per_s: float
    img_per_s_source: str
    gflops_per_s: float
    gpu_hours: float
    gpu_hours_paper: float
    gpu_hours_paper_bound: float
    policies: dict[str, dict[str, Any]]
    test: dict[str, Any]
    confirm: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    #: head training (GFLOPs per image of a head's forward; GPU-hours: the search's, the
    #: paper's way's), at the same FLOP rate
    head_gflops_per_image: float = 0.0
    head_gpu_hours: float = 0.0
    head_gpu_hours_paper: float = 0.0
    #: rungs over images (None without ``image_rungs``): :func:`rung_table`
    rungs: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: policy, cache bound against the budget, passes, GPU-hours."""
        budget = (" (no budget)" if self.budget_bytes is None else
                  f" of a {format_size(self.budget_bytes)} budget ({self.budget_source})")
        cache = ("nothing cached" if self.policy == "none" else
                 f"{self.policy} cache policy, cache <= {format_size(self.cache_bytes_bound)}"
                 + budget + (", least recently used entries evicted" if self.evicts else ""))
        ratio = self.gpu_hours_paper / max(self.gpu_hours, 1e-12)
        rungs = "" if not self.rungs else (
            " over image rungs " + ", ".join(f"{f:g}" for f in self.rungs["fractions"])
            + (" and the probe rung" if self.rungs["probe"] else "")
            + f" ({self.rungs['single']['gpu_hours']:.3g} without)")
        return (f"plan: {cache}; {self.unet_image_passes:,} U-Net image-passes, "
                f"{self.gpu_hours:.3g} GPU-hours{rungs} ({self.gpu_hours_paper:.3g} the "
                f"paper's way, {ratio:.3g}x, at {self.expected_epochs:.3g} expected epochs of "
                f"{self.epochs}), head training {self.head_gpu_hours:.3g}, at "
                f"{self.gflops_per_s / 1000:.3g} TFLOP/s effective; "
                f"test apart: {self.test['image_passes']:,} image-passes; "
                f"{self.gflops_per_image:.4g} GFLOPs and "
                f"{format_size(self.activation_bytes_per_image)} of activations per image "
                f"to block {self.deepest_block}")




# ------------------------------------------------------------------------------ inputs


def data_size(space: Space, *, images: int | None = None, classes: int | None = None,
              test_images: int | None = None) -> DataSize:
    """Images per split, by the splits' rule (:mod:`difftune.trainables.data.splits`):
    ``--images``/``--classes`` stand for ImageNet's layout (``train/`` holds ``images``,
    ``val/`` ``test_images``, default 50 per class, and there is no ``test/``), so ``val``
    (selection) is the space's ``holdout`` of ``train/`` and ``test`` is ``val/``; a data
    folder (or digits) is counted without reading an image."""
    from difftune.trainables.data.datasets import check_data, class_counts

    holdout = space.setting("holdout")  # val: a holdout of train/ without a test/ folder
    if images is not None or classes is not None or test_images is not None:
        if not images or not classes or images < 1 or classes < 1:
            raise PlanError("--images and --classes go together, both positive integers "
                            "(e.g. --images 1281167 --classes 1000 for ImageNet-1k; "
                            "--test-images with them)")
        if images < 2 * classes:
            raise PlanError(f"--images {images} is under 2 per class of --classes {classes}: "
                            "the selection split is a holdout of train/ and needs 2 per class")
        test = test_images if test_images is not None else TEST_PER_CLASS * classes
        data = DataSize.folder_layout(images, classes, test=test, holdout=holdout,
                                      source="")
        return dataclasses.replace(data, source=(
            f"--images {images} --classes {classes}: train/ less a {holdout:g} holdout "
            f"({data.train_all:,} train + {data.val:,} val), val/ as test ({test:,})"))
    check_data(space.data)
    train, val, test = (class_counts(space.data, split, holdout=holdout)
                        for split in ("train", "val", "test"))
    return DataSize(train_all=sum(train), val=sum(val), classes=len(train), source=space.data,
                    per_class=tuple(train), test=sum(test), holdout=holdout,
                    val_per_class=tuple(val))


def resolve_budget(cli: str | None, space: Space, cache: str | None
                   ) -> tuple[int | None, str, bool]:
    """``(bytes or None, where it came from, explicit)``: ``--cache-budget``, else the
    space's ``cache_budget``, else the free space of a local cache's filesystem; unlimited
    for an object store or without a cache."""
    if cli is not None:
        budget = parse_size(cli, what="--cache-budget")
        warn_over_disk(budget, "--cache-budget", cache)
        return budget, "--cache-budget", True
    if space.search.get("cache_budget") is not None:
        budget = parse_size(space.search["cache_budget"], what="search.cache_budget")
        warn_over_disk(budget, "search.cache_budget", cache)
        return budget, "search.cache_budget", True
    if not cache or "://" in cache:
        return None, "unlimited (object store)" if cache else "no cache", False
    folder = _existing_folder(cache)
    return shutil.disk_usage(folder).free, f"free space of {folder}", False


def _existing_folder(cache: str) -> str:
    folder = os.path.abspath(cache)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return folder


def warn_over_disk(budget: int, setting: str, cache: str | None) -> bool:
    """Warn (and return True) when a given budget exceeds what a local cache's disk can
    hold (its free space plus what the cache holds already): the disk would fill before
    the budget evicts anything, and a full disk stops the search."""
    if not cache or "://" in cache:
        return False
    folder = _existing_folder(cache)
    free = shutil.disk_usage(folder).free
    room = free
    if os.path.isdir(cache):
        room += usage(Store(cache))[0]
    if budget <= room:
        return False
    logger.warning("%s %s exceeds what the cache's disk can hold (%s: %s free plus what the "
                   "cache holds): the disk fills before the budget evicts, and a full disk "
                   "stops the search; give at most %s or --cache on a larger disk", setting,
                   format_size(budget), folder, format_size(free),
                   format_size(room))
    return True


def resolve_rate(flags: dict[str, Any], gflops: float, *, img_per_s: float | None,
                 cache: str | None, device: str | None) -> tuple[float, str, str | None]:
    """``(effective GFLOP/s, where it came from, precision measured)``: ``--img-per-s`` (to
    the deepest block, ``gflops`` per image), else what ``difftune extract`` measured for
    this architecture (and ``device`` kind) in the cache (img/s to the block it ran to, as
    GFLOP/s), else the documented default. Every pass is then priced at its own GFLOPs."""
    if img_per_s is not None:
        if img_per_s <= 0:
            raise PlanError(f"--img-per-s {img_per_s} must be positive")
        return img_per_s * gflops, f"--img-per-s {img_per_s:g} to block of {gflops:.4g} " \
            "GFLOPs", None
    rec = None
    if cache:
        try:
            rec = throughput.best_record(Store(cache), flags, device=device)
        except OSError:
            rec = None
    if rec:
        return (rec["gflops_per_s"],
                f"measured by difftune extract on {rec['device']} ({rec['precision']}, "
                f"{rec['measured']}: {rec['img_per_s']:.3g} img/s to block {rec['block']})",
                rec["precision"])
    return throughput.DEFAULT_GFLOPS_PER_S, (
        f"default: {throughput.DEFAULT_GFLOPS_PER_S / 1000:.0f} TFLOP/s effective "
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
    stopping = early_stopping(int(s["grace_period"]), float(s["reduction_factor"]), epochs)
    asks = space_asks(space, costs)
    lv = levers_of(space)
    heads = head_gflops(space, asks, costs, data.classes)
    rungs = functools.lru_cache(maxsize=None)(lambda fraction: rungs_of(
        space, data, label_fraction=fraction))
    kwargs = dict(trials=trials, epochs=epochs, budget=budget,
                  confirm_top=int(s.get("confirm_top") or 0),
                  confirm_fraction=s.get("confirm_label_fraction"), cached=cached,
                  expected_epochs=stopping.expected_epochs, head_gflops=heads)
    run = plan_fit.fitter(asks, costs, data, rungs=rungs, **kwargs)
    n = run(lv)
    deepest = max([*n.blocks, *asks.live_blocks], default=0)
    gflops = costs[deepest].gflops_to if deepest else 0.0
    rate, source, measured = resolve_rate(flags, gflops, img_per_s=img_per_s, cache=cache,
                                          device=device)
    table = None
    if rungs(lv.label_fraction) is not None:  # beside it: the same search without rungs
        single = plan_fit.fitter(asks, costs, data, rungs=lambda _: None, **kwargs)(lv)
        table = rung_table(n, single, rungs(lv.label_fraction), rate,
                           deepest=max(n.blocks, default=0))
    precision = precision or measured or "bf16"
    changes = [] if n.fits else plan_fit.changes_that_fit(
        lv, run, top_pool=max((p for c in asks.combos for _, _, p in c), default=None))
    k = min(int(s.get("confirm_top") or 0), trials)
    rows = n.layout["rows"]
    policies = {name: {**o, "gpu_hours": gflop_hours(o["gflops"], rate)}
                for name, o in n.policies.items()}
    return Plan(
        space=space.name, model=space.model,
        data={"source": data.source, "train_images": data.train_all, "val_images": data.val,
              "test_images": data.test, "holdout": data.holdout,
              "classes": data.classes, "train_rows": rows["train"], "val_rows": rows["val"],
              "train_views": n.layout["views"]},
        trials=trials, epochs=epochs, max_concurrent=lv.max_concurrent,
        label_fraction=lv.label_fraction, timesteps=n.timesteps, blocks=n.blocks,
        deepest_block=deepest, policy=n.policy, policy_requested=lv.policy, fits=n.fits,
        budget_bytes=budget, budget_source=budget_source, cache_bytes_bound=n.bound,
        cache_bytes_unevicted=n.unevicted, working_set_bytes=n.working, evicts=n.evicts,
        store_pool=n.store_pool, unet_image_passes=n.passes,
        unet_image_passes_paper=n.passes_paper,
        unet_image_passes_paper_bound=n.passes_paper_bound,
        early_stopping=stopping.to_dict(), expected_epochs=stopping.expected_epochs,
        gflops_per_image=gflops, trial_gflops_per_image=n.trial.gflops,
        trial_passes_per_image=n.trial.passes,
        activation_bytes_per_image=activation_bytes_per_image(
            flags, deepest, precision=precision)[0] if deepest else 0,
        precision=precision, weights_bytes=weights_bytes(flags),
        img_per_s=rate / max(gflops, 1e-9), img_per_s_source=source, gflops_per_s=rate,
        gpu_hours=gflop_hours(n.gflops, rate), gpu_hours_paper=gflop_hours(n.gflops_paper, rate),
        gpu_hours_paper_bound=gflop_hours(n.gflops_paper_bound, rate), policies=policies,
        test={"images": data.test, "evaluations": n.test_evaluations,
              "image_passes": n.test_passes, "gpu_hours": gflop_hours(n.test_gflops, rate)},
        confirm={"top": k, "label_fraction": s.get("confirm_label_fraction"),
                 "train_rows": rows["confirm"] or (rows["train"] if k else 0)},
        entries=entries(n, costs), changes=changes, head_gflops_per_image=heads,
        head_gpu_hours=gflop_hours(n.head_gflops, rate),
        head_gpu_hours_paper=gflop_hours(n.head_gflops_paper, rate), rungs=table)



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
    at_once = (f"the {plan.max_concurrent} holding the most, at the rungs they reach"
               if plan.rungs else f"{plan.max_concurrent} x the largest trial")
    what = (f"the trials running at once need {format_size(need)} of cache ({at_once})"
            if plan.policy == "per-request" else f"the cache needs {format_size(need)}")
    fix = ("; changes that fit: " + "; ".join(plan.changes)) if plan.changes else \
        ("; no smaller label fraction, fewer timesteps, smaller cache_pool or fewer trials "
         "at once fits: raise the budget")
    return (f"{what} (policy {plan.policy}) but the cache budget is "
            f"{format_size(plan.budget_bytes or 0)} ({plan.budget_source}){fix}")


def refuse_if_over(plan: Plan) -> None:
    """Raise :class:`PlanError` (exit code 2) with :func:`refusal` when the plan does not fit."""
    if not plan.fits:
        raise PlanError(refusal(plan))
