"""What running a U-Net costs per image, counted on its real architecture without weights:
the model is built on PyTorch's meta device from its flags, and one image is passed through
it under ``torch.utils.flop_counter.FlopCounterMode``, block by block (the paper's
numbering). Nothing is allocated, so even ``paper256`` costs no memory and a fraction of a
second.

GFLOPs count a multiply-add as 2 FLOPs (the flop counter's convention), forward pass only.

What a trial reports as ``gflops`` (:func:`difftune.trainables.trial.trial_gflops`) is the
U-Net passes its features need per image (:func:`gflops_to`) plus its head, the head too
built on the meta device (:func:`module_gflops`).

The same meta-device pass, watched by :class:`LiveBytes`, gives the peak bytes of the
tensors alive during an extraction (:func:`activation_bytes`): what a batch of images costs
in device memory on top of the weights, and so how large a batch fits
(:func:`batch_for_memory`). What a stored feature costs on disk is :func:`entry_bytes`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from difftune.trainables.model.features import (
    PRECISIONS,
    Extractor,
    block_modules,
    run_blocks,
    timestep_embedding,
)
from difftune.trainables.model.unet import build, full_flags, resolve

#: bytes of a stored row besides its features: the int64 dataset index and int64 label
ROW_OVERHEAD = 16
#: the largest extraction batch chosen automatically
MAX_BATCH = 256


@dataclass(frozen=True)
class BlockCost:
    """One block of a U-Net at batch 1.

    :param block: its number (1..N).
    :param channels: channels of its output map.
    :param side: side of its (square) output map.
    :param gflops: GFLOPs of this block alone, per image.
    :param gflops_to: GFLOPs of a forward pass that stops after this block (the time
        embedding and blocks 1..block), per image: what extracting it with early exit costs.
    """

    block: int
    channels: int
    side: int
    gflops: float
    gflops_to: float

    @property
    def map_elements(self) -> int:
        """Elements of the block's full output map per image."""
        return self.channels * self.side * self.side


@functools.lru_cache(maxsize=16)
def _costs(flags_json: str) -> tuple[BlockCost, ...]:
    flags = json.loads(flags_json)
    with torch.device("meta"):
        model, _ = build(flags)
    size = int(flags["image_size"])
    x = torch.zeros(1, 3, size, size, device="meta")
    ts = torch.zeros(1, dtype=torch.long, device="meta")
    shapes: dict[int, tuple[int, int]] = {}
    per_block: dict[int, float] = {}
    counter = FlopCounterMode(display=False)
    state = {"last": 0}

    def on_block(b: int, h: torch.Tensor) -> None:
        total = counter.get_total_flops()
        per_block[b] = total - state["last"]
        state["last"] = total
        shapes[b] = (int(h.shape[1]), int(h.shape[-1]))

    with counter, torch.no_grad():
        run_blocks(model, x, ts, upto=len(block_modules(model)), on_block=on_block)
    embed = _embedding_flops(model, ts)  # counted with block 1 above: keep it apart
    out, cum = [], float(embed)
    for b in sorted(per_block):
        alone = per_block[b] - (embed if b == 1 else 0)
        cum += alone
        out.append(BlockCost(block=b, channels=shapes[b][0], side=shapes[b][1],
                             gflops=alone / 1e9, gflops_to=cum / 1e9))
    return tuple(out)


