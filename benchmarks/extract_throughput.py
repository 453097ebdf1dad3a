"""Extraction throughput of the paper's 256x256 U-Net (random weights) on the device this
runs on: images per second of an extraction to block 24 (early exit) and of a full forward
pass (block 37), in fp32 and under bf16 autocast (on a GPU also bf16 with channels_last),
with the batch the activation estimate says fits the device (``--batch`` to force one).

Every repeat times all of them in turn on the same images (so drift and other load fall on
every arm alike); each ratio (full pass time / early exit time; fp32 time / bf16 time) is
taken per repeat, and reported as its mean with a 95 % bootstrap interval over the repeats,
beside each rate's. One warm-up pass per arm first (a batch on a GPU, an image on the CPU).

On a GPU: ``python -m benchmarks.extract_throughput --device cuda``. Without one it runs on
the CPU with a couple of images and says so in its row (``--images 2 --repeats 4``, the
defaults there).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch

from benchmarks._results import arguments, configure, mean_ci, record
from difftune.trainables.model.cost import (
    activation_bytes_per_image,
    batch_for_memory,
    free_memory,
    model_costs,
)
from difftune.trainables.model.features import Extractor
from difftune.trainables.model.unet import PAPER256_FLAGS, load_unet

logger = logging.getLogger("extract_throughput")
EARLY, FULL = 24, 37


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(ex: Extractor, x: torch.Tensor, block: int, batch: int) -> float:
    """Seconds to extract ``block`` (pool 2) from every image of ``x`` in batches of
    ``batch``."""
    sync(ex.device)
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        ex.extract(x[i:i + batch], 150, {block: 2})
    sync(ex.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__spec__, __doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, help="images per measurement (default: 2 on "
                        "the CPU, 4 batches on a GPU)")
    parser.add_argument("--batch", type=int, help="images per pass (default: what fits)")
    parser.add_argument("--repeats", type=int, help="default: 4 on the CPU, 10 on a GPU")
    args = parser.parse_args(argv)
    configure(verbose=True)
    device = torch.device(args.device)
    repeats = args.repeats or (4 if device.type == "cpu" else 10)
    torch.manual_seed(0)
    model, diffusion = load_unet("paper256", random_init=True, device=device)
    costs = model_costs("paper256")
    variants = [("fp32", False), ("bf16", False)]
    if device.type == "cuda":
        variants.append(("bf16", True))
    values: dict[str, object] = {"device": "cpu" if device.type == "cpu"
                                 else torch.cuda.get_device_name(device)}
    arms = {}
    for precision, channels_last in variants:
        name = precision + ("_cl" if channels_last else "")
        per_image, fixed = activation_bytes_per_image(PAPER256_FLAGS, FULL, precision=precision)
        batch = args.batch or batch_for_memory(free_memory(device), per_image, fixed)
        arms[name] = (precision, channels_last, batch)
    n = args.images or (2 if device.type == "cpu" else 4 * max(b for _, _, b in arms.values()))
    x = torch.rand(n, 3, 256, 256, device=device) * 2 - 1
    times: dict[tuple[str, int], list[float]] = {(a, b): [] for a in arms for b in (EARLY, FULL)}
    load_start = os.getloadavg()[0]
    for r in range(repeats + 1):  # round 0 warms every arm up (kernel selection), untimed
        for name, (precision, channels_last, batch) in arms.items():
            ex = Extractor(model, diffusion, precision=precision, channels_last=channels_last)
            batch = min(batch, n)
            for block in (EARLY, FULL):
                if r == 0:  # a GPU selects kernels per shape: the batch; the CPU: an image
                    ex.extract(x[:batch] if device.type == "cuda" else x[:1], 150, {block: 2})
                else:
                    times[(name, block)].append(seconds(ex, x, block, batch))
            if channels_last:  # back to the default layout for the next arm
                model.to(memory_format=torch.contiguous_format)
        if r:
            logger.info("repeat %d: %s", r, {f"{a}_b{b}": round(v[-1], 3)
                                              for (a, b), v in times.items()})
    for name, (_, _, batch) in arms.items():
        early = [n / s for s in times[(name, EARLY)]]
        full = [n / s for s in times[(name, FULL)]]
        ratio = [f / e for e, f in zip(times[(name, EARLY)], times[(name, FULL)], strict=True)]
        e_mean, e_lo, e_hi = mean_ci(early)
        f_mean, f_lo, f_hi = mean_ci(full)
        r_mean, r_lo, r_hi = mean_ci(ratio)
        values.update({f"{name}_batch": min(batch, n), f"{name}_b24_img_s": e_mean,
                       f"{name}_b24_lo": e_lo, f"{name}_b24_hi": e_hi,
                       f"{name}_full_img_s": f_mean, f"{name}_full_lo": f_lo,
                       f"{name}_full_hi": f_hi, f"{name}_b24_tflops":
                       e_mean * costs[EARLY].gflops_to / 1000,
                       f"{name}_b24_speedup": r_mean, f"{name}_b24_speedup_lo": r_lo,
                       f"{name}_b24_speedup_hi": r_hi})
    for block, label in ((EARLY, "b24"), (FULL, "full")):  # how many times faster bf16 is
        speed = [f / b for f, b in zip(times[("fp32", block)], times[("bf16", block)],
                                       strict=True)]
        mean, lo, hi = mean_ci(speed)
        values.update({f"bf16_speedup_{label}": mean, f"bf16_speedup_{label}_lo": lo,
                       f"bf16_speedup_{label}_hi": hi})
    values.update({"images": n, "repeats": repeats, "load_1min_start": load_start,
                   "load_1min_end": os.getloadavg()[0]})
    if device.type == "cpu":
        values["note"] = f"no_GPU:_CPU_run_with_{n}_images"
    record("extract_throughput", **values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
