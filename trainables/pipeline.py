"""One trial without Ray: get what its heads read, build them, train them (:func:`run`, on a
:class:`~.trial.Trial` resolved once; :func:`run_trial` and :func:`run_grid_trial` resolve a
config and run it).

A feature head reads features from a *feature source*: :class:`DirectFeatures` extracts them
in memory (once per trial), the Arrow feature cache (:mod:`.cache`) serves them across
trials, and the online source (:mod:`.model.online`) recomputes them on every batch (the
paper's way). A live head (DifFeed) reads images and runs the U-Net itself. Either way the
heads, one or a grid, are trained by :func:`~.train.loop.train_heads` and reported through
``on_epoch``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import (
    ImageItems,
    SplitPart,
    dataset_indices,
    shared_dataset,
    targets_of,
)
from difftune.trainables.data.order import Rung, repeat_for, rung_subset
from difftune.trainables.data.views import ViewCycle, view_batch
from difftune.trainables.heads import Request
from difftune.trainables.model.features import Extractor, block_sizes
from difftune.trainables.model.unet import shared_unet
from difftune.trainables.train.grid import Grid
from difftune.trainables.train.grid_heads import HeadGrid
from difftune.trainables.train.loop import Epoch, FeatureTensors, evaluate, train_heads
from difftune.trainables.trial import Trial, build_heads, resolve

logger = logging.getLogger(__name__)

#: the splits a trial reads: it fits on train and is selected on val; test is read only by
#: :func:`evaluate_on` once the search has chosen (never by a trial)
SPLITS = ("train", "val")


def trial_dataset(cfg: TrialConfig, split: str, image_size: int) -> tuple[SplitPart, list[str]]:
    """The images of ``split`` for ``cfg``'s data (memoised per process): the label fraction
    subsamples train only."""
    frac = cfg.label_fraction if split == "train" else None
    return shared_dataset(cfg.data, split, image_size, frac, cfg.seed if frac is not None else 0,
                          cfg.holdout, cfg.bad_images)


def split_views(cfg: TrialConfig, split: str) -> int:
    """How many views of each image a trial reads from ``split``: ``cfg.views`` for train,
    one (the image itself) for val and test."""
    return cfg.views if split == "train" else 1


def extract_dataset(
    extractor: Extractor,
    ds: Dataset,
    requests: Sequence[Request],
    *,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "extract",
    view: int = 0,
) -> dict[tuple[int, int], torch.Tensor]:
    """Features of every image of ``ds`` for ``requests``: one forward pass per image batch
    and distinct timestep, serving every block requested at that timestep.

    :param view: which view of the images (:mod:`.views`; 0: the images themselves).

    :return: (t, block) -> [N x C x pool x pool] float32 CPU Tensor.
    """
    by_t: dict[int, dict[int, int]] = {}
    for t, b, p in requests:
        by_t.setdefault(t, {})[b] = p
    indices = dataset_indices(ds)
    out: dict[tuple[int, int], list[torch.Tensor]] = {
        (t, b): [] for t, bp in by_t.items() for b in bp}
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    with tqdm(total=len(loader) * len(by_t), desc=desc, unit="batch", disable=not progress,
              leave=False) as bar:
        start = 0
        for x0, _ in loader:
            idx = indices[start:start + len(x0)]
            start += len(x0)
            for t, pools in by_t.items():
                x, noise = view_batch(x0, idx, t=t, seed=seed, view=view)
                for b, f in extractor.extract(x, t, pools, indices=idx, seed=seed,
                                              noise=noise).items():
                    out[(t, b)].append(f.cpu())
                bar.update(1)
    return {k: torch.cat(v) for k, v in out.items()}


@dataclass
class TrialData:
    """What a head trains on: datasets of ``(inputs, label)`` per split (``train``, ``val``,
    ``test``: those asked for), the feature shapes the head is built for, and ``wrap``: how
    the head is wrapped for training and evaluation (identity for stored features; the
    online source puts a live U-Net pass in front of it)."""

    splits: dict[str, Dataset]
    shapes: dict[tuple[int, int], tuple[int, int, int]]
    num_classes: int
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = field(default=lambda head: head)

    @property
    def train(self) -> Dataset:
        return self.splits["train"]

    @property
    def val(self) -> Dataset:
        return self.splits["val"]

    @property
    def test(self) -> Dataset:
        return self.splits["test"]


class FeatureSource(Protocol):
    def prepare(self, cfg: TrialConfig, requests: Sequence[Request],
                splits: Sequence[str] = SPLITS, *, rung: Rung | None = None) -> TrialData:
        """Data of ``splits`` for the ``(t, block, pool)`` requests of the head of ``cfg``
        (train: :func:`split_views` views, a :class:`~.views.ViewCycle` when more than one);
        at a ``rung`` over images, the rung's sample of each split
        (:func:`~.data.order.rung_subset`)."""


class UNetSource:
    """Base of the feature sources that run the U-Net themselves: the trial's model with one
    :class:`~.features.Extractor` that counts the U-Net image-passes."""

    def __init__(self, *, device: str = "cpu"):
        self.device = device
        self.extractor: Extractor | None = None

    @property
    def unet_images(self) -> int:
        """Images passed through the U-Net by this source so far."""
        return self.extractor.forward_images if self.extractor is not None else 0

    def unet_for(self, cfg: TrialConfig) -> torch.nn.Module:
        """The U-Net of ``cfg`` (loaded once per process); sets :attr:`extractor`."""
        model, diffusion = shared_unet(cfg.model, cfg.checkpoint, self.device)
        if self.extractor is None or self.extractor.model is not model:
            self.extractor = Extractor(model, diffusion)
        return model


class DirectFeatures(UNetSource):
    """Extract the requested features in memory, once per trial (no cache)."""

    def __init__(self, *, device: str = "cpu", batch_size: int = 256, progress: bool = False):
        super().__init__(device=device)
        self.batch_size, self.progress = batch_size, progress

    def prepare(self, cfg: TrialConfig, requests: Sequence[Request],
                splits: Sequence[str] = SPLITS, *, rung: Rung | None = None) -> TrialData:
        model = self.unet_for(cfg)
        out: dict[str, Dataset] = {}
        for split in splits:
            ds, classes = trial_dataset(cfg, split, model.image_size)
            ds = rung_subset(ds, rung)
            labels = torch.tensor(targets_of(ds))
            views = [FeatureTensors(extract_dataset(
                self.extractor, ds, requests, seed=cfg.noise_seed, batch_size=self.batch_size,
                progress=self.progress, desc=f"extract {split} view {v}", view=v), labels)
                for v in range(split_views(cfg, split))]
            out[split] = views[0] if len(views) == 1 else ViewCycle(views)
        first = next(iter(out.values()))
        return TrialData(out, first.shapes(), len(classes))


def clamp_requests(model: torch.nn.Module, requests: Sequence[Request]) -> list[Request]:
    """Pool sizes larger than a block's native map are clamped to the native size (an
    attention head's ``pre_pool`` 16 on an 8x8 block reads the 8x8 map)."""
    sizes = block_sizes(model)
    return [(t, b, min(p, sizes[b])) for t, b, p in requests]


