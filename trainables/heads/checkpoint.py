"""The head checkpoint format, the same for every head kind: a folder with ``head.pt`` (the
head's tensors, and optionally the optimizer and scheduler state to resume training) and
``meta.json`` (the trial config, the epoch, the class count and the feature shapes the head
was built for). Loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.trainables.config import TrialConfig
from difftune.trainables.heads import build_head, head_kind

HEAD_FILE = "head.pt"
META_FILE = "meta.json"


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
        from difftune.trainables.model.unet import shared_unet

        unet = shared_unet(cfg.model, cfg.checkpoint, device)
    head = build_head(cfg, shapes, meta["num_classes"], unet=unet)
    head.load_state_dict(state["head"])
    return head.to(device).eval(), cfg, {"meta": meta, "state": state}
