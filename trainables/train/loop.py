"""Training heads: the paper's released recipe (SGD lr 1e-2, no momentum, StepLR every 7
epochs x 0.1, 28 epochs) or AdamW, seeded, reporting train loss and val top-1/top-5 per
epoch. Inputs are whatever the heads take (a dict of feature maps, or images for DifFeed),
served by any torch Dataset of ``(inputs, label)``.

One loop, :func:`train_heads`, trains a :class:`~.grid_heads.HeadGrid`: a grid of heads in one
pass over the features (dinov2's linear evaluation: a ``ModuleDict`` of heads, one optimizer
with a param group per head, the losses summed, one backward), and a single head as a grid of
one. A grid head whose loss becomes NaN or infinite is switched off and the others go on; a
trial ends with :class:`TrainingDiverged` when a single head diverges, or every head of a
grid. Each epoch, the best head (:func:`~.grid.best_index`) is what the trial reports.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from difftune.trainables.config import TrialConfig
from difftune.trainables.train.grid import (
    GRID_BEST,
    GRID_INDEX,
    GRID_RESULTS,
    GRID_SIZE,
    Grid,
    best_index,
    label,
)
from difftune.trainables.train.grid_heads import HeadGrid

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class FeatureTensors(Dataset):
    """In-memory features: ``(t, block) -> [N x C x h x w]`` tensors and ``[N]`` labels."""

    def __init__(self, feats: dict[tuple[int, int], torch.Tensor], labels: torch.Tensor):
        self.feats, self.labels = feats, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[tuple[int, int], torch.Tensor], int]:
        return {k: v[i] for k, v in self.feats.items()}, int(self.labels[i])

    def shapes(self) -> dict[tuple[int, int], tuple[int, int, int]]:
        return {k: tuple(v.shape[1:]) for k, v in self.feats.items()}


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs


def make_optimizer(params, cfg: TrialConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Tally:
    """Top-1 / top-5 hits and summed loss of one head over evaluation batches."""

    def __init__(self) -> None:
        self.correct1 = self.correct5 = self.n = 0
        self.loss_sum = 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """:param logits: [N x classes] float; :param labels: [N] on the same device."""
        self.loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        self.correct1 += (top[:, 0] == labels).sum().item()
        self.correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        self.n += len(labels)

    def metrics(self) -> dict[str, float]:
        """``val_top1``, ``val_top5`` (percent) and ``val_loss`` (mean)."""
        n = max(self.n, 1)
        return {"val_top1": 100.0 * self.correct1 / n, "val_top5": 100.0 * self.correct5 / n,
                "val_loss": self.loss_sum / n}


@torch.no_grad()
def evaluate(head: nn.Module, ds: Dataset, *, batch_size: int = 256,
             device: str | torch.device = "cpu", num_workers: int = 0) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean loss of ``head`` on ``ds``."""
    device = torch.device(device)
    head.eval()
    tally = Tally()
    loader = eval_loader(ds, batch_size=batch_size, num_workers=num_workers)
    for inputs, labels in loader:
        tally.add(head(to_device(inputs, device)).float(), labels.to(device))
    return tally.metrics()


@torch.no_grad()
def evaluate_heads(model: nn.Module, n_heads: int, ds: Dataset, *, device: torch.device,
                   batch_size: int = 256, num_workers: int = 0) -> list[dict[str, float] | None]:
    """:func:`evaluate` for every head of a grid (``model``: a :class:`HeadGrid`, maybe
    wrapped) in one pass; None for a head switched off."""
    model.eval()
    tallies = [Tally() for _ in range(n_heads)]
    seen = [False] * n_heads
    for inputs, labels in eval_loader(ds, batch_size=batch_size, num_workers=num_workers):
        labels = labels.to(device)
        for i, logits in enumerate(model(to_device(inputs, device))):
            if logits is not None:
                tallies[i].add(logits.float(), labels)
                seen[i] = True
    return [t.metrics() if s else None for t, s in zip(tallies, seen, strict=True)]


def eval_loader(ds: Dataset, *, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
    """An evaluation loader that draws nothing from the global random state (a loader
    without a generator draws its seed from it each time it starts), so that a head's
    dropout masks do not depend on how often it was evaluated."""
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      generator=torch.Generator())


