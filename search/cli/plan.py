"""``difftune plan``: what a search will cost, before anything runs."""

from __future__ import annotations

import argparse
import json
import logging

from difftune.search.cli.args import integer, number, rungs

logger = logging.getLogger(__name__)


#: flags of ``difftune search`` that change nothing in a plan: accepted, so that a search's
#: command line with ``plan`` in place of ``search`` prints its plan
SEARCH_ONLY = {
    "--experiment": {}, "--model-name": {}, "--tracking-uri": {},
    "--artifact-location": {}, "--address": {}, "--storage": {},
    "--data-hash": {"choices": ("size", "content")}, "--resume": {"metavar": "EXPERIMENT"},
    "--optuna-storage": {"metavar": "URL"}, "--top": {"type": integer(1)},
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="what a search will cost: U-Net passes, GPU-hours, cache bytes against a budget",
        description="Plan a search without running it: the timesteps and blocks its space can "
        "ask for, the U-Net image-passes and GPU-hours with the feature cache and the paper's "
        "way (the U-Net rerun on every batch of every epoch, to the trial's own block), both "
        "at the epochs the space's early stopping (ASHA) lets a trial run in expectation, "
        "with the every-epoch bound beside them; GFLOPs and activation bytes per image, every "
        "cache entry the chosen policy can write (t, block, pool, dtype, bytes) and their "
        "bound, the policy (of those that fit the budget, the one of fewer GPU-hours), and "
        "the test evaluations apart. Needs neither the checkpoint nor the data: "
        "--images/--classes stand in for a dataset that is not on this machine. Takes a "
        "search's command line: `difftune plan ARGS` plans `difftune search ARGS`. Exits 2 "
        "with the cheapest changes that fit when the cache would exceed the budget.",
    )
    p.add_argument("--space", default="demo",
                   help="a preset (demo, demo_grid, demo_cost, linear, attention, difformer, "
                   "diffeed) or a YAML file")
    p.add_argument("--model", help="override the space's model: demo, paper256 or a checkpoint "
                   "path (only its flags are read)")
    p.add_argument("--checkpoint", help="weights for a preset model: only the model's flags "
                   "count, the file is not read")
    p.add_argument("--data", help="override the space's data: digits or an ImageFolder root "
                   "(images are counted, not read)")
    p.add_argument("--images", type=integer(1), help="images in train/ of a dataset not on "
                   "this machine, with ImageNet's layout (with --classes; e.g. 1281167 for "
                   "ImageNet-1k): the selection split is the space's holdout of them")
    p.add_argument("--classes", type=integer(1), help="classes of that dataset (e.g. 1000)")
    p.add_argument("--test-images", "--val-images", dest="test_images", type=integer(0),
                   help="images in val/ of that dataset: the test split (default: 50 per "
                   "class, as ImageNet-1k's 50,000)")
    p.add_argument("--trials", type=integer(1), help="number of trials (default: the space's)")
    p.add_argument("--seed", type=integer(0), help="Optuna sampler seed (default: the space's)")
    p.add_argument("--image-rungs", type=rungs, metavar="FRACTIONS",
                   help="rungs over images to price, e.g. 0.02,0.1,0.5,1, or off (default: "
                   "the space's search.image_rungs)")
    p.add_argument("--max-concurrent", type=integer(1),
                   help="trials running at once: the per-request policy's working set "
                   "(default: the space's)")
    p.add_argument("--gpus-per-trial", type=number(0, open_low=False),
                   help="GPUs per trial: with --max-concurrent, the GPUs the trials hold at "
                   "once and so their least wall hours (default: the space's)")
    p.add_argument("--cpus-per-trial", type=number(0), help="CPUs per trial (default: the "
                   "space's; does not change the plan)")
    p.add_argument("--cache", help="feature cache folder or URI: its disk's free space is "
                   "the budget unless one is given, its recorded throughput the rate "
                   "(default: ./difftune_cache, or $DIFFTUNE_CACHE)")
    p.add_argument("--no-cache", action="store_true",
                   help="plan the paper's behaviour: the U-Net rerun on every batch of every "
                   "epoch, nothing cached")
    p.add_argument("--cache-budget", metavar="SIZE",
                   help="bytes the cache may hold, e.g. 500GB, 2TB, 1.5TiB (default: the "
                   "space's cache_budget, else the free space of a local cache; unlimited on "
                   "an object store)")
    p.add_argument("--img-per-s", type=number(0), help="U-Net image-passes per second to "
                   "the deepest block, converted to a FLOP rate that prices every pass at its "
                   "own block (default: what difftune extract measured for this model, "
                   "recorded in the cache, else 40 TFLOP/s effective)")
    p.add_argument("--device-kind", help="use the throughput recorded on a device whose name "
                   "contains this (e.g. A10G, T4, cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="precision of the extraction for the activation bytes (default: the "
                   "recorded throughput's, else bf16)")
    p.add_argument("--set", dest="pins", action="append", default=[], metavar="NAME=VALUE",
                   help="pin a setting of the space, e.g. --set label_fraction=0.1")
    p.add_argument("--gpus", type=integer(1), default=1,
                   help="GPUs the extraction before the first trial is sharded over "
                   "(`difftune extract --space`): its wall hours are its GPU-hours / GPUS")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    for flag, kwargs in SEARCH_ONLY.items():
        p.add_argument(flag, help="a flag of difftune search, accepted here so that a "
                       "search's command line plans as it is; it does not change the plan",
                       **kwargs)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from difftune.search.plan.estimate import (
        PlanError,
        data_size,
        extraction,
        make_plan,
        refusal,
        resolve_budget,
    )
    from difftune.search.space.spec import load_space, parse_set
    from difftune.trainables.cache.feature_cache import default_root

    if args.data and (args.images or args.classes or args.test_images is not None):
        raise PlanError("give either --data or --images/--classes, not both")
    space = load_space(args.space, model=args.model, checkpoint=args.checkpoint,
                       data=args.data, overrides=parse_set(args.pins),
                       search_overrides={"trials": args.trials, "seed": args.seed,
                                         "gpus_per_trial": args.gpus_per_trial,
                                         "cpus_per_trial": args.cpus_per_trial,
                                         "max_concurrent": args.max_concurrent,
                                         "image_rungs": args.image_rungs})
    cache = None if args.no_cache else (args.cache or default_root())
    budget, source, _ = resolve_budget(args.cache_budget, space, cache)
    data = data_size(space, images=args.images, classes=args.classes,
                     test_images=args.test_images)
    plan = make_plan(space, data, budget=budget, budget_source=source,
                     img_per_s=args.img_per_s, cache=args.cache or default_root(),
                     cached=cache is not None, precision=args.precision,
                     device=args.device_kind)
    ahead = extraction(plan, args.gpus)
    trials = trial_hours(plan, space.search.get("gpus_per_trial"))
    if args.json:
        print(json.dumps({**plan.to_dict(), "extraction": ahead, "trial_gpus": trials}))
    else:
        print(render(plan))
        if trials:
            print(f"  the trials hold {trials['gpus_at_once']:g} GPU(s) at once "
                  f"({plan.max_concurrent} x {trials['gpus_per_trial']:g}): at least "
                  f"{trials['wall_hours_min']:,.4g} wall hours of U-Net passes")
        if ahead:
            print(f"  extraction first (block-set: one pass per image and timestep): "
                  f"{ahead['image_passes']:,} image-passes, {ahead['gpu_hours']:,.4g} "
                  f"GPU-hours: {ahead['wall_hours']:,.4g} wall hours sharded over "
                  f"{ahead['gpus']} GPU(s) (`difftune extract --space`)"
                  + ("" if ahead["worth_it"] else "; more than the trials can ask, so "
                     "`difftune search` leaves extraction to its trials"))
    if not plan.fits:
        raise PlanError(refusal(plan))
    return 0


def trial_hours(plan, gpus_per_trial) -> dict | None:
    """GPUs the trials hold at once (``max_concurrent`` x ``gpus_per_trial``) and so the
    least wall hours of the plan's U-Net passes; None without a GPU share."""
    if not gpus_per_trial:
        return None
    at_once = plan.max_concurrent * float(gpus_per_trial)
    return {"gpus_per_trial": float(gpus_per_trial), "gpus_at_once": at_once,
            "wall_hours_min": plan.gpu_hours / at_once}


def _listing(values: list[int]) -> str:
    if len(values) > 8:
        return f"{', '.join(map(str, values[:3]))}, ..., {', '.join(map(str, values[-2:]))}"
    return ", ".join(map(str, values))


def render(plan) -> str:
    """The plan as a few readable lines."""
    from difftune.search.space.sizes import format_size

    d = plan.data
    frac = "all labels" if plan.label_fraction in (None, 1, 1.0) else \
        f"label_fraction {plan.label_fraction}"
    es = plan.early_stopping
    lines = [
        f"plan of space {plan.space} (model {plan.model}) on {d['source']}",
        f"  {plan.trials} trials x up to {plan.epochs} epochs, {plan.max_concurrent} at once; "
        f"{frac}: {d['train_rows']:,} train + {d['val_rows']:,} val images; "
        f"{d['test_images']:,} test images apart",
        f"  early stopping {es['scheduler']} (grace {es['grace_period']}, reduction "
        f"{es['reduction_factor']:g}): {es['formula']} expected epochs per trial, "
        + ("both ways" if not plan.rungs else "the paper's way and the search without rungs "
           "(with rungs: every epoch at each rung a trial reaches)"),
        f"  timesteps ({len(plan.timesteps)}): {_listing(plan.timesteps)}",
        f"  blocks ({len(plan.blocks)}): {_listing(plan.blocks)}; to block {plan.deepest_block}"
        f" an image costs {plan.gflops_per_image:.4g} GFLOPs and "
        f"{format_size(plan.activation_bytes_per_image)} of activations ({plan.precision}); "
        f"weights {format_size(plan.weights_bytes)}; a trial's own passes: "
        f"{plan.trial_passes_per_image:.3g} per image, {plan.trial_gflops_per_image:.4g} GFLOPs "
        "(mean over the space)",
    ]
    if plan.policy == "none":
        lines.append("  nothing cached (--no-cache, or only heads that run the U-Net themselves): "
                     "the U-Net reruns on every batch of every epoch")
    else:
        budget = "unlimited" if plan.budget_bytes is None else \
            f"{format_size(plan.budget_bytes)} ({plan.budget_source})"
        lines.append(f"  cache policy {plan.policy} (asked: {plan.policy_requested}); "
                     f"budget {budget}")
        lines.append("  policies: " + "; ".join(
            f"{name} {o['gpu_hours']:,.4g} GPU-hours, {o['image_passes']:,} image-passes, "
            f"cache {format_size(o['cache_bytes'])}"
            + ("" if o["fits"] else " (does not fit)")
            for name, o in plan.policies.items()))
        largest = sorted(plan.entries, key=lambda e: -e["bytes"])[:3]
        lines.append(f"  {len(plan.entries):,} cache entries can be written (largest: "
                     + "; ".join(f"t {e['t']} block {e['block']} pool {e['pool']} {e['split']} "
                                 f"{format_size(e['bytes'])}" for e in largest) + ")")
        bound = f"  cache bound {format_size(plan.cache_bytes_bound)}"
        if plan.policy == "per-request":
            bound += (f" ({format_size(plan.cache_bytes_unevicted)} without eviction); the "
                      f"trials running at once need {format_size(plan.working_set_bytes)}")
        lines.append(bound)
    if plan.confirm["top"]:
        lines.append(f"  confirm: the top {plan.confirm['top']} retrained on "
                     f"{plan.confirm['train_rows']:,} train images")
    ratio = plan.gpu_hours_paper / max(plan.gpu_hours, 1e-12)
    lines += [
        f"  U-Net image-passes: {plan.unet_image_passes:,} (the paper's way: "
        f"{plan.unet_image_passes_paper:,} at {plan.expected_epochs:.3g} expected epochs, "
        f"{plan.unet_image_passes_paper_bound:,} at every epoch)",
        f"  GPU-hours: {plan.gpu_hours:,.4g} (the paper's way: {plan.gpu_hours_paper:,.4g}, "
        f"{ratio:.3g}x; {plan.gpu_hours_paper_bound:,.4g} at every epoch) at "
        f"{plan.gflops_per_s / 1000:.3g} TFLOP/s effective, each pass at its own block's "
        f"GFLOPs ({plan.img_per_s:.3g} img/s to block {plan.deepest_block}; "
        f"{plan.img_per_s_source})",
        f"  head training: {plan.head_gpu_hours:,.3g} GPU-hours (the paper's way: "
        f"{plan.head_gpu_hours_paper:,.3g}), {plan.head_gflops_per_image:.3g} GFLOPs per "
        "image forward (mean over the space), 3 per train image and 1 per val image each "
        "epoch, at the same rate",
        f"  test, apart (the champion and each confirmed config, once): "
        f"{plan.test['evaluations']} x {plan.test['images']:,} images, "
        f"{plan.test['image_passes']:,} image-passes, {plan.test['gpu_hours']:,.4g} GPU-hours",
    ]
    if plan.rungs:
        lines += render_rungs(plan)
    return "\n".join(lines)


def _n(x: float) -> str:
    return f"{x / 1e6:.3g} M" if x >= 1e6 else f"{x:,.0f}"


def render_rungs(plan) -> list[str]:
    """The rungs over images: one row per rung (and the probe rung), the totals beside the
    search without rungs and the paper's way."""
    from difftune.search.space.sizes import format_size

    r = plan.rungs
    head = (f"  image rungs {', '.join(f'{f:g}' for f in r['fractions'])} (at least "
            f"{r['floor']} images per class; ASHA on rung_budget: grace 1, 1/"
            f"{r['reduction_factor']:g} go on, max_t {r['max_t']}; a trial trains from "
            f"scratch for {plan.epochs} epochs at each rung it reaches):")
    cols = "    {:<6} {:>8} {:>7} {:>11} {:>9} {:>12} {:>13} {:>10} {:>8}"
    lines = [head, cols.format("rung", "fraction", "trials", "train", "val",
                               "U-Net passes", "cache added", "GPU-hours", "heads")]
    if r["probe"]:
        p = r["probe"]
        lines.append(cols.format("probe", f"{r['fractions'][0]:g}", "-",
                                 f"{p['train_rows']:,}", f"{p['val_rows']:,}",
                                 _n(p["image_passes"]), "in rung 0", f"{p['gpu_hours']:.3g}",
                                 "-"))
    for row in r["rows"]:
        lines.append(cols.format(row["rung"], f"{row['fraction']:g}", f"{row['trials']:.3g}",
                                 f"{row['train_rows']:,}", f"{row['val_rows']:,}",
                                 _n(row["image_passes"]), format_size(row["cache_bytes"]),
                                 f"{row['gpu_hours']:.3g}", f"{row['head_gpu_hours']:.3g}"))
    if r["confirm"]["image_passes"] > 0:
        c = r["confirm"]
        lines.append(cols.format("confirm", "1", "", "", "", _n(c["image_passes"]), "",
                                 f"{c['gpu_hours']:.3g}", ""))
    t = r["total"]
    lines.append(cols.format("total", "", "", "", "", _n(t["image_passes"]),
                             format_size(t["cache_bytes"]), f"{t['gpu_hours']:.3g}",
                             f"{t['head_gpu_hours']:.3g}"))
    ours = plan.gpu_hours + plan.head_gpu_hours
    one, pr = r["single"], r["paper_rungs"]
    others = [("without rungs", one["gpu_hours"] + one["head_gpu_hours"],
               f" ({one['policy']}, {_n(one['image_passes'])} passes)"),
              ("the paper's way", plan.gpu_hours_paper + plan.head_gpu_hours_paper, ""),
              ("the paper's way on the same rungs", pr["gpu_hours"] + pr["head_gpu_hours"], "")]
    lines.append(f"  with rungs: {ours:,.4g} GPU-hours (U-Net and heads); " + "; ".join(
        f"{name}: {h:,.4g}{extra}, {h / max(ours, 1e-12):.3g}x" for name, h, extra in others))
    return lines
