"""Host memory of loading the paper's U-Net and extracting with it, measured against what
difftune estimates: the weights (fp32, counted on the meta device) plus the activations of
the pass (:func:`~difftune.trainables.model.cost.activation_bytes`, the batch's).

A random-weights ``paper256`` checkpoint is saved once (``--checkpoint``, default under
/tmp). Each case runs in a fresh process; its peak RSS (``VmHWM``, reset when the case
starts) over its RSS then is what it cost:

- ``before``: the load as it was: the model built with random weights, the whole file read
  (``torch.load`` without mmap) and copied in, so the weights are held twice while loading;
- ``after``: :func:`~difftune.trainables.model.unet.load_unet` now: the model built on the
  meta device, the file memory-mapped and its tensors assigned as the weights (held once);

then one fp32 extraction: block 24 at batch 1 for both, and with the new load also the full
pass (block 37) at batch 1 and block 24 at batch 4, each beside its estimate.

    python -m benchmarks.extract_memory [--checkpoint /tmp/difftune-paper256-random.pt]
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks._results import arguments, configure, record
from benchmarks.scaling import reset_peak, status_bytes

logger = logging.getLogger("extract_memory")
GB = 1e9
#: (name, load, block, batch)
CASES = (("before_b24x1", "before", 24, 1), ("after_b24x1", "after", 24, 1),
         ("after_b37x1", "after", 37, 1), ("after_b24x4", "after", 24, 4))


def save_random(path: Path) -> None:
    """A random-weights paper256 checkpoint at ``path`` (a fresh process builds it)."""
    import torch

    from difftune.trainables.model.unet import PAPER256_FLAGS, build

    torch.manual_seed(0)
    model, _ = build(PAPER256_FLAGS)
    torch.save(model.state_dict(), path)


def case(model_name: str, load: str, checkpoint: str, block: int, batch: int
         ) -> dict[str, float]:
    """Load (the old or the new way), then extract ``block`` from ``batch`` images; peak
    RSS growth after the load and after the extraction, and their estimates."""
    import torch

    from difftune.trainables.model.cost import activation_bytes
    from difftune.trainables.model.features import Extractor
    from difftune.trainables.model.unet import build, load_unet, resolve

    flags = resolve(model_name, checkpoint=checkpoint)[0]
    size = int(flags["image_size"])
    x = torch.rand(batch, 3, size, size) * 2 - 1
    start = reset_peak()
    began = time.perf_counter()
    if load == "before":  # load_unet as it was
        model, diffusion = build(flags)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        del state
        model.eval().requires_grad_(False)
    else:
        model, diffusion = load_unet(model_name, checkpoint=checkpoint)
    load_s = time.perf_counter() - began
    load_peak = status_bytes("VmHWM") - start
    Extractor(model, diffusion, precision="fp32").extract(x, 150, {block: 2},
                                                          indices=range(batch))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"load_s": load_s, "load_gb": load_peak / GB,
            "peak_gb": (status_bytes("VmHWM") - start) / GB, "weights_gb": weights / GB,
            "estimate_gb": (weights + activation_bytes(flags, block, batch=batch)) / GB}


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--checkpoint", default="/tmp/difftune-paper256-random.pt")
    ap.add_argument("--model", choices=("paper256", "demo"), default="paper256",
                    help="demo: a check in seconds (its own checkpoint, blocks 13 and 19)")
    args = ap.parse_args()
    configure()
    from difftune.trainables.model.unet import DEMO_CHECKPOINT

    demo = args.model == "demo"
    ckpt = DEMO_CHECKPOINT if demo else Path(args.checkpoint)
    blocks = {24: 13, 37: 19} if demo else {24: 24, 37: 37}
    ctx = multiprocessing.get_context("spawn")
    if not ckpt.is_file():
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            pool.submit(save_random, ckpt).result()
    values: dict[str, object] = {"model": args.model, "checkpoint_gb": ckpt.stat().st_size / GB}
    for name, load, block, batch in CASES:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            got = pool.submit(case, args.model, load, str(ckpt), blocks[block], batch).result()
        logger.warning("%s: %s", name, {k: round(v, 3) for k, v in got.items()})
        values.update({f"{name}_load_gb": got["load_gb"], f"{name}_peak_gb": got["peak_gb"],
                       f"{name}_estimate_gb": got["estimate_gb"],
                       f"{name}_peak_over_estimate": got["peak_gb"] / got["estimate_gb"]})
        if name.endswith("b24x1"):
            values[f"{name.split('_')[0]}_load_s"] = got["load_s"]
    values["peak_ratio_before_after"] = (values["before_b24x1_peak_gb"]
                                         / values["after_b24x1_peak_gb"])
    values.update({"device": "cpu", "precision": "fp32", "threads": os.cpu_count(),
                   "rss": "VmHWM_over_start"})
    record("extract_memory", **values)


if __name__ == "__main__":
    main()
