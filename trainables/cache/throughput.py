"""Extraction throughput as measured, recorded in the cache root (``throughput.json``) for
each model architecture, device kind and precision, so that ``difftune plan`` turns U-Net
image-passes into GPU-hours at what this kind of device really did.

A record is stored as GFLOP/s (images per second times the GFLOPs per image of the pass
measured), so that a rate measured to one block converts to another depth.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from typing import Any

import torch

from difftune.trainables.cache.store import Store
from difftune.trainables.model.unet import full_flags

logger = logging.getLogger(__name__)

FILE = "throughput.json"
#: effective GFLOP/s assumed when nothing was measured: an A10G (what cluster/aws.yaml
#: provisions) in bf16 at about a third of its 125 TFLOP/s tensor peak
DEFAULT_GFLOPS_PER_S = 40_000.0


def arch_key(flags: dict[str, Any]) -> str:
    """A short hash of a model's complete flags (its architecture; weights do not matter)."""
    full = full_flags(flags)
    full["use_fp16"] = False
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:12]


def device_kind(device: torch.device | str) -> str:
    """``NVIDIA A10G``-style name of a GPU, or ``cpu``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def read(store: Store) -> dict[str, dict[str, Any]]:
    """Every record of the cache root (empty when none)."""
    data = store.read_json(FILE)
    return data if isinstance(data, dict) else {}


def record(store: Store, *, model: str, flags: dict[str, Any], device: str, precision: str,
           images: int, seconds: float, gflops_per_image: float, upto: int) -> None:
    """Remember one measurement (the latest per model architecture, device kind and
    precision wins)."""
    if seconds <= 0 or images <= 0:
        return
    key = f"{arch_key(flags)}|{device}|{precision}"
    data = read(store)
    data[key] = {"model": model, "arch": arch_key(flags), "device": device,
                 "precision": precision, "images": images, "seconds": round(seconds, 3),
                 "img_per_s": images / seconds, "block": upto,
                 "gflops_per_s": images / seconds * gflops_per_image,
                 "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        store.put(FILE, json.dumps(data, indent=1, sort_keys=True).encode())
    except OSError as exc:  # a read-only cache still serves
        logger.debug("cannot record throughput in %s: %s", store.path(FILE), exc)


def best_record(store: Store, flags: dict[str, Any], *, device: str | None = None
                ) -> dict[str, Any] | None:
    """The latest record for the model of ``flags`` on a device whose name contains
    ``device`` (any GPU before the CPU when None), or None."""
    arch = arch_key(flags)
    found = [r for r in read(store).values() if r.get("arch") == arch
             and (device is None or device.lower() in str(r.get("device", "")).lower())]
    if not found:
        return None
    return max(found, key=lambda r: (r.get("device") != "cpu" if device is None else True,
                                     str(r.get("measured", ""))))
