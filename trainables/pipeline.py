"""One trial without Ray: load the model and data, get the features the head needs, train.

Features come from a *feature source*: :class:`DirectFeatures` extracts them in memory
(once per trial); the Arrow feature cache (``trainables.cache``) serves them across trials.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import TrialConfig
from .data import dataset_indices, load_dataset, targets_of
from .features import Extractor, block_sizes
from .heads import build_head, feature_requests
from .train import FeatureTensors, train_head
from .unet import load_unet

logger = logging.getLogger(__name__)

Request = tuple[int, int, int]  # (t, block, pool)


@functools.lru_cache(maxsize=2)
def cached_unet(model: str, checkpoint: str | None, device: str = "cpu") -> tuple[Any, Any]:
    """``load_unet`` memoised per process (a Ray worker runs many trials)."""
    return load_unet(model, checkpoint=checkpoint, device=device)


@functools.lru_cache(maxsize=4)
def cached_dataset(data: str, split: str, image_size: int, label_fraction, seed: int):
    return load_dataset(data, split=split, image_size=image_size,
                        label_fraction=label_fraction, seed=seed)


def extract_dataset(
    extractor: Extractor,
    ds: Dataset,
    requests: Sequence[Request],
    *,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "extract",
) -> dict[tuple[int, int], torch.Tensor]:
    """Features of every image of ``ds`` for ``requests``: one forward pass per image batch
    and distinct timestep, serving all blocks requested at that timestep.

    :return: (t, block) -> [N x C x pool x pool] float32 CPU Tensor.
    """
    by_t: dict[int, dict[int, int]] = {}
    for t, b, p in requests:
        by_t.setdefault(t, {})[b] = p
    indices = dataset_indices(ds)
    out: dict[tuple[int, int], list[torch.Tensor]] = {(t, b): [] for t, bp in by_t.items() for b in bp}
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    total = len(loader) * len(by_t)
    with tqdm(total=total, desc=desc, unit="batch", disable=not progress, leave=False) as bar:
        start = 0
        for x0, _ in loader:
            idx = indices[start:start + len(x0)]
            start += len(x0)
            for t, block_pools in by_t.items():
                pools = set(block_pools.values())
                for pool in pools:
                    blocks = [b for b, p in block_pools.items() if p == pool]
                    feats = extractor.extract(x0, t, blocks, indices=idx, pool=pool, seed=seed)
                    for b, f in feats.items():
                        out[(t, b)].append(f.cpu())
                bar.update(1)
    return {k: torch.cat(v) for k, v in out.items()}


@dataclass
class TrialData:
    """What a head trains on: datasets of ``(inputs, label)``, the feature shapes the head is
    built for, and ``wrap``: how the head is wrapped for training (identity for stored
    features; the online no-cache source wraps it with a live U-Net pass)."""

    train: Dataset
    val: Dataset
    shapes: dict[tuple[int, int], tuple[int, int, int]]
    num_classes: int
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = field(default=lambda head: head)


class FeatureSource(Protocol):
    def prepare(self, cfg: TrialConfig, requests: Sequence[Request]) -> TrialData:
        """Train/val data for the ``(t, block, pool)`` requests of the head of ``cfg``."""


class DirectFeatures:
    """Extract the requested features in memory, once per trial (no cache)."""

    def __init__(self, *, device: str = "cpu", batch_size: int = 256, progress: bool = False):
        self.device, self.batch_size, self.progress = device, batch_size, progress
        self.extractor: Extractor | None = None

    def prepare(self, cfg: TrialConfig, requests: Sequence[Request]) -> TrialData:
        model, diffusion = cached_unet(cfg.model, cfg.checkpoint, self.device)
        if self.extractor is None or self.extractor.model is not model:
            self.extractor = Extractor(model, diffusion)
        out = []
        for split in ("train", "val"):
            ds, classes = cached_dataset(cfg.data, split, model.image_size, cfg.label_fraction,
                                         cfg.seed)
            feats = extract_dataset(self.extractor, ds, requests, seed=cfg.noise_seed,
                                    batch_size=self.batch_size, progress=self.progress,
                                    desc=f"extract {split}")
            out.append(FeatureTensors(feats, torch.tensor(targets_of(ds))))
        return TrialData(out[0], out[1], out[0].shapes(), len(classes))


def clamp_requests(model: torch.nn.Module, requests: Sequence[Request]) -> list[Request]:
    """Pool sizes larger than a block's native map are clamped to the native size (an
    attention head's ``pre_pool`` 16 on an 8x8 block reads the 8x8 map)."""
    sizes = block_sizes(model)
    return [(t, b, min(p, sizes[b])) for t, b, p in requests]


def run_trial(
    cfg: TrialConfig,
    *,
    source: FeatureSource | None = None,
    device: str = "cpu",
    on_epoch: Callable[..., None] | None = None,
    head_state: dict | None = None,
    optimizer_state: dict | None = None,
    start_epoch: int = 0,
    on_data: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train and evaluate the head of ``cfg`` on its features.

    :param on_data: called once the features are ready with ``{"shapes", "num_classes"}``
        (what a checkpoint needs to rebuild the head).

    :return: ``(head, per-epoch metrics)``.
    """
    if cfg.head == "diffeed":
        from .diffeed import run_diffeed_trial

        return run_diffeed_trial(cfg, device=device, on_epoch=on_epoch, head_state=head_state,
                                 optimizer_state=optimizer_state, start_epoch=start_epoch,
                                 on_data=on_data)
    source = source or DirectFeatures(device=device)
    model, _ = cached_unet(cfg.model, cfg.checkpoint, device)
    data = source.prepare(cfg, clamp_requests(model, feature_requests(cfg)))
    if on_data is not None:
        on_data({"shapes": data.shapes, "num_classes": data.num_classes})
    head = build_head(cfg, data.shapes, data.num_classes)
    if head_state is not None:
        head.load_state_dict(head_state)
    history = train_head(data.wrap(head), data.train, data.val, cfg, device=device,
                         on_epoch=on_epoch, start_epoch=start_epoch,
                         optimizer_state=optimizer_state)
    return head, history
