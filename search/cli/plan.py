"""``difftune plan``: what a search will cost, before anything runs."""

from __future__ import annotations

import argparse
import json
import logging

from difftune.search.cli.args import integer, number

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="what a search will cost: U-Net passes, GPU-hours, cache bytes against a budget",
        description="Plan a search without running it: the timesteps and blocks its space can "
        "ask for, the U-Net image-passes with the feature cache and the paper's way (the "
        "U-Net rerun on every batch of every epoch), GFLOPs and activation bytes per image, "
        "every cache entry the chosen policy can write (t, block, pool, dtype, bytes) and "
        "their bound, the policy (block-set when it fits the budget, else per-request), and "
        "GPU-hours. Needs neither the checkpoint nor the data: --images/--classes stand in "
        "for a dataset that is not on this machine. Exits 2 with the cheapest changes that "
        "fit when the cache would exceed the budget.",
    )
    p.add_argument("--space", default="demo",
                   help="a preset (demo, linear, attention, difformer, diffeed) or a YAML file")
    p.add_argument("--model", help="override the space's model: demo, paper256 or a checkpoint "
                   "path (only its flags are read)")
    p.add_argument("--data", help="override the space's data: digits or an ImageFolder root "
                   "(images are counted, not read)")
    p.add_argument("--images", type=integer(1), help="train images of a dataset not on this machine "
                   "(with --classes; e.g. 1281167 for ImageNet-1k)")
    p.add_argument("--classes", type=integer(1), help="classes of that dataset (e.g. 1000)")
    p.add_argument("--val-images", type=integer(0),
                   help="val images of that dataset (default: 50 per class, as ImageNet-1k)")
    p.add_argument("--trials", type=integer(1), help="number of trials (default: the space's)")
    p.add_argument("--cache", help="feature cache folder or URI: its disk's free space is "
                   "the budget unless one is given, its recorded throughput the rate "
                   "(default: ./difftune_cache, or $DIFFTUNE_CACHE)")
    p.add_argument("--cache-budget", metavar="SIZE",
                   help="bytes the cache may hold, e.g. 500GB, 2TB, 1.5TiB (default: the "
                   "space's cache_budget, else the free space of a local cache; unlimited on "
                   "an object store)")
    p.add_argument("--img-per-s", type=number(0), help="U-Net image-passes per second to "
                   "the deepest block (default: what difftune extract measured for this model, "
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

    if args.data and (args.images or args.classes):
        raise PlanError("give either --data or --images/--classes, not both")
    space = load_space(args.space, model=args.model, data=args.data,
                       overrides=parse_set(args.pins))
    cache = args.cache or default_root()
    budget, source, _ = resolve_budget(args.cache_budget, space, cache)
    data = data_size(space, images=args.images, classes=args.classes,
                     val_images=args.val_images)
    plan = make_plan(space, data, trials=args.trials, budget=budget, budget_source=source,
                     img_per_s=args.img_per_s, cache=cache, precision=args.precision,
                     device=args.device_kind)
    ahead = extraction(plan, args.gpus)
    if args.json:
        print(json.dumps({**plan.to_dict(), "extraction": ahead}))
    else:
        print(render(plan))
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


def _listing(values: list[int]) -> str:
    if len(values) > 8:
        return f"{', '.join(map(str, values[:3]))}, ..., {', '.join(map(str, values[-2:]))}"
    return ", ".join(map(str, values))


def render(plan) -> str:
    """The plan as a few readable lines."""
    from difftune.search.plan.sizes import format_size

    d = plan.data
    frac = "all labels" if plan.label_fraction in (None, 1, 1.0) else \
        f"label_fraction {plan.label_fraction}"
    lines = [
        f"plan of space {plan.space} (model {plan.model}) on {d['source']}",
        f"  {plan.trials} trials x up to {plan.epochs} epochs, {plan.max_concurrent} at once; "
        f"{frac}: {d['train_rows']:,} train + {d['val_rows']:,} val images",
        f"  timesteps ({len(plan.timesteps)}): {_listing(plan.timesteps)}",
        f"  blocks ({len(plan.blocks)}): {_listing(plan.blocks)}; to block {plan.deepest_block}"
        f" an image costs {plan.gflops_per_image:.4g} GFLOPs and "
        f"{format_size(plan.activation_bytes_per_image)} of activations ({plan.precision}); "
        f"weights {format_size(plan.weights_bytes)}",
    ]
    if plan.policy == "none":
        lines.append("  nothing cached (--no-cache, or only heads that run the U-Net themselves): "
                     "the U-Net reruns on every batch of every epoch")
    else:
        budget = "unlimited" if plan.budget_bytes is None else \
            f"{format_size(plan.budget_bytes)} ({plan.budget_source})"
        lines.append(f"  cache policy {plan.policy} (asked: {plan.policy_requested}); "
                     f"budget {budget}")
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
    ratio = plan.unet_image_passes_paper / max(plan.unet_image_passes, 1)
    lines += [
        f"  U-Net image-passes: {plan.unet_image_passes:,} (the paper's way: "
        f"{plan.unet_image_passes_paper:,}, {ratio:.3g}x)",
        f"  GPU-hours: {plan.gpu_hours:,.4g} (the paper's way: {plan.gpu_hours_paper:,.4g}) at "
        f"{plan.img_per_s:.3g} img/s ({plan.img_per_s_source})",
    ]
    return "\n".join(lines)
