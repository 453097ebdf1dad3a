"""The demo U-Net is a real diffusion model: the val top-1 of ``difftune probe``'s linear probe
(:func:`difftune.trainables.train.probe.probe_grid`, the same recipe) on the demo U-Net's middle
block at a small t and pool 1, against the same architecture untrained (random weights,
seed 0). At pool 2 and above even random features of 16-px digits probe to about 90%
(guided-diffusion's blocks start as identities, so an untrained U-Net passes the image
through): pool 1 is where the trained features show.

    python -m benchmarks.demo_probe [--block 10] [--t 30] [--pool 1] [--epochs 10]
"""

from __future__ import annotations

import logging
import sys

import torch

from benchmarks._results import arguments, configure, record
from difftune.trainables.model.unet import load_unet, model_fingerprint
from difftune.trainables.train.probe import probe_grid

logger = logging.getLogger("demo_probe")


def probe(random_init: bool, *, block: int, t: int, pool: int, epochs: int, lr: float) -> float:
    """Val top-1 of the probe on the demo U-Net (trained, or untrained with seed 0)."""
    torch.manual_seed(0)
    unet = load_unet("demo", random_init=random_init)
    grid = probe_grid(unet, data="digits", blocks=[block], timesteps=[t], pools=[pool],
                      epochs=epochs, lr=lr)
    return grid[(block, t, pool)]["val_top1"]


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__spec__, __doc__)
    parser.add_argument("--block", type=int, default=10, help="the demo's middle block")
    parser.add_argument("--t", type=int, default=30)
    parser.add_argument("--pool", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10, help="difftune probe's default")
    parser.add_argument("--lr", type=float, default=0.05, help="difftune probe's default")
    args = parser.parse_args(argv)
    configure(verbose=True)
    settings = dict(block=args.block, t=args.t, pool=args.pool, epochs=args.epochs, lr=args.lr)
    trained = probe(False, **settings)
    logger.info("demo U-Net: val top-1 %.2f", trained)
    untrained = probe(True, **settings)
    logger.info("untrained: val top-1 %.2f", untrained)
    record("demo_probe", **settings, demo_fp=model_fingerprint("demo"), trained_top1=trained,
           untrained_top1=untrained, gap=trained - untrained, goal="gap>=20")
    return 0


if __name__ == "__main__":
    sys.exit(main())
