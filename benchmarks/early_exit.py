"""P2: the cost of extracting a block at or before the middle of the U-Net (early exit)
against a full forward pass through all blocks, on the demo model and on the paper's
256x256 model (random weights, 1 image). Goal: ratio <= 0.6.

    python -m benchmarks.early_exit [--repeats 5] [--models demo,paper256] [--device cpu]
"""

from __future__ import annotations

import logging
import statistics
import sys
import time

import torch

from benchmarks._results import arguments, configure, record
from difftune.trainables.model.features import Extractor
from difftune.trainables.model.unet import load_unet

logger = logging.getLogger("early_exit")


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(name: str, repeats: int, device: str, t: int = 90) -> dict[str, float]:
    """Seconds (min over repeats) of an early-exit extraction of the middle block and of a
    full pass, and the median over repeats of their ratio."""
    torch.manual_seed(0)
    if name == "demo":
        model, diffusion = load_unet("demo", device=device)
        x = torch.rand(64, 3, 16, 16) * 2 - 1
    else:
        model, diffusion = load_unet(name, random_init=True, device=device)
        x = torch.rand(1, 3, model.image_size, model.image_size) * 2 - 1
    ex = Extractor(model, diffusion)
    n = ex.num_blocks
    middle = len(model.input_blocks) + 1
    dev = ex.device
    early = lambda: ex.extract(x, t, [middle], pool=1)  # noqa: E731
    full = lambda: ex.extract(x, t, [n], pool=1)  # noqa: E731 - runs blocks 1..n
    early(), full()  # warm up
    times: dict[str, list[float]] = {"early": [], "full": []}
    for i in range(repeats):
        for kind, fn in (("early", early), ("full", full)) if i % 2 == 0 else \
                (("full", full), ("early", early)):
            times[kind].append(timed(fn, dev))
        logger.info("%s repeat %d: early %.3f s, full %.3f s", name, i + 1, times["early"][-1],
                    times["full"][-1])
    # the pair of one repeat ran back to back: their ratio is robust to a machine whose load
    # changes between repeats; min times are the least disturbed ones
    ratios = [e / f for e, f in zip(times["early"], times["full"], strict=True)]
    return {"block": middle, "blocks": n, "images": len(x), "early_s": min(times["early"]),
            "full_s": min(times["full"]), "ratio": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__spec__, __doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="demo,paper256")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    configure(verbose=True)
    values: dict[str, object] = {}
    for name in args.models.split(","):
        r = measure(name, args.repeats, args.device)
        logger.info("%s: block %d of %d, early %.4f s vs full %.4f s (min), ratio %.3f", name,
                    r["block"], r["blocks"], r["early_s"], r["full_s"], r["ratio"])
        values.update({f"{name}_block": r["block"], f"{name}_early_s": r["early_s"],
                       f"{name}_full_s": r["full_s"], f"{name}_ratio": r["ratio"]})
    values.update(repeats=args.repeats, device=args.device, goal="<=0.6")
    record("early_exit", **values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
