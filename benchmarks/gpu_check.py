"""The checks a lent GPU is for, as one prepared script: ``python -m benchmarks.gpu_check``.

On the GPU: the paper's U-Net (``paper256``, random weights, 256 px) in fp32 and under bf16
autocast, a full pass (block 37) against early exit at block 24, the batch sized from the
free device memory (:func:`~difftune.trainables.model.cost.batch_for_memory` of
:func:`~difftune.trainables.model.cost.free_memory`), each pass's peak device memory beside
the estimate (weights + activations); bf16 features against fp32 ones; a cache miss through
the feature cache on the device (bf16, stored float16; the model loaded from a saved random
checkpoint, memory-mapped) read back against fp32 features; and a 3-trial search of the demo
with ``gpus_per_trial: 0.5`` (two trials share the GPU).

``--small`` runs the same steps on the CPU in seconds: the demo U-Net (early exit at block
13 of 19), bf16 autocast on the CPU (the same dtype paths through the block hooks, the
pooling and the float16 cache store a GPU run takes), a 3-trial search without GPUs.

The row says ``ok=True`` when bf16 features are within ``--tol`` (relative L2 error) of fp32
ones, the cache entry holds float16 written by a bf16 pass, and the search finished its 3
trials, extracting in the device's precision (bf16 on a GPU); otherwise the script exits 1.
``--json PATH`` also writes the values; ``--no-record`` leaves RESULTS.md alone (the tests).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks._results import arguments, configure, record

logger = logging.getLogger("gpu_check")

SETUPS = {
    "full": {"model": "paper256", "early": 24, "full": 37, "device": "cuda", "batches": 2,
             "images": None, "gpus_per_trial": 0.5},
    "small": {"model": "demo", "early": 13, "full": 19, "device": "cpu", "batches": 1,
              "images": 32, "gpus_per_trial": None},
}
T = 150

SPACE = """
model: demo
data: digits
search: {{trials: 3, seed: 0, max_concurrent: 2, grace_period: 2, cpus_per_trial: 1,
          max_failures: 0, cache_pool: 2}}
fixed: {{head: linear, epochs: 2, batch_size: 64, optimizer: sgd, momentum: 0.9, step_size: 3}}
params:
  block: {{choice: [7, 10]}}
  t: {{choice: [50, 90]}}
  lr: {{float: [0.01, 0.1], log: true}}
