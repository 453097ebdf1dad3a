"""Training a head: the paper's released recipe (SGD lr 1e-2, no momentum, StepLR every 7
epochs x 0.1, 28 epochs) or AdamW, seeded, reporting train loss and val top-1/top-5 per
epoch. Inputs are whatever the head takes (a dict of feature maps, or images for DifFeed),
served by any torch Dataset of ``(inputs, label)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from difftune.trainables.config import TrialConfig

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
    """Train ``head`` for ``cfg.epochs`` epochs; seeded by ``cfg.seed``.

    :param on_epoch: called after every epoch with (epoch starting at 1, metrics, head,
        optimizer, scheduler); the Ray trainable reports and checkpoints there.
    :param start_epoch: epochs already done (resuming from a checkpoint).
    :param optimizer_state: ``{"optimizer": ..., "scheduler": ...}`` state dicts to resume.
    :return: the metrics of every epoch.
    """
    device = torch.device(device)
    head.to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state["optimizer"])
        sched.load_state_dict(optimizer_state["scheduler"])
    loader, g = train_loader(train_ds, cfg, num_workers=num_workers)
    history: list[dict[str, float]] = []
    for epoch in range(start_epoch, cfg.epochs):
        g.manual_seed(epoch_seed(cfg, epoch))  # resumable: epoch e always sees one order
        if hasattr(train_ds, "set_epoch"):  # K cached views: epoch e reads view e mod K
            train_ds.set_epoch(epoch)
        head.train()
        loss_sum, n = 0.0, 0
        for inputs, labels in loader:
            logits = head(to_device(inputs, device)).float()
            loss = nn.functional.cross_entropy(logits, labels.to(device))
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(labels)
            n += len(labels)
        sched.step()
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1),
                   "lr": opt.param_groups[0]["lr"]}
        metrics.update(evaluate(head, val_ds, device=device, num_workers=num_workers))
        history.append(metrics)
        logger.debug("epoch %d: %s", epoch + 1, metrics)
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics, head, opt, sched)
    return history
