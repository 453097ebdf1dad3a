"""``difftune probe``: linear-probe accuracy over a small block x timestep grid — the quickest
way to see the paper's effect (features peak at middle blocks and small t)."""

from __future__ import annotations

import argparse
import logging

from difftune.search.argtypes import fraction, int_list, integer, number

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from difftune.trainables.probe import probe_grid
    from difftune.trainables.unet import load_unet

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