def train_loader(train_ds: Dataset, cfg: TrialConfig, *, num_workers: int = 0
                 ) -> tuple[DataLoader, torch.Generator]:
    """The shuffled training loader of ``cfg`` and its generator: reseed the generator with
    :func:`epoch_seed` before each epoch (epoch ``e`` always sees one order, so training
    resumes exactly)."""
    g = torch.Generator().manual_seed(cfg.seed)
    # a trailing batch of one image would break BatchNorm in training mode
    drop_last = len(train_ds) % cfg.batch_size == 1
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g,
                        drop_last=drop_last, num_workers=num_workers)
    return loader, g


def epoch_seed(cfg: TrialConfig, epoch: int) -> int:
    """The shuffling seed of epoch ``epoch`` (0-based)."""
    return cfg.seed * 1000 + epoch


def param_groups(grid: HeadGrid, cfgs: list[TrialConfig]) -> list[dict[str, Any]]:
    """One optimizer param group per head, with its config's optimizer settings."""
    groups = []
    for i, cfg in enumerate(cfgs):
        group: dict[str, Any] = {
            "params": [p for p in grid.head(i).parameters() if p.requires_grad],
            "lr": cfg.lr, "weight_decay": cfg.weight_decay}
        if cfg.optimizer == "sgd":
            group["momentum"] = cfg.momentum
        groups.append(group)
    return groups


@dataclass
class Epoch:
    """One epoch of a trial's heads, as the trial reports and checkpoints it.

    :param metrics: the best head's metrics (``epoch``, ``train_loss``, ``lr``, ``val_top1``,
        ``val_top5``, ``val_loss``); for a grid also its ``gflops``, :data:`~.grid.GRID_BEST`
        (its point, JSON), :data:`~.grid.GRID_INDEX`, :data:`~.grid.GRID_SIZE` and
        :data:`~.grid.GRID_RESULTS` (every head's point and metrics, JSON).
    :param best: the best head's index (0 for a single head).
    :param cfgs: each head's trial config. :param spec: the grid, None for a single head.
    """

    epoch: int
    metrics: dict[str, Any]
    best: int
    grid: HeadGrid
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cfgs: list[TrialConfig] = field(default_factory=list)
    spec: Grid | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: the rung over images it was trained at (a :class:`~..data.order.Rung`; None: all)
    rung: Any = None

    @property
    def config(self) -> TrialConfig:
        """The best head's plain trial config."""
        return self.cfgs[self.best]

    @property
    def gflops(self) -> float:
        """The best head's GFLOPs per image."""
        return self.grid.gflops[self.best]

    def best_head(self) -> nn.Module:
        """The best head alone, as a trial of its grid point would hold it."""
        return self.grid.plain(self.best)

    def resume_state(self) -> dict[str, Any]:
        """Everything a trial needs to continue after this epoch."""
        return {"epoch": self.epoch, "heads": self.grid.state_dict(),
                "extra": self.grid.extra_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}


#: an old name of :class:`Epoch`
GridEpoch = Epoch


