"""``difftune extract``: pre-warm the feature cache so that trials only read features."""

from __future__ import annotations

import argparse
import logging

from difftune.search.cli.args import fraction, integer
from difftune.search.records.uris import redact
from difftune.trainables.errors import UserError

logger = logging.getLogger(__name__)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UserError(f"--{what} needs at least one value")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="extract U-Net features into the feature cache ahead of a search",
        description="Run the frozen U-Net once over a dataset at the given timesteps and store "
        "the given blocks (pooled) in the feature cache; trials then read them instead of "
        "running the U-Net. Entries already stored are reused. On a GPU the U-Net runs under "
        "bf16 autocast (fp16 where bf16 is missing; the precision is part of each entry's key) "
        "and the batch is as large as the GPU's free memory allows; the rate measured is "
        "recorded in the cache for `difftune plan`.",
    )
    p.add_argument("--space", help="extract everything this search space's plan foresees (its "
                   "timesteps x its block set at its cache_pool, train and val), sharded over "
                   "the Ray cluster's workers (--address) with a progress bar; without a "
                   "cluster, in this process. Replaces --timesteps/--blocks/--pool")
    p.add_argument("--address", help="Ray cluster to shard over with --space (HOST:6379, or "
                   "'auto'); each shard is a Ray task on one GPU, or on one node's CPUs")
    p.add_argument("--cache-budget", metavar="SIZE", help="with --space: the cache budget the "
                   "search will have (decides its cache policy, as `difftune plan`)")
    p.add_argument("--model", help="paper256, demo or a checkpoint path (with --space: "
                   "overrides the space's)")
    p.add_argument("--checkpoint", help="weights for a preset model (paper256)")
    p.add_argument("--data", help="digits or an ImageFolder root (with --space: overrides the "
                   "space's)")
    p.add_argument("--timesteps", help="comma-separated diffusion steps, e.g. 90,150")
    p.add_argument("--blocks", help="comma-separated block numbers, e.g. 19,24")
    p.add_argument("--pool", type=integer(1), help="pool size stored (p x p)")
    p.add_argument("--cache", help="cache folder or URI (default: $DIFFTUNE_CACHE or "
                   "./difftune_cache)")
    p.add_argument("--batch", "--batch-size", dest="batch_size", type=integer(1),
                   help="images per U-Net forward pass (default: as many as fit the device's "
                   "free memory, from the activation bytes per image; at most 256)")
    p.add_argument("--seed", type=integer(0), default=0, help="noise seed")
    p.add_argument("--splits", default="train,val,test",
                   help="comma-separated splits: train (fits heads), val (selects), test "
                   "(evaluated once, after a search)")
    p.add_argument("--views", type=integer(1), default=1,
                   help="views of every train image (a space's views setting: view 0 is the "
                   "image itself, the others seeded crops + flips with their own noise)")
    p.add_argument("--holdout", type=fraction, default=0.1,
                   help="share of an ImageFolder's train/ held out as the val split (when "
                   "there is no test/ folder)")
    p.add_argument("--label-fraction", help="keep this fraction of the training labels "
                   "(subset seed 0), or a file listing the images to keep")
    p.add_argument("--device", default="cpu", help="torch device for the U-Net")
    p.add_argument("--channels-last", action="store_true",
                   help="run the U-Net's convolutions on NHWC tensors (GPU only)")
    p.add_argument("--data-hash", choices=("size", "content"), default="size",
                   help="fingerprint the data files by relative path and size, or by their "
                   "bytes too (use what the search uses)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.space:
        return run_space(args)
    return run_entries(args)


def run_entries(args: argparse.Namespace) -> int:
    # torch only once an extraction runs (not for `difftune --help`)
    from difftune.search.run.prewarm import extract_entries
    from difftune.trainables.data.datasets import SPLITS

    for name in ("model", "data", "timesteps", "blocks", "pool"):
        if getattr(args, name) is None:
            raise UserError(f"--{name} is required (or give --space to extract what a search "
                            "space's plan foresees)")
    timesteps = _ints(args.timesteps, "timesteps")
    blocks = _ints(args.blocks, "blocks")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise UserError(f"--splits {args.splits!r} is invalid; allowed: {','.join(SPLITS)}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UserError(f"--batch must be positive, got {args.batch_size}")
    cache = extract_entries(model=args.model, checkpoint=args.checkpoint, data=args.data,
                            timesteps=timesteps, blocks=blocks, pool=args.pool, splits=splits,
                            cache=args.cache, batch_size=args.batch_size, seed=args.seed,
                            views=args.views, holdout=args.holdout,
                            label_fraction=args.label_fraction, device=args.device,
                            channels_last=args.channels_last, data_hash=args.data_hash)
    s = cache.stats
    rate = f", {s.timed_images / s.forward_seconds:.3g} img/s ({cache.precision})" \
        if s.forward_seconds > 0 else ""
    print(f"extract: {s.forward_batches} U-Net forward batches ({s.forward_images} images"
          f"{rate}); entries reused {s.entries_reused}, written {s.entries_written} in "
          f"{redact(cache.root)}")
    return 0


def run_space(args: argparse.Namespace) -> int:
    """``--space``: the plan's entries, sharded over the cluster's workers."""
    from difftune.search.run.prewarm import extract_space  # torch, Ray: not for --help

    for name in ("timesteps", "blocks", "pool", "label_fraction"):
        if getattr(args, name) is not None:
            raise UserError(f"--{name.replace('_', '-')} does not go with --space (the space "
                            "decides what is extracted)")
    plan, counts = extract_space(args.space, model=args.model, checkpoint=args.checkpoint,
                                 data=args.data, cache=args.cache,
                                 cache_budget=args.cache_budget, address=args.address,
                                 data_hash=args.data_hash, batch_size=args.batch_size,
                                 echo=lambda line: print(line, flush=True))
    rate = counts["images"] / counts["wall_s"] if counts["wall_s"] else 0.0
    print(f"extract: {counts['images']} images through the U-Net at {len(plan.timesteps)} "
          f"timesteps in {counts['wall_s']:.1f} s ({rate:.3g} img/s, {counts['shards']} "
          f"shard(s), {counts['precision']}); entries written {counts['written']}, reused "
          f"{counts['reused']} in {redact(counts['root'])}")
    return 0
