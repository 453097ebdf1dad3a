"""How a search's cost grows with the images (1k, 10k, 100k): wall time per image and peak
memory of each stage, beside its limit on this machine. Growth should be linear (the same
cost per image at every size, memory that does not grow with the images); the row gives each
stage's wall and memory at every size, its cost per image as the slope between the two
largest sizes (``*_us``: what one more image costs, without the stage's fixed cost), and that
slope over the slope between the two smallest (``*_growth``: 1 when linear).

Data: ImageFolder trees (``train/`` with N images, ``val/`` and ``test/`` with 10 each) of
generated 32 px PNGs (scikit-learn's digits upsampled, with fresh Gaussian noise per image,
so no two files are the same), written once under ``--data`` (default /tmp).

Stages, each in a fresh process, after what a search pays once (the model, the image reader)
is loaded; a stage's memory is its peak RSS over its RSS when it starts:

- ``fingerprint``: the driver's one walk of the data (:func:`files_fingerprint`, paths and
  sizes), and ``content`` (the bytes too, ``--data-hash content``);
- ``decode``: reading and decoding the train images as a miss does (the images' limit);
- ``extract``: a cache miss of the demo U-Net's block 10 at t 90, pool 2 (decode + U-Net +
  Arrow write); its compute limit is the U-Net's GFLOPs per image over a measured float32
  matmul rate;
- ``epoch``: one epoch of a linear head on that cached entry (memory-mapped Arrow); its limit
  is the entry's bytes per image over the measured read rate of a file (cold: evicted from
  the page cache first with ``posix_fadvise``; warm: read again).

The search driver's own overhead per trial does not depend on the images (its one pass over
them is the fingerprint) and is not measured here.

    python -m benchmarks.scaling [--sizes 1000,10000,100000] [--extract-sizes ...]
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks._results import arguments, configure, record

logger = logging.getLogger("scaling")
REQ = (90, 10, 2)  # (t, block, pool) of the demo U-Net
IMAGE_PX = 32


def label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def make_folder(root: Path, n: int, *, seed: int = 0) -> Path:
    """``root`` as an ImageFolder of ``n`` train PNGs (10 classes) and 10 val / 10 test
    ones, written once (a ``.done`` file marks a finished tree)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / ".done").is_file():
        return root
    digits = load_digits()
    rng = np.random.default_rng(seed)
    up = IMAGE_PX // 8
    by_class = [np.flatnonzero(digits.target == c) for c in range(10)]
    for split, count in (("train", n), ("val", 10), ("test", 10)):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(count):  # classes in turn: every class in every split
            k = rng.choice(by_class[i % 10])
            img = np.kron(digits.images[k] / 16.0, np.ones((up, up)))
            img = np.clip(img + rng.normal(0, 0.1, img.shape), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(
                root / split / str(digits.target[k]) / f"{i:06d}.png")
    (root / ".done").write_text(str(n))
    return root


def status_bytes(field: str) -> int:
    """A size from ``/proc/self/status`` (``VmRSS``: resident now; ``VmHWM``: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset this process's peak RSS (``VmHWM``) to its RSS now (``/proc/self/clear_refs``);
    returns the RSS. (``ru_maxrss`` would not do: Linux carries it across the exec that
    starts a spawned child, so it holds the parent's RSS.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def stage(name: str, root: str, cache_root: str) -> dict[str, float]:
    """One stage on the data at ``root`` (run in a fresh process): seconds, peak RSS growth."""
    from torch.utils.data import DataLoader

    from difftune.trainables.cache.feature_cache import FeatureCache
    from difftune.trainables.config import TrialConfig
    from difftune.trainables.data.datasets import load_dataset
    from difftune.trainables.data.fingerprint import files_fingerprint
    from difftune.trainables.heads import LinearHead
    from difftune.trainables.model.unet import shared_unet
    from difftune.trainables.train.loop import train_head

    t, block, pool = REQ
    cfg = TrialConfig(model="demo", data=root, block=block, t=t, pool=pool, epochs=1,
                      batch_size=64, lr=0.05, momentum=0.9)
    files = {s: files_fingerprint(root, s) for s in ("train", "val")} \
        if name in ("extract", "epoch") else {}
    cache = FeatureCache(cache_root, data_files=files)
    # what a search pays once, not per image: the model and the image reader, loaded first
    shared_unet("demo", None, "cpu")
    load_dataset(root, split="val", image_size=16)
    if name == "epoch":
        train = cache.get(cfg, "train", [REQ])
        val = cache.get(cfg, "val", [REQ])
        head = LinearHead((t, block), train.shapes()[(t, block)], 10)
    start_rss = reset_peak()
    start = time.perf_counter()
    rows = 0
    if name in ("fingerprint", "content"):
        files_fingerprint(root, "train", data_hash="size" if name == "fingerprint" else "content")
    elif name == "decode":
        ds, _ = load_dataset(root, split="train", image_size=16)
        for x, _ in DataLoader(ds, batch_size=256):
            rows += len(x)
    elif name == "extract":
        rows = len(cache.get(cfg, "train", [REQ]))
    elif name == "epoch":
        train_head(head, train, val, cfg)
        rows = len(train)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    return {"s": seconds, "mb": max(peak - start_rss, 0) / 1e6, "rows": rows}


def in_child(name: str, root: Path, cache_root: Path) -> dict[str, float]:
    """:func:`stage` in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(stage, name, str(root), str(cache_root)).result()


def matmul_gflop_s(size: int = 1024, reps: int = 20) -> float:
    """float32 matmul GFLOP/s with torch's threads (the U-Net's compute limit)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size ** 3 * reps / (time.perf_counter() - start) / 1e9


def read_mb_s(path: Path, mb: int = 256) -> tuple[float, float]:
    """``(cold, warm)`` MB/s reading a file of ``mb`` MB: cold after evicting its pages from
    the page cache (``posix_fadvise DONTNEED``; no other file is touched), warm right after."""
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    rates = []
    for cold in (True, False):
        with open(path, "rb", buffering=0) as f:
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while f.read(8 << 20):
                pass
            rates.append(mb * (1 << 20) / 1e6 / (time.perf_counter() - start))
    path.unlink()
    return rates[0], rates[1]


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--sizes", default="1000,10000,100000", help="train images per tree")
    ap.add_argument("--extract-sizes", help="sizes whose extract and epoch stages run "
                    "(default: every size)")
    ap.add_argument("--data", default="/tmp/difftune-scaling", help="where the trees live")
    ap.add_argument("--prepare", action="store_true", help="only write the trees")
    args = ap.parse_args()
    configure()
    sizes = [int(s) for s in args.sizes.split(",")]
    extract_sizes = [int(s) for s in (args.extract_sizes or args.sizes).split(",")]
    data = Path(args.data)
    roots = {}
    for n in sizes:
        start = time.perf_counter()
        roots[n] = make_folder(data / f"n{n}", n)
        logger.warning("tree of %d images ready in %.1f s", n, time.perf_counter() - start)
    if args.prepare:
        return
    import shutil

    from difftune.trainables.model.cost import ROW_OVERHEAD, model_costs

    load_start = os.getloadavg()[0]
    values: dict[str, object] = {"sizes": "/".join(label(n) for n in sizes)}
    walls: dict[str, dict[int, float]] = {}
    for n in sizes:
        cache_root = data / f"cache-n{n}"
        shutil.rmtree(cache_root, ignore_errors=True)
        names = ["fingerprint", "content", "decode"]
        names += ["extract", "epoch"] if n in extract_sizes else []
        for name in names:
            got = in_child(name, roots[n], cache_root)
            if got["rows"] not in (0, n):
                raise SystemExit(f"{name} at {n} images read {got['rows']} rows")
            walls.setdefault(name, {})[n] = got["s"]
            values[f"{name}_{label(n)}_s"] = got["s"]
            values[f"{name}_{label(n)}_mb"] = got["mb"]
            logger.warning("%s %d: %.2f s, +%.0f MB", name, n, got["s"], got["mb"])
        shutil.rmtree(cache_root, ignore_errors=True)
    for name, by_n in walls.items():  # marginal cost per image between consecutive sizes
        ns = sorted(by_n)
        steps = [(by_n[b] - by_n[a]) / (b - a) * 1e6 for a, b in itertools.pairwise(ns)]
        if steps:
            values[f"{name}_us"] = steps[-1]
        if len(steps) > 1:
            values[f"{name}_growth"] = steps[-1] / steps[0] if steps[0] > 0 else float("nan")
    rate = matmul_gflop_s()
    gflops = model_costs("demo")[REQ[1]].gflops_to
    channels = model_costs("demo")[REQ[1]].channels
    row_bytes = channels * REQ[2] ** 2 * 2 + ROW_OVERHEAD
    cold, warm = read_mb_s(data / "read-rate.bin")
    values.update({
        "matmul_gflop_s": rate, "unet_gflop_per_image": gflops,
        "extract_limit_us": gflops / rate * 1e6, "row_bytes": row_bytes,
        "read_cold_mb_s": cold, "read_warm_mb_s": warm,
        "epoch_limit_cold_us": row_bytes / (cold * 1e6) * 1e6,
        "epoch_limit_warm_us": row_bytes / (warm * 1e6) * 1e6,
        "extract_sizes": "/".join(label(n) for n in extract_sizes),
        "load_1min_start": load_start, "load_1min_end": os.getloadavg()[0],
        "driver_per_trial": "not_measured_(independent_of_images)"})
    record("scaling", **values)


if __name__ == "__main__":
    main()
