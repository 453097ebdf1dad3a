"""Train a small unconditional guided-diffusion U-Net (the demo model) with guided-diffusion's
own ``training_losses``, on the ``train`` split only (without labels): no image of the
selection (val) or test split is ever seen by it. The shipped ``assets/demo_unet.pt`` was made
on the CPU by::

    OMP_NUM_THREADS=1 difftune pretrain --data digits --out trainables/assets/demo_unet.pt --steps 1000 --seed 0

(1,000 steps of 64 images from the 1,078 digits of the 60 % train split; 5 to 12 minutes on
one CPU core. ``--steps`` makes the run repeatable; ``--minutes`` depends on the machine.)
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from difftune.trainables.data.datasets import load_dataset
from difftune.trainables.model.unet import DEMO_CHECKPOINT, build, full_flags, read_flags

logger = logging.getLogger(__name__)

def demo_flags() -> dict[str, Any]:
    """The demo U-Net's flags (16 px, three levels, attention at 8x8 and 4x4; 19 blocks,
    middle = 10), as shipped beside its checkpoint."""
    return read_flags(DEMO_CHECKPOINT.with_suffix(".yaml"))


def pretrain(
    *,
    data: str = "digits",
    out: str | Path,
    flags: dict[str, Any] | None = None,
    minutes: float | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    ema: float = 0.999,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a U-Net on the train split of ``data`` and save its EMA weights + flags.

    :return: a summary (steps, final loss, parameter count, output paths).
    """
    if minutes is None and steps is None:
        raise ValueError("give --minutes or --steps")
    flags = full_flags(flags or demo_flags())
    torch.manual_seed(seed)
    model, diffusion = build(flags)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    ds, _ = load_dataset(data, split="train", image_size=flags["image_size"])
    x_all = torch.stack([ds[i][0] for i in range(len(ds))])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    deadline = time.monotonic() + 60 * minutes if minutes else float("inf")
    total = steps or 10**9
    bar = tqdm(total=steps, desc="pretrain", unit="step")
    step, loss_ema = 0, None
    while step < total and time.monotonic() < deadline:
        idx = torch.randint(len(x_all), (batch_size,), generator=g)
        x0 = x_all[idx]
        t = torch.randint(diffusion.num_timesteps, (batch_size,), generator=g)
        loss = diffusion.training_losses(model, x0, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema_model.parameters(), model.parameters(), strict=True):
                p_ema.mul_(ema).add_(p, alpha=1 - ema)
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_ema:.4f}")
    bar.close()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(ema_model.state_dict(), tmp)
    tmp.replace(out)
    saved_flags = {k: v for k, v in flags.items() if k != "use_fp16"}
    out.with_suffix(".yaml").write_text(yaml.safe_dump(saved_flags, sort_keys=True))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("pretrained %d steps, loss %.4f, %d parameters -> %s", step, loss_ema, n_params, out)
    return {"steps": step, "loss": loss_ema, "params": n_params, "out": str(out),
            "flags": str(out.with_suffix(".yaml"))}
