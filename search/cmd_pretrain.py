"""``difftune pretrain``: train the small demo U-Net (or another small U-Net) on a dataset."""

from __future__ import annotations

import argparse
import logging

from difftune.search.argtypes import integer, number

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train a small unconditional guided-diffusion U-Net (the demo model)",
        description="Train a small unconditional guided-diffusion U-Net with guided-diffusion's "
        "own training_losses and save its EMA weights (PATH) and flags (PATH with .yaml).",
    )
    p.add_argument("--data", default="digits", help="digits or an ImageFolder root")
    p.add_argument("--out", required=True, help="where to write the checkpoint (.pt)")
    p.add_argument("--minutes", type=number(0), help="train for this many minutes")
    p.add_argument("--steps", type=integer(1), help="train for this many steps")
    p.add_argument("--batch-size", type=integer(1), default=64, help="images per step")
    p.add_argument("--lr", type=number(0), default=1e-3, help="learning rate")
    p.add_argument("--seed", type=integer(0), default=0, help="random seed")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from difftune.trainables.errors import UserError
    from difftune.trainables.pretrain import pretrain

    if args.minutes is None and args.steps is None:
        raise UserError("give --minutes M or --steps S")
    summary = pretrain(data=args.data, out=args.out, minutes=args.minutes, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    logger.info("wrote %s and %s (%d steps, %d parameters)", summary["out"], summary["flags"],
                summary["steps"], summary["params"])
    return 0
