"""Extraction throughput of the paper's 256x256 U-Net (random weights) on the device this
runs on: images per second of an extraction to block 24 (early exit) and of a full forward
pass (block 37), in fp32 and under bf16 autocast (on a GPU also bf16 with channels_last),
with the batch the activation estimate says fits the device (``--batch`` to force one).

On a GPU: ``python -m benchmarks.extract_throughput --device cuda``. Without one it runs on
the CPU with a couple of images and says so in its row (``--images 2``, the default there).
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from benchmarks._results import arguments, configure, record
from difftune.trainables.model.cost import (
    activation_bytes_per_image,
    batch_for_memory,
    free_memory,
    model_costs,
)
from difftune.trainables.model.features import Extractor
from difftune.trainables.model.unet import PAPER256_FLAGS, load_unet

logger = logging.getLogger("extract_throughput")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(ex: Extractor, x: torch.Tensor, block: int, batch: int, repeats: int) -> float:
    """Images per second extracting ``block`` (pool 2) from ``x`` in batches of ``batch``;
    one warm-up batch first (kernel selection), the best of ``repeats`` passes over ``x``."""
    ex.extract(x[:batch], 150, {block: 2})
    best = float("inf")
    for _ in range(repeats):
        sync(ex.device)
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            ex.extract(x[i:i + batch], 150, {block: 2})
        sync(ex.device)
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__spec__, __doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, help="images per measurement (default: 2 on "
                        "the CPU, 4 batches on a GPU)")
    parser.add_argument("--batch", type=int, help="images per pass (default: what fits)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    configure(verbose=True)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, diffusion = load_unet("paper256", random_init=True, device=device)
    costs = model_costs("paper256")
    variants = [("fp32", False), ("bf16", False)]
    if device.type == "cuda":
        variants.append(("bf16", True))
    values: dict[str, object] = {"device": "cpu" if device.type == "cpu"
                                 else torch.cuda.get_device_name(device)}
    for precision, channels_last in variants:
        name = precision + ("_cl" if channels_last else "")
        ex = Extractor(model, diffusion, precision=precision, channels_last=channels_last)
        per_image, fixed = activation_bytes_per_image(PAPER256_FLAGS, 37, precision=precision)
        batch = args.batch or batch_for_memory(free_memory(device), per_image, fixed)
        n = args.images or (2 if device.type == "cpu" else 4 * batch)
        batch = min(batch, n)
        x = torch.rand(n, 3, 256, 256, device=device) * 2 - 1
        early = rate(ex, x, 24, batch, args.repeats)
        full = rate(ex, x, 37, batch, args.repeats)
        logger.info("%s: batch %d, %d images: %.3g img/s to block 24, %.3g img/s full", name,
                    batch, n, early, full)
        values.update({f"{name}_batch": batch, f"{name}_b24_img_s": early,
                       f"{name}_full_img_s": full, f"{name}_b24_tflops":
                       early * costs[24].gflops_to / 1000})
        if channels_last:  # back to the default layout for anything after
            model.to(memory_format=torch.contiguous_format)
    # how many times faster: stopping at block 24 than a full pass; bf16 than fp32
    values["b24_speedup_fp32"] = values["fp32_b24_img_s"] / values["fp32_full_img_s"]
    values["bf16_speedup_b24"] = values["bf16_b24_img_s"] / values["fp32_b24_img_s"]
    values["images"] = n
    if device.type == "cpu":
        values["note"] = f"no_GPU:_CPU_run_with_{n}_images"
    record("extract_throughput", **values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