def train_heads(
    grid: HeadGrid,
    cfgs: list[TrialConfig],
    train_ds: Dataset,
    val_ds: Dataset,
    *,
    spec: Grid | None = None,
    device: str | torch.device = "cpu",
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    on_epoch: Callable[[Epoch], None] | None = None,
    resume: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> list[dict[str, Any]]:
    """Train the heads of ``grid``, one per config of ``cfgs`` (each head's optimizer
    settings; the first one's recipe: epochs, batch size, schedule, seed), every batch read
    once.

    :param spec: the grid the heads are the points of (how the best is chosen, and the grid's
        keys in the metrics); None for a single head.
    :param wrap: what the heads are wrapped in (the online source's live U-Net).
    :param on_epoch: called after every epoch with an :class:`Epoch`.
    :param resume: ``{"epoch", "optimizer", "scheduler"}`` to continue from (the heads' state
        is loaded by the caller; without an optimizer state, a fresh optimizer).
    :return: the metrics of every epoch.
    """
    base = cfgs[0]
    device = torch.device(device)
    grid.to(device)
    model = wrap(grid)
    opt = make_optimizer(param_groups(grid, cfgs), base)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=base.step_size, gamma=base.gamma)
    start = 0
    if resume is not None:
        if resume.get("optimizer") is not None:
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
        start = int(resume["epoch"])
    loader, g = train_loader(train_ds, base, num_workers=num_workers)
    k = len(grid)
    history = []
    for epoch in range(start, base.epochs):
        g.manual_seed(epoch_seed(base, epoch))  # resumable: epoch e always sees one order
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
                    if spec is None:
                        raise TrainingDiverged(f"loss became {value} at epoch {epoch + 1}")
                    logger.warning("grid head %d (%s) diverged at epoch %d (loss %s); the "
                                   "others go on", i, label(grid.points[i]), epoch + 1, value)
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
        val = evaluate_heads(model, k, val_ds, device=device, num_workers=num_workers)
        metrics, best, rows = _epoch_metrics(grid, spec, epoch + 1, loss_sums, n, val)
        metrics["lr"] = opt.param_groups[best]["lr"]  # where the schedule has taken it
        if spec is not None:
            metrics.update({GRID_BEST: json.dumps(grid.points[best]), GRID_INDEX: best,
                            GRID_SIZE: k, GRID_RESULTS: json.dumps(rows)})
        history.append(metrics)
        logger.debug("epoch %d: best head %d (%s) %s", epoch + 1, best,
                     label(grid.points[best]), metrics)
        if on_epoch is not None:
            on_epoch(Epoch(epoch + 1, metrics, best, grid, opt, sched, list(cfgs), spec, rows))
    return history


def _epoch_metrics(grid: HeadGrid, spec: Grid | None, epoch: int, loss_sums: list[float],
                   n: int, val: list[dict[str, float] | None]
                   ) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
    """``(the best head's metrics, its index, every head's row)`` of an epoch."""
    rows = []
    for i in range(len(grid)):
        ok = grid.active[i] and val[i] is not None
        row = {"index": i, **grid.points[i], "diverged": not ok, "epoch": epoch,
               "train_loss": loss_sums[i] / max(n, 1) if ok else None, "gflops": grid.gflops[i]}
        row.update(val[i] if ok else dict.fromkeys(("val_top1", "val_top5", "val_loss")))
        rows.append(row)
    metric, mode = (spec.metric, spec.mode) if spec is not None else ("val_top1", "max")
    best = best_index([r[metric] if not r["diverged"] else None for r in rows], mode)
    if best is None:
        if spec is None:  # a single head's metric is NaN: it is reported as such
            best = 0
        else:
            raise TrainingDiverged(f"no head of the grid has a finite {metric} at epoch {epoch}")
    row = rows[best]
    metrics = {"epoch": epoch, "train_loss": row["train_loss"], "lr": None,
               **{k: row[k] for k in ("val_top1", "val_top5", "val_loss")}}
    if spec is not None:
        metrics["gflops"] = row["gflops"]
    return metrics, best, rows


def train_head(
    head: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    cfg: TrialConfig,
    *,
    device: str | torch.device = "cpu",
    on_epoch: Callable[..., None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    num_workers: int = 0,
) -> list[dict[str, float]]:
    """Train one ``head`` for ``cfg.epochs`` epochs, seeded by ``cfg.seed``: :func:`train_heads`
    on a grid of one.

    :param on_epoch: called after every epoch with (epoch starting at 1, metrics, head,
        optimizer, scheduler).
    :param start_epoch: epochs already done (resuming from a checkpoint).
    :param optimizer_state: ``{"optimizer": ..., "scheduler": ...}`` state dicts to resume.
    :return: the metrics of every epoch.
    """
    grid = HeadGrid([head])
    resume = None
    if optimizer_state is not None or start_epoch:
        resume = {"epoch": start_epoch, **(optimizer_state or {})}

    def report(ep: Epoch) -> None:
        if on_epoch is not None:
            on_epoch(ep.epoch, ep.metrics, head, ep.optimizer, ep.scheduler)

    return train_heads(grid, [cfg], train_ds, val_ds, device=device, on_epoch=report, resume=resume,
                       num_workers=num_workers)


#: an old name of :func:`train_heads`
train_grid = train_heads
