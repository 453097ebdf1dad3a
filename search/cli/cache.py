"""``difftune cache ls|du|rm``: inspect and prune the feature cache."""

from __future__ import annotations

import argparse
import logging

from difftune.search.cli.args import Parser, integer

logger = logging.getLogger(__name__)


def human(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def add_parser(sub: argparse._SubParsersAction) -> None:
    common = Parser(add_help=False)
    common.add_argument("--cache", help="cache folder or URI (default: $DIFFTUNE_CACHE or "
                        "./difftune_cache)")
    p = sub.add_parser("cache", help="list, size or remove feature cache entries",
                       description="Inspect and prune the feature cache.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("ls", parents=[common], help="list entries (model, data, t, block, pool, "
                       "size)")
    actions.add_parser("du", parents=[common], help="total size of the cache")
    rm = actions.add_parser("rm", parents=[common], help="remove entries matching filters",
                            description="Remove entries matching every filter given; --all "
                            "empties the cache folder (everything under it).")
    rm.add_argument("--all", action="store_true", help="remove everything")
    rm.add_argument("--model", help="a model name or a model fingerprint prefix")
    rm.add_argument("--t", type=integer(0), help="a timestep")
    rm.add_argument("--block", type=integer(1), help="a block number")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from difftune.search.records.uris import redact
    from difftune.trainables.cache import admin as cache
    from difftune.trainables.cache.feature_cache import default_root
    from difftune.trainables.errors import UserError

    root = args.cache or default_root()
    if args.action == "ls":
        entries = cache.list_entries(root)
        if entries:
            print(f"{'model':<14} {'model_fp':<16} {'data':<14} {'split':<5} {'t':>4} "
                  f"{'seed':>4} {'block':>5} {'pool':>4} {'rows':>8} {'size':>10} {'prec':>4}"
                  "  created")
        for e in entries:
            print(f"{e['model'][-14:]:<14} {e['model_fp']:<16} {e['data'][-14:]:<14} "
                  f"{e['split']:<5} {e['t']:>4} {e['seed']:>4} {e['block']:>5} {e['pool']:>4} "
                  f"{e['rows']:>8} {human(e['bytes'] or 0):>10} {e['precision']:>4}"
                  f"  {e['created']}")
        print(f"{len(entries)} entries, {human(sum(e['bytes'] or 0 for e in entries))} in {redact(root)}")
    elif args.action == "du":
        print(f"{human(cache.total_bytes(root))} in {redact(root)}")
    else:
        if not (args.all or args.model or args.t is not None or args.block is not None):
            raise UserError("cache rm needs --all or at least one of --model, --t, --block")
        n = cache.remove(root, all=args.all, model=args.model, t=args.t, block=args.block)
        print(f"removed {n} entries from {redact(root)}")
    return 0
