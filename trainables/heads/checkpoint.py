"""The head checkpoint format, the same for every head kind: a folder with ``head.pt`` (the
head's tensors, and optionally the optimizer and scheduler state to resume training) and
``meta.json`` (the trial config, the epoch, the class count and the feature shapes the head
was built for). Loaded with ``torch.load(..., weights_only=True)``.

A trial's checkpoint (:func:`save_epoch`) is such a folder holding its best head, as a plain
head of its grid point; a grid trial's adds ``grid.pt`` (every head and the optimizer), to
resume the grid (:func:`read_resume`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.trainables.config import TrialConfig
from difftune.trainables.heads import build_head, head_kind
from difftune.trainables.model.unet import shared_unet
from difftune.trainables.train.grid import GRID_BEST, GRID_INDEX
from difftune.trainables.train.loop import Epoch

HEAD_FILE = "head.pt"
META_FILE = "meta.json"
#: the file in a grid trial's checkpoint folder holding every head and the optimizer, to
#: resume the grid (``head.pt`` + ``meta.json`` beside it hold the best head alone)
GRID_FILE = "grid.pt"
#: the key in ``meta.json`` (and a grid's resume state) of the rung over images an epoch is of
RUNG_KEY = "image_rung"


def save_head(path: str | Path, head: nn.Module, cfg: TrialConfig, *, epoch: int,
              shapes: dict, num_classes: int, optimizer=None, scheduler=None,
              extra: dict[str, Any] | None = None) -> None:
    """Write a head checkpoint folder ``path`` (created if missing).

    :param shapes: ``(t, block) -> (C, h, w)`` the head was built for (empty for live heads).
    :param extra: more JSON-able facts to keep in ``meta.json``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {"head": head.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, path / HEAD_FILE)
    meta = {"config": cfg.to_dict(), "epoch": epoch, "num_classes": num_classes,
            "shapes": [[list(k), list(v)] for k, v in shapes.items()], **(extra or {})}
    (path / META_FILE).write_text(json.dumps(meta, indent=1))


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)`` of a checkpoint folder, without building the head."""
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    state = torch.load(path / HEAD_FILE, map_location="cpu", weights_only=True)
    return state, meta


def load_head(path: str | Path, *, device: str = "cpu"
              ) -> tuple[nn.Module, TrialConfig, dict[str, Any]]:
    """Rebuild a head from a checkpoint folder.

    :return: ``(head in eval mode on device, its TrialConfig, {"meta", "state"})``; a live
        head (DifFeed) is rebuilt around its U-Net, loaded on ``device``.
    """
    state, meta = read_checkpoint(path)
    cfg = TrialConfig.from_dict(meta["config"])
    shapes = {tuple(k): tuple(v) for k, v in meta["shapes"]}
    unet = None
    if head_kind(cfg.head).live_unet:
        unet = shared_unet(cfg.model, cfg.checkpoint, device)
    head = build_head(cfg, shapes, meta["num_classes"], unet=unet)
    head.load_state_dict(state["head"])
    return head.to(device).eval(), cfg, {"meta": meta, "state": state}


def save_epoch(path: str | Path, ep: Epoch) -> None:
    """A trial's checkpoint after epoch ``ep``: its best head as a plain head (a single head
    with its optimizer and scheduler, to resume it); a grid's adds :data:`GRID_FILE`. With
    rungs over images, ``meta.json`` names the rung (``image_rung``) the epoch is of."""
    grid = ep.grid
    rung = {RUNG_KEY: ep.rung.index} if ep.rung is not None else {}
    if ep.spec is None:
        save_head(path, ep.best_head(), ep.config, epoch=ep.epoch, shapes=grid.shapes,
                  num_classes=grid.num_classes, optimizer=ep.optimizer,
                  scheduler=ep.scheduler, extra=rung)
        return
    save_head(path, ep.best_head(), ep.config, epoch=ep.epoch, shapes=grid.shapes,
              num_classes=grid.num_classes,
              extra={GRID_BEST: ep.metrics[GRID_BEST], GRID_INDEX: ep.best, **rung})
    torch.save(ep.resume_state(), Path(path) / GRID_FILE)


def read_resume_state(path: str | Path) -> dict[str, Any] | None:
    """The grid state saved in a checkpoint folder, or None if it holds a single head."""
    f = Path(path) / GRID_FILE
    if not f.is_file():
        return None
    return torch.load(f, map_location="cpu", weights_only=True)


def read_resume(path: str | Path, *, grid: bool) -> dict[str, Any]:
    """What a trial resumes from in its checkpoint folder (an
    :meth:`~difftune.trainables.train.loop.Epoch.resume_state`): a grid's :data:`GRID_FILE`,
    or a single head's ``head.pt`` as a grid of one; ``rung``: the rung over images it is
    of (0 without rungs)."""
    if grid:
        state = read_resume_state(path)
        if state is None:
            raise RuntimeError("the checkpoint to resume this grid trial from holds no grid "
                               f"state ({GRID_FILE})")
        rung = json.loads((Path(path) / META_FILE).read_text()).get(RUNG_KEY, 0)
        return {**state, "rung": int(rung)}
    state, meta = read_checkpoint(path)
    return {"epoch": int(meta["epoch"]), "rung": int(meta.get(RUNG_KEY, 0)),
            "heads": {f"heads.0.{k}": v for k, v in state["head"].items()},
            "optimizer": state.get("optimizer"), "scheduler": state.get("scheduler")}