def _embedding_flops(model: torch.nn.Module, ts: torch.Tensor) -> float:
    """FLOPs of the time embedding (run once per forward pass, before block 1)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.time_embed(timestep_embedding(ts, model.model_channels))
    return counter.get_total_flops()


def unet_costs(flags: dict[str, Any]) -> dict[int, BlockCost]:
    """Block number -> :class:`BlockCost` of the U-Net built from ``flags`` (partial flags are
    completed with guided-diffusion's defaults)."""
    full = full_flags(flags)
    full["use_fp16"] = False
    return {c.block: c for c in _costs(json.dumps(full, sort_keys=True))}


def model_costs(name_or_path: str, checkpoint: str | None = None) -> dict[int, BlockCost]:
    """:func:`unet_costs` of a model by name (``demo``, ``paper256``, a checkpoint path);
    only its flags are read."""
    flags, _ = resolve(name_or_path, checkpoint=checkpoint)
    return unet_costs(flags)


def gflops_to(costs: dict[int, BlockCost], blocks: list[int] | tuple[int, ...]) -> float:
    """GFLOPs per image of one forward pass that serves ``blocks`` (it stops after the
    deepest of them)."""
    return costs[max(blocks)].gflops_to if blocks else 0.0


def module_gflops(module: torch.nn.Module, inputs: Any) -> float:
    """GFLOPs of one forward of ``module`` on ``inputs`` (per call, as given)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(inputs)
    return counter.get_total_flops() / 1e9


# ------------------------------------------------------------------------- memory and disk


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that operations create while the mode is active
    (inputs made before it are not counted). A storage counts from the operation that made
    it until the last tensor using it is gone; the peak is read after every operation, when
    its inputs and outputs are alive together. Works on the meta device, where nothing is
    allocated."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self._live:
                    self._live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]
        return out


@functools.lru_cache(maxsize=64)
def _extraction_peak(flags_json: str, upto: int, batch: int, precision: str) -> int:
    flags = json.loads(flags_json)
    with torch.device("meta"):
        model, diffusion = build(flags)
    model.eval().requires_grad_(False)
    dtype = PRECISIONS[precision]
    if dtype != torch.float32:  # what autocast does to the activations, near enough
        model.to(dtype)
        model.dtype = dtype
    size = int(flags["image_size"])
    x0 = torch.zeros(batch, 3, size, size, device="meta")
    counter = LiveBytes()
    with counter:
        Extractor(model, diffusion, precision="fp32").extract(
            x0, 0, {upto: 1}, indices=list(range(batch)))
    return counter.peak


def activation_bytes(flags: dict[str, Any], upto: int, *, precision: str = "fp32",
                     batch: int = 1) -> int:
    """Peak bytes of the activations of one extraction pass of ``batch`` images that stops
    after block ``upto`` (noise, the noised images, the time embedding, the current map and
    a block's intermediates, the encoder outputs kept for the decoder blocks that run, the
    pooled features), counted on the meta device.

    :param precision: ``fp32``, ``bf16`` or ``fp16`` (autocast on a GPU).
    """
    full = full_flags(flags)
    full["use_fp16"] = False
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; allowed: {list(PRECISIONS)}")
    return _extraction_peak(json.dumps(full, sort_keys=True), int(upto), int(batch), precision)


def activation_bytes_per_image(flags: dict[str, Any], upto: int, *, precision: str = "fp32"
                               ) -> tuple[int, int]:
    """``(per image, fixed)``: an extraction pass of ``n`` images to block ``upto`` peaks at
    ``fixed + n * per_image`` activation bytes (measured at 1 and 2 images)."""
    one = activation_bytes(flags, upto, precision=precision, batch=1)
    two = activation_bytes(flags, upto, precision=precision, batch=2)
    per_image = max(two - one, 1)
    return per_image, max(one - per_image, 0)


def batch_for_memory(free_bytes: int, per_image: int, fixed: int = 0, *, headroom: float = 0.7,
                     cap: int = MAX_BATCH) -> int:
    """The extraction batch that fits ``headroom`` of ``free_bytes`` (at least 1, at most
    ``cap``): ``(headroom * free - fixed) // per_image``."""
    fit = int((headroom * free_bytes - fixed) // max(per_image, 1))
    return max(1, min(cap, fit))


def free_memory(device: torch.device | str) -> int:
    """Bytes a new allocation can take on ``device``: the GPU's free memory
    (``torch.cuda.mem_get_info``) or the host's available memory (``MemAvailable``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def entry_bytes(rows: int, channels: int, pool: int, dtype: str = "float16") -> int:
    """Bytes of a cache entry of ``rows`` images of a ``channels x pool x pool`` map stored
    as ``dtype``: the features plus each row's index and label (:data:`ROW_OVERHEAD`); the
    Arrow file adds a few hundred bytes per record batch."""
    return int(rows) * (int(channels) * int(pool) ** 2 * np.dtype(dtype).itemsize + ROW_OVERHEAD)
