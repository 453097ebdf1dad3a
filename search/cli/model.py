"""The model's own commands: ``difftune pretrain`` trains the small demo U-Net (or another
small U-Net) on a dataset; ``difftune probe`` prints linear-probe accuracy over a small
block x timestep grid, the quickest way to see the paper's effect (features peak at middle
blocks and small t)."""

from __future__ import annotations

import argparse
import logging

from difftune.search.cli.args import fraction, int_list, integer, number

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``pretrain`` and ``probe``."""
    _add_pretrain(sub)
    _add_probe(sub)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(run=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from difftune.trainables.errors import UserError
    from difftune.trainables.model.pretrain import pretrain

    if args.minutes is None and args.steps is None:
        raise UserError("give --minutes M or --steps S")
    summary = pretrain(data=args.data, out=args.out, minutes=args.minutes, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    logger.info("wrote %s and %s (%d steps, %d parameters)", summary["out"], summary["flags"],
                summary["steps"], summary["params"])
    return 0


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="linear-probe accuracy over a block x timestep grid",
        description="Extract features once per timestep for all grid blocks, train one linear "
        "head per (block, t) and print val top-1 as a table.",
    )
    p.add_argument("--model", default="demo", help="demo, paper256 or a checkpoint path")
    p.add_argument("--checkpoint", help="weights for a preset model")
    p.add_argument("--random-init", action="store_true", help="the same architecture untrained")
    p.add_argument("--data", default="digits", help="digits or an ImageFolder root")
    p.add_argument("--blocks", type=int_list, default="4,7,10,13,16",
                   help="comma-separated block numbers")
    p.add_argument("--timesteps", type=int_list, default="10,90,300",
                   help="comma-separated diffusion steps")
    p.add_argument("--pool", type=integer(1), default=2, help="pool size (p x p)")
    p.add_argument("--epochs", type=integer(1), default=10, help="epochs per probe")
    p.add_argument("--lr", type=number(0), default=0.05, help="learning rate")
    p.add_argument("--label-fraction", type=fraction, help="use a fraction of the train labels")
    p.set_defaults(run=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from difftune.trainables.model.unet import load_unet
    from difftune.trainables.train.probe import probe_grid

    unet = load_unet(args.model, checkpoint=args.checkpoint, random_init=args.random_init)
    grid = probe_grid(unet, data=args.data, blocks=args.blocks, timesteps=args.timesteps,
                      pools=[args.pool], epochs=args.epochs, lr=args.lr,
                      label_fraction=args.label_fraction, progress=True)
    grid = {(b, t): m["val_top1"] for (b, t, _), m in grid.items()}
    print(f"val top-1 (%) of a linear probe, pool {args.pool}, model {args.model}"
          + (" (random init)" if args.random_init else ""))
    print("block \\ t " + "".join(f"{t:>8}" for t in args.timesteps))
    for b in args.blocks:
        print(f"{b:>9} " + "".join(f"{grid[(b, t)]:8.1f}" for t in args.timesteps))
    best = max(grid, key=grid.get)
    print(f"best: block {best[0]}, t {best[1]}: {grid[best]:.1f}%")
    return 0