def image_data(cfg: TrialConfig, image_size: int, splits: Sequence[str] = SPLITS, *,
               rung: Rung | None = None) -> TrialData:
    """Images of ``splits`` (a ``rung``'s sample of each) for a head that runs the U-Net
    itself (no feature shapes)."""
    loaded = {s: trial_dataset(cfg, s, image_size) for s in splits}
    classes = next(iter(loaded.values()))[1]
    return TrialData({s: ImageItems(rung_subset(ds, rung)) for s, (ds, _) in loaded.items()},
                     {}, len(classes))


def trial_data(trial: Trial, *, source: FeatureSource | None = None, device: str = "cpu",
               splits: Sequence[str] = SPLITS, rung: Rung | None = None) -> TrialData:
    """What the heads of ``trial`` read from ``splits`` (at ``rung``: its sample of each):
    images for a live head, else features from ``source`` (default: extracted in memory)."""
    if trial.kind.live_unet:
        return image_data(trial.cfg, trial.geometry.image_size, splits, rung=rung)
    source = source or DirectFeatures(device=device)
    if rung is None:
        return source.prepare(trial.cfg, list(trial.requests), splits)
    return source.prepare(trial.cfg, list(trial.requests), splits, rung=rung)


def evaluate_on(head: torch.nn.Module, cfg: TrialConfig, split: str = "test", *,
                source: FeatureSource | None = None, device: str = "cpu") -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean loss of a trained ``head`` on ``split``, keyed
    ``<split>_top1``, ``<split>_top5``, ``<split>_loss``: how the champion (and every
    confirmed config) is reported on test once a search has chosen it."""
    data = trial_data(resolve(cfg), source=source, device=device, splits=(split,))
    metrics = evaluate(data.wrap(head), data.splits[split], device=device)
    return {f"{split}_{k.split('_', 1)[1]}": v for k, v in metrics.items()}


def run(
    trial: Trial,
    *,
    source: FeatureSource | None = None,
    device: str = "cpu",
    on_epoch: Callable[[Epoch], None] | None = None,
    resume: dict[str, Any] | None = None,
    on_data: Callable[[dict[str, Any]], None] | None = None,
    rungs: Sequence[Rung] = (),
    start_rung: int = 0,
) -> tuple[HeadGrid, list[dict[str, Any]]]:
    """Train and evaluate the heads of ``trial`` (one, or its grid's) in one pass over the
    data of each epoch; with ``rungs`` over images, once per rung from ``start_rung`` on:
    the heads built afresh at each rung and trained for their epochs on its sample of train
    (each epoch reads it :meth:`~.data.order.Rung.passes` times), scored on its sample of val (each :class:`~.train.loop.Epoch` carries its ``rung``; the
    caller may stop between rungs by raising from ``on_epoch``).

    :param source: where feature heads' features come from (default: in memory).
    :param on_epoch: called after every epoch with an :class:`~.train.loop.Epoch`.
    :param resume: an :meth:`~.train.loop.Epoch.resume_state` to continue from (at
        ``start_rung``).
    :param on_data: called once the data of each rung is ready with ``{"shapes",
        "num_classes", "grid", "rung", "train_images"}`` (the heads,
        :class:`~.train.grid_heads.HeadGrid`, with their GFLOPs).
    :return: ``(heads, per-epoch metrics of the best head)`` (of the last rung run).
    """
    unet = shared_unet(trial.cfg.model, trial.cfg.checkpoint, device)
    grid, history = None, []
    for rung in list(rungs)[start_rung:] or [None]:
        data = trial_data(trial, source=source, device=device, rung=rung)
        grid = build_heads(trial, data.shapes, data.num_classes, unet=unet)
        if resume is not None:
            if resume.get("heads") is not None:
                grid.load_state_dict(resume["heads"])
            if resume.get("extra") is not None:
                grid.load_extra_state(resume["extra"])
        if on_data is not None:
            on_data({"shapes": data.shapes, "num_classes": data.num_classes, "grid": grid,
                     "rung": rung, "train_images": len(data.train)})

        def at_rung(ep: Epoch, rung: Rung | None = rung) -> None:
            ep.rung = rung
            if on_epoch is not None:
                on_epoch(ep)

        train = repeat_for(data.train, rung, trial.cfgs[0].batch_size)
        history = train_heads(grid, list(trial.cfgs), train, data.val, spec=trial.grid,
                              device=device, wrap=data.wrap, on_epoch=at_rung, resume=resume)
        resume = None
    return grid, history


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
    """Train and evaluate the head of ``cfg``: :func:`run` on a grid of one.

    :param on_epoch: called after every epoch with ``(epoch, metrics, head, optimizer,
        scheduler)``; ``head`` is the bare head (what a checkpoint holds).
    :param head_state, optimizer_state, start_epoch: where to resume (``optimizer_state``:
        ``{"optimizer", "scheduler"}``).
    :param on_data: called once the data is ready with ``{"shapes", "num_classes", "head",
        "gflops"}`` (what a checkpoint needs to rebuild the head, and its GFLOPs per image).
    :return: ``(head, per-epoch metrics)``.
    """
    resume = None
    if head_state is not None or optimizer_state is not None or start_epoch:
        heads = None if head_state is None else {f"heads.0.{k}": v for k, v in head_state.items()}
        resume = {"epoch": start_epoch, **(optimizer_state or {}), "heads": heads}

    def data_ready(info: dict[str, Any]) -> None:
        grid = info["grid"]
        if on_data is not None:
            on_data({"shapes": info["shapes"], "num_classes": info["num_classes"],
                     "head": grid.head(0), "gflops": grid.gflops[0]})

    def report(ep: Epoch) -> None:
        if on_epoch is not None:
            on_epoch(ep.epoch, ep.metrics, ep.grid.head(0), ep.optimizer, ep.scheduler)

    grid, history = run(resolve(cfg), source=source, device=device, on_epoch=report,
                        resume=resume, on_data=data_ready)
    return grid.head(0), history


def run_grid_trial(
    cfg: TrialConfig,
    spec: Grid,
    *,
    source: FeatureSource | None = None,
    device: str = "cpu",
    on_epoch: Callable[[Epoch], None] | None = None,
    resume: dict[str, Any] | None = None,
    on_data: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[HeadGrid, list[dict[str, Any]]]:
    """:func:`run` on the grid ``spec`` of ``cfg``: one feature load, every point's head.

    :return: ``(grid, per-epoch metrics)``.
    """
    return run(resolve(cfg, spec), source=source, device=device, on_epoch=on_epoch,
               resume=resume, on_data=on_data)
