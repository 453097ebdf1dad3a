"""What running a U-Net costs per image, counted on its real architecture without weights:
the model is built on PyTorch's meta device from its flags, and one image is passed through
it under ``torch.utils.flop_counter.FlopCounterMode``, block by block (the paper's
numbering). Nothing is allocated, so even ``paper256`` costs no memory and a fraction of a
second.

GFLOPs count a multiply-add as 2 FLOPs (the flop counter's convention), forward pass only.

:func:`trial_gflops` is what a trial reports as ``gflops``: the U-Net passes its features
need per image plus its head, the head too built on the meta device.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .features import block_modules, run_blocks


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
    from .unet import build

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
    from .features import timestep_embedding

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.time_embed(timestep_embedding(ts, model.model_channels))
    return counter.get_total_flops()


def unet_costs(flags: dict[str, Any]) -> dict[int, BlockCost]:
    """Block number -> :class:`BlockCost` of the U-Net built from ``flags`` (partial flags are
    completed with guided-diffusion's defaults)."""
    from .unet import full_flags

    full = full_flags(flags)
    full["use_fp16"] = False
    return {c.block: c for c in _costs(json.dumps(full, sort_keys=True))}


def model_costs(name_or_path: str, checkpoint: str | None = None) -> dict[int, BlockCost]:
    """:func:`unet_costs` of a model by name (``demo``, ``paper256``, a checkpoint path);
    only its flags are read."""
    from .unet import resolve

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


def trial_gflops(cfg, shapes: dict[tuple[int, int], tuple[int, int, int]],
                 num_classes: int) -> float:
    """GFLOPs per image of what a trial of ``cfg`` computes at inference: one U-Net pass per
    timestep it reads, stopped after the deepest block it reads, plus its head on the maps
    of ``shapes`` ((t, block) -> (C, p, p)). A head that runs the U-Net itself (DifFeed) is
    counted whole: its passes are part of its forward.

    Counted on the meta device (nothing is allocated, the global random state is left as it
    was).
    """
    from .heads import build_head, head_kind
    from .unet import full_flags, resolve

    kind = head_kind(cfg.head)
    flags, _ = resolve(cfg.model, checkpoint=cfg.checkpoint)
    with torch.random.fork_rng(), torch.device("meta"):
        if kind.live_unet:
            from .unet import build

            full = {**full_flags(flags), "use_fp16": False}
            model, diffusion = build(full)
            head = build_head(cfg, shapes, num_classes, unet=(model, diffusion)).eval()
            size = int(full["image_size"])
            return module_gflops(head, {"image": torch.zeros(1, 3, size, size),
                                        "index": [0]})
        head = build_head(cfg, shapes, num_classes).eval()
        head_flops = module_gflops(head, {k: torch.zeros(1, *s) for k, s in shapes.items()})
    steps = len({t for t, _, _ in kind.requests(cfg)})
    return steps * gflops_to(unet_costs(flags), kind.blocks(cfg)) + head_flops
