"""``difftune probe``: linear-probe accuracy over a small block x timestep grid — the quickest
way to see the paper's effect (features peak at middle blocks and small t)."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="linear-probe accuracy over a block x timestep grid",
        description="Extract features once per timestep for all grid blocks, train one linear "
        "head per (block, t) and print val top-1 as a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="demo", help="demo, paper256 or a checkpoint path")
    p.add_argument("--checkpoint", help="weights for a preset model")
    p.add_argument("--random-init", action="store_true", help="the same architecture untrained")
    p.add_argument("--data", default="digits", help="digits or an ImageFolder root")
    p.add_argument("--blocks", type=_ints, default=[4, 7, 10, 13, 16], help="comma-separated")
    p.add_argument("--timesteps", type=_ints, default=[10, 90, 300], help="comma-separated")
    p.add_argument("--pool", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--label-fraction", type=float, help="use a fraction of the train labels")
    p.set_defaults(run=run)


def probe_grid(*, model: str, checkpoint: str | None, random_init: bool, data: str,
               blocks: list[int], timesteps: list[int], pool: int, epochs: int, lr: float,
               label_fraction: float | None = None) -> dict[tuple[int, int], float]:
    """Val top-1 of a linear head for every (block, t) of the grid."""
    import torch

    from trainables.config import TrialConfig
    from trainables.data import load_dataset, targets_of
    from trainables.features import Extractor, check_blocks, check_timestep
    from trainables.heads import build_head
    from trainables.pipeline import extract_dataset
    from trainables.train import FeatureTensors, train_head
    from trainables.unet import load_unet

    unet, diffusion = load_unet(model, checkpoint=checkpoint, random_init=random_init)
    check_blocks(unet, blocks)
    for t in timesteps:
        check_timestep(diffusion, t)
    extractor = Extractor(unet, diffusion)
    splits = {}
    for split in ("train", "val"):
        ds, classes = load_dataset(data, split=split, image_size=unet.image_size,
                                   label_fraction=label_fraction)
        feats = extract_dataset(extractor, ds, [(t, b, pool) for t in timesteps for b in blocks],
                                desc=f"extract {split}")
        splits[split] = (feats, torch.tensor(targets_of(ds)), len(classes))
    out = {}
    for t in timesteps:
        for b in blocks:
            cfg = TrialConfig(model=model, data=data, head="linear", block=b, t=t, pool=pool,
                              epochs=epochs, lr=lr, momentum=0.9, batch_size=64,
                              step_size=max(1, epochs // 2))
            tr = FeatureTensors({(t, b): splits["train"][0][(t, b)]}, splits["train"][1])
            va = FeatureTensors({(t, b): splits["val"][0][(t, b)]}, splits["val"][1])
            head = build_head(cfg, tr.shapes(), splits["train"][2])
            out[(b, t)] = train_head(head, tr, va, cfg)[-1]["val_top1"]
    return out


def run(args: argparse.Namespace) -> int:
    grid = probe_grid(model=args.model, checkpoint=args.checkpoint, random_init=args.random_init,
                      data=args.data, blocks=args.blocks, timesteps=args.timesteps,
                      pool=args.pool, epochs=args.epochs, lr=args.lr,
                      label_fraction=args.label_fraction)
    print(f"val top-1 (%) of a linear probe, pool {args.pool}, model {args.model}"
          + (" (random init)" if args.random_init else ""))
    print("block \\ t " + "".join(f"{t:>8}" for t in args.timesteps))
    for b in args.blocks:
        print(f"{b:>9} " + "".join(f"{grid[(b, t)]:8.1f}" for t in args.timesteps))
    best = max(grid, key=grid.get)
    print(f"best: block {best[0]}, t {best[1]}: {grid[best]:.1f}%")
    return 0