"""


def rel_err(a, b) -> float:
    """``||a - b|| / ||a||`` over every element (float32)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def cache_groups(root: Path) -> list[str]:
    """Names of the entry groups under a cache root (``t{t}-s{seed}-{precision}[-v{view}]``,
    :class:`~difftune.trainables.cache.store.EntryKey`)."""
    return [p.name for p in root.glob("*/*/t*-s*-*") if p.is_dir()]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def passes(model, diffusion, setup: dict, device) -> dict[str, object]:
    """fp32 and bf16, early exit and full pass: images/s, batch, device memory; bf16 vs fp32
    features of the early block."""
    import torch

    from difftune.trainables.model.cost import (
        activation_bytes_per_image,
        batch_for_memory,
        free_memory,
    )
    from difftune.trainables.model.features import Extractor
    from difftune.trainables.model.unet import resolve

    flags = resolve(setup["model"])[0]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    size = model.image_size
    out: dict[str, object] = {"weights_gb": weights / 1e9}
    feats = {}
    for precision in ("fp32", "bf16"):
        ex = Extractor(model, diffusion, precision=precision)
        per_image, fixed = activation_bytes_per_image(flags, setup["full"], precision=precision)
        batch = batch_for_memory(free_memory(device), per_image, fixed)
        n = setup["images"] or setup["batches"] * batch
        batch = min(batch, n)
        gen = torch.Generator().manual_seed(0)
        x = (torch.rand(n, 3, size, size, generator=gen) * 2 - 1).to(device)
        feats[precision] = ex.extract(x[:batch], T, {setup["early"]: 2},
                                      indices=range(batch))[setup["early"]].cpu()
        for name, block in (("early", setup["early"]), ("full", setup["full"])):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            for i in range(0, n, batch):
                ex.extract(x[i:i + batch], T, {block: 2}, indices=range(i, i + len(x[i:i + batch])))
            sync(device)
            out[f"{precision}_{name}_img_s"] = n / (time.perf_counter() - start)
            if device.type == "cuda":
                per, fix = activation_bytes_per_image(flags, block, precision=precision)
                out[f"{precision}_{name}_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                out[f"{precision}_{name}_estimate_gb"] = (weights + fix + batch * per) / 1e9
        out[f"{precision}_batch"] = batch
        out[f"{precision}_early_speedup"] = (out[f"{precision}_early_img_s"]
                                             / out[f"{precision}_full_img_s"])
    out["images"] = n
    out["bf16_rel_err"] = rel_err(feats["fp32"], feats["bf16"])
    return out


def cache_check(setup: dict, device, work: Path, checkpoint: str | None) -> dict[str, object]:
    """A cache miss on the device in bf16: the entry's dtype and precision, and its stored
    features against an fp32 extraction of the same images with the same noise."""
    import numpy as np
    import torch

    from difftune.trainables.cache.feature_cache import FeatureCache
    from difftune.trainables.config import TrialConfig
    from difftune.trainables.data.datasets import dataset_indices
    from difftune.trainables.model.features import Extractor
    from difftune.trainables.model.unet import shared_unet
    from difftune.trainables.pipeline import trial_dataset

    cfg = TrialConfig(model=setup["model"], checkpoint=checkpoint, data="digits",
                      block=setup["early"], t=T, pool=2)
    cache = FeatureCache(str(work / "cache"), device=str(device), precision="bf16")
    start = time.perf_counter()
    served = cache.get(cfg, "train", [(T, setup["early"], 2)])
    seconds = time.perf_counter() - start
    entry = served.maps()[(T, setup["early"])]
    model, diffusion = shared_unet(cfg.model, cfg.checkpoint, str(device))
    ds, _ = trial_dataset(cfg, "train", model.image_size)
    n = min(16, len(ds))
    x0 = torch.stack([ds[i][0] for i in range(n)])
    ref = Extractor(model, diffusion, precision="fp32").extract(
        x0, T, {setup["early"]: 2}, indices=dataset_indices(ds)[:n], seed=cfg.noise_seed)
    stored = torch.from_numpy(entry.take(np.arange(n)).astype("float32"))
    groups = cache_groups(work / "cache")
    return {"cache_dtype": str(entry.dtype), "cache_rows": len(served),
            "cache_bf16_group": any(g.endswith("-bf16") for g in groups),
            "cache_rel_err": rel_err(ref[setup["early"]].cpu(), stored),
            "cache_miss_s": seconds}


def search_check(setup: dict, work: Path) -> dict[str, object]:
    """A 3-trial search of the demo (``gpus_per_trial`` 0.5 on a GPU): trials finished,
    most trials running at once, the precision its cache entries were extracted in."""
    import ray
    from mlflow.tracking import MlflowClient

    from difftune.search.cli import main

    space = work / "space.yaml"
    space.write_text(SPACE.format())
    uri = f"sqlite:///{work}/mlflow.db"
    argv = ["search", "--space", str(space), "--experiment", "gpu_check", "--tracking-uri",
            uri, "--storage", str(work / "runs"), "--cache", str(work / "search-cache")]
    if setup["gpus_per_trial"]:
        argv += ["--gpus-per-trial", str(setup["gpus_per_trial"])]
    if not ray.is_initialized():
        ray.init(num_cpus=min(os.cpu_count() or 2, 4), include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    start = time.perf_counter()
    try:
        rc = main(argv)
    finally:
        ray.shutdown()
    seconds = time.perf_counter() - start
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("gpu_check")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=100)
            if r.data.tags.get("difftune.role") == "trial"]
    spans = [(r.info.start_time, r.info.end_time or r.info.start_time) for r in runs]
    overlap = max((sum(s <= t < e for s, e in spans) for t, _ in spans), default=0)
    groups = {g.split("-")[2] for g in cache_groups(work / "search-cache")}
    return {"search_rc": rc, "trials_finished": sum(r.info.status == "FINISHED" for r in runs),
            "trials_at_once": overlap, "search_precision": "/".join(sorted(groups)),
            "search_s": seconds}


def check(mode: str, tol: float) -> dict[str, object]:
    """Every step of ``mode`` (``full`` or ``small``); the values of the row."""
    import torch

    from difftune.trainables.model.features import precision_for
    from difftune.trainables.model.unet import load_unet

    setup = SETUPS[mode]
    device = torch.device(setup["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run with --small (the CPU check), or on a GPU")
    values: dict[str, object] = {"mode": mode, "device": torch.cuda.get_device_name(device)
                                 if device.type == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        torch.manual_seed(0)
        random_init = setup["model"] == "paper256"
        model, diffusion = load_unet(setup["model"], random_init=random_init, device=device)
        values.update(passes(model, diffusion, setup, device))
        checkpoint = None
        if random_init:  # the cache loads the model by name: a checkpoint of these weights
            checkpoint = str(work / "paper256_random.pt")
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, checkpoint)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        values.update(cache_check(setup, device, work, checkpoint))
        values.update(search_check(setup, work))
    values["tol"] = tol
    trial_precision = precision_for(device)  # what the search's trials extract in
    values["ok"] = (values["bf16_rel_err"] < tol and values["cache_rel_err"] < tol
                    and values["cache_dtype"] == "float16" and values["cache_bf16_group"]
                    and values["trials_finished"] == 3
                    and values["search_precision"] == trial_precision)
    return values


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--small", action="store_true", help="the CPU check (demo U-Net, seconds)")
    ap.add_argument("--tol", type=float, default=0.02,
                    help="largest relative L2 error of bf16 (and stored) features to fp32")
    ap.add_argument("--json", help="also write the values to this file")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)
    configure()
    warnings.filterwarnings("ignore", category=FutureWarning)
    values = check("small" if args.small else "full", args.tol)
    if args.json:
        Path(args.json).write_text(json.dumps(values, indent=1))
    if args.no_record:
        print(json.dumps(values), flush=True)
    else:
        record("gpu_check", **values)
    return 0 if values["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
