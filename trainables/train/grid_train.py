"""Training a grid of heads in one pass over the features (:mod:`.grid`): every batch is read
once, each head's loss is computed on its own logits, the losses are summed and one backward
and one optimizer step (a param group per head: its lr, weight decay, momentum) train them
all. The recipe is :mod:`.train`'s: same loader order, same schedule, same evaluation.

A head whose loss becomes NaN or infinite is switched off and reported as diverged; the grid
goes on with the others (a trial ends with :class:`~.train.TrainingDiverged` only when every
head diverged). Each epoch, the grid's best head (:func:`~.grid.best_index`) is what the trial
reports.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from difftune.trainables.config import TrialConfig
from difftune.trainables.model.cost import trial_gflops
from difftune.trainables.model.unet import shared_unet
from difftune.trainables.pipeline import FeatureSource, trial_data
from difftune.trainables.train.grid import (
    GRID_BEST,
    GRID_INDEX,
    GRID_RESULTS,
    GRID_SIZE,
    GROUP_SETTINGS,
    Grid,
    best_index,
    label,
)
from difftune.trainables.train.grid_heads import HeadGrid, build_grid
from difftune.trainables.train.loop import (
    Tally,
    TrainingDiverged,
    epoch_seed,
    eval_loader,
    make_optimizer,
    to_device,
    train_loader,
)

logger = logging.getLogger(__name__)

#: the file in a grid trial's checkpoint folder holding every head and the optimizer, to
#: resume the grid (``head.pt`` + ``meta.json`` beside it hold the best head alone)
GRID_FILE = "grid.pt"


@dataclass
class GridEpoch:
    """One epoch of a grid, as the trial reports it.

    :param metrics: the best head's metrics plus :data:`~.grid.GRID_BEST` (its point, JSON),
        :data:`~.grid.GRID_INDEX`, :data:`~.grid.GRID_SIZE` and :data:`~.grid.GRID_RESULTS`
        (every head's point and metrics, JSON).
    :param best: the best head's index; :param config: its plain trial config.
    """

    epoch: int
    metrics: dict[str, Any]
    best: int
    config: TrialConfig
    grid: HeadGrid
    optimizer: torch.optim.Optimizer
    scheduler: Any
    rows: list[dict[str, Any]] = field(default_factory=list)

    def best_head(self) -> nn.Module:
        """The best head alone (a copy), as a trial of its grid point would hold it."""
        return self.grid.plain(self.best)

    def resume_state(self) -> dict[str, Any]:
        """Everything :func:`run_grid_trial` needs to continue after this epoch."""
        return {"epoch": self.epoch, "heads": self.grid.state_dict(),
                "extra": self.grid.extra_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}


def param_groups(grid: HeadGrid, cfgs: list[TrialConfig]) -> list[dict[str, Any]]:
    """One optimizer param group per head, with its grid point's optimizer settings."""
    groups = []
    for i, cfg in enumerate(cfgs):
        group: dict[str, Any] = {
            "params": [p for p in grid.head(i).parameters() if p.requires_grad],
            "lr": cfg.lr, "weight_decay": cfg.weight_decay}
        if cfg.optimizer == "sgd":
            group["momentum"] = cfg.momentum
        groups.append(group)
    return groups


@torch.no_grad()
def evaluate_grid(model: nn.Module, n_heads: int, ds: Dataset, *, device: torch.device,
                  batch_size: int = 256) -> list[dict[str, float] | None]:
    """:func:`~.train.evaluate` for every head of a grid in one pass (None: head is off)."""
    model.eval()
    tallies = [Tally() for _ in range(n_heads)]
    seen = [False] * n_heads
    for inputs, labels in eval_loader(ds, batch_size=batch_size):
        labels = labels.to(device)
        for i, logits in enumerate(model(to_device(inputs, device))):
            if logits is not None:
                tallies[i].add(logits.float(), labels)
                seen[i] = True
    return [t.metrics() if s else None for t, s in zip(tallies, seen, strict=True)]


def train_grid(
    grid: HeadGrid,
    cfgs: list[TrialConfig],
    spec: Grid,
    train_ds: Dataset,
    val_ds: Dataset,
    *,
    points: list[dict[str, Any]],
    gflops: list[float],
    device: str | torch.device = "cpu",
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    on_epoch: Callable[[GridEpoch], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train the heads of ``grid`` (one per config of ``cfgs``, the points of ``spec``) for
    ``cfgs[0].epochs`` epochs.

    :param wrap: what the heads are wrapped in for training (the online source's live U-Net).
    :param on_epoch: called after every epoch with a :class:`GridEpoch`.
    :param resume: a :meth:`GridEpoch.resume_state` to continue from.
    :return: the reported metrics of every epoch.
    """
    base = cfgs[0]
    device = torch.device(device)
    grid.to(device)
    model = wrap(grid)
    opt = make_optimizer(param_groups(grid, cfgs), base)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=base.step_size, gamma=base.gamma)
    start = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start = int(resume["epoch"])
    loader, g = train_loader(train_ds, base)
    k = len(grid)
    history = []
    for epoch in range(start, base.epochs):
        g.manual_seed(epoch_seed(base, epoch))
        if hasattr(train_ds, "set_epoch"):  # K cached views: epoch e reads view e mod K
            train_ds.set_epoch(epoch)
        model.train()
        loss_sums, n = [0.0] * k, 0
        for inputs, labels in loader:
            outs = model(to_device(inputs, device))
            labels = labels.to(device)
            live = [i for i in range(k) if grid.active[i]]
            losses = [nn.functional.cross_entropy(outs[i].float(), labels) for i in live]
            values = torch.stack([x.detach() for x in losses]).tolist()
            total = None
            for i, loss, value in zip(live, losses, values, strict=True):
                if not math.isfinite(value):
                    logger.warning("grid head %d (%s) diverged at epoch %d (loss %s); the "
                                   "others go on", i, label(points[i]), epoch + 1, value)
                    grid.drop(i)
                    continue
                total = loss if total is None else total + loss
                loss_sums[i] += value * len(labels)
            if total is None:
                raise TrainingDiverged(f"every head of the grid diverged by epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            n += len(labels)
        sched.step()
        val = evaluate_grid(model, k, val_ds, device=device)
        rows = []
        for i in range(k):
            ok = grid.active[i] and val[i] is not None
            row = {"index": i, **points[i], "diverged": not ok, "epoch": epoch + 1,
                   "train_loss": loss_sums[i] / max(n, 1) if ok else None, "gflops": gflops[i]}
            row.update(val[i] if ok else dict.fromkeys(("val_top1", "val_top5", "val_loss")))
            rows.append(row)
        best = best_index([r[spec.metric] if not r["diverged"] else None for r in rows],
                          spec.mode)
        if best is None:
            raise TrainingDiverged(f"no head of the grid has a finite {spec.metric} at epoch "
                                   f"{epoch + 1}")
        metrics = {key: rows[best][key] for key in
                   ("epoch", "train_loss", "val_top1", "val_top5", "val_loss", "gflops")}
        metrics["lr"] = opt.param_groups[best]["lr"]  # where the schedule has taken it
        metrics.update({GRID_BEST: json.dumps(points[best]), GRID_INDEX: best, GRID_SIZE: k,
                        GRID_RESULTS: json.dumps(rows)})
        history.append(metrics)
        logger.debug("epoch %d: best head %d (%s) %s %.4g", epoch + 1, best, label(points[best]),
                     spec.metric, rows[best][spec.metric])
        if on_epoch is not None:
            on_epoch(GridEpoch(epoch + 1, metrics, best, cfgs[best], grid, opt, sched, rows))
    return history


def run_grid_trial(
    cfg: TrialConfig,
    spec: Grid,
    *,
    source: FeatureSource | None = None,
    device: str = "cpu",
    on_epoch: Callable[[GridEpoch], None] | None = None,
    resume: dict[str, Any] | None = None,
    on_data: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[HeadGrid, list[dict[str, Any]]]:
    """:func:`~.pipeline.run_trial` for a grid: one feature load, every point's head.

    :param on_data: called once the data is ready with ``{"shapes", "num_classes", "grid"}``.
    :return: ``(grid, per-epoch metrics)``.
    """
    cfgs = spec.configs(cfg)
    unet = shared_unet(cfg.model, cfg.checkpoint, device)
    data = trial_data(cfg, source=source, device=device)
    gflops = heads_gflops(cfgs, data.shapes, data.num_classes)
    grid = build_grid(cfgs, data.shapes, data.num_classes, unet=unet)
    if resume is not None:
        grid.load_state_dict(resume["heads"])
        grid.load_extra_state(resume["extra"])
    if on_data is not None:
        on_data({"shapes": data.shapes, "num_classes": data.num_classes, "grid": grid})
    history = train_grid(grid, cfgs, spec, data.train, data.val, points=spec.points(),
                         gflops=gflops, device=device, wrap=data.wrap, on_epoch=on_epoch,
                         resume=resume)
    return grid, history


def heads_gflops(cfgs: list[TrialConfig], shapes: dict, num_classes: int) -> list[float]:
    """:func:`~.cost.trial_gflops` of each head, counted once per head architecture (the
    optimizer settings of a point do not change it)."""
    counted: dict[str, float] = {}
    out = []
    for cfg in cfgs:
        arch = {k: v for k, v in cfg.to_dict().items() if k not in GROUP_SETTINGS}
        key = json.dumps(arch, sort_keys=True, default=str)
        if key not in counted:
            counted[key] = trial_gflops(cfg, shapes, num_classes)
        out.append(counted[key])
    return out


def read_resume_state(path: str | Path) -> dict[str, Any] | None:
    """The grid state saved in a checkpoint folder, or None if it holds a single head."""
    f = Path(path) / GRID_FILE
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=True)
