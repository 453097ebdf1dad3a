"""Linear probes over a grid of (block, timestep, pool): the quickest look at where a U-Net's
features classify best (``difftune probe``, the search-quality benchmark's grid, the demo
model's sanity test). Features are extracted once per timestep and pool for every block of
the grid (one U-Net pass per image each), then one linear head is trained per grid point.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import load_dataset, targets_of
from difftune.trainables.heads import build_head
from difftune.trainables.model.features import Extractor, check_blocks, check_pool, check_timestep
from difftune.trainables.pipeline import SPLITS, extract_dataset
from difftune.trainables.train.loop import FeatureTensors, evaluate, train_head

logger = logging.getLogger(__name__)

GridPoint = tuple[int, int, int]  # (block, t, pool)


def probe_config(*, block: int, t: int, pool: int, epochs: int = 10, lr: float = 0.05,
                 seed: int = 0, **more: Any) -> TrialConfig:
    """The probe's recipe: a linear head, SGD with momentum 0.9, batch 64, the lr dropped
    x0.1 halfway."""
    return TrialConfig(head="linear", block=block, t=t, pool=pool, epochs=epochs, lr=lr,
                       momentum=0.9, batch_size=64, step_size=max(1, epochs // 2), seed=seed,
                       **more)


def probe_grid(
    unet: tuple[torch.nn.Module, Any],
    *,
    data: str,
    blocks: Sequence[int],
    timesteps: Sequence[int],
    pools: Sequence[int] = (2,),
    epochs: int = 10,
    lr: float = 0.05,
    label_fraction: float | str | None = None,
    noise_seed: int = 0,
    progress: bool = False,
    test: bool = False,
) -> dict[GridPoint, dict[str, float]]:
    """Final-epoch metrics (``val_top1``, ``val_top5``, ``val_loss``) of a linear probe at
    every ``(block, t, pool)`` of the grid.

    :param unet: ``(model, diffusion)`` of a loaded U-Net.
    :param data: ``digits`` or an ImageFolder root.
    :param test: also evaluate every probe on the test split (``test_top1``, ``test_top5``,
        ``test_loss``): what the search-quality benchmark scores picks by.
    """
    model, diffusion = unet
    blocks = check_blocks(model, list(blocks))
    for t in timesteps:
        check_timestep(diffusion, t)
    for p in pools:
        check_pool(p)
    extractor = Extractor(model, diffusion)
    requests = [(t, b, p) for t in timesteps for b in blocks for p in pools]
    splits: dict[str, tuple[dict, torch.Tensor, int]] = {}
    for split in (*SPLITS, "test") if test else SPLITS:
        ds, classes = load_dataset(data, split=split, image_size=model.image_size,
                                   label_fraction=label_fraction)
        feats: dict[tuple[int, int, int], torch.Tensor] = {}
        for p in pools:
            for (t, b), f in extract_dataset(
                    extractor, ds, [r for r in requests if r[2] == p], seed=noise_seed,
                    progress=progress, desc=f"extract {split} pool {p}").items():
                feats[(t, b, p)] = f
        splits[split] = (feats, torch.tensor(targets_of(ds)), len(classes))
    out: dict[GridPoint, dict[str, float]] = {}
    for t, b, p in tqdm(requests, desc="probe", unit="head", disable=not progress):
        cfg = probe_config(block=b, t=t, pool=p, epochs=epochs, lr=lr, data=data,
                           noise_seed=noise_seed)
        train, val = (FeatureTensors({(t, b): splits[s][0][(t, b, p)]}, splits[s][1])
                      for s in SPLITS)
        head = build_head(cfg, train.shapes(), splits["train"][2])
        last = train_head(head, train, val, cfg)[-1]
        out[(b, t, p)] = {k: v for k, v in last.items() if k.startswith("val_")}
        if test:
            tested = evaluate(head, FeatureTensors({(t, b): splits["test"][0][(t, b, p)]},
                                                   splits["test"][1]))
            out[(b, t, p)].update({f"test_{k[4:]}": v for k, v in tested.items()})
    return out
