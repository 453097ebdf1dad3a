"""P5: peak memory while training a head on a feature cache entry larger than RAM would
like. Writes a synthetic entry of ``--gb`` GB through the cache's own streaming writer (in
chunks, so writing needs no such RAM either), then trains a linear head on it through the
cache's reading path (memory-mapped Arrow, float16 -> float32 per item) with
``trainables.train.train_head``, sampling the process's RSS. Goal: peak RSS < 1.5 GB.

    python -m benchmarks.cache_memory [--gb 4] [--root /tmp/difftune-bench-cache] [--keep]
"""

from __future__ import annotations

import logging
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks._results import arguments, configure, record
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.cache.store import EntryKey
from difftune.trainables.config import TrialConfig
from difftune.trainables.heads import LinearHead
from difftune.trainables.train.loop import train_head

logger = logging.getLogger("cache_memory")
GB = 1e9


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples VmRSS every ``every`` seconds in a thread; ``peak`` since the last reset."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak = every, rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_bytes())

    def reset(self) -> int:
        peak, self.peak = max(self.peak, rss_bytes()), rss_bytes()
        return peak

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


def write_entry(cache: FeatureCache, key: EntryKey, rows: int, shape: tuple[int, int, int],
                means: np.ndarray, chunk: int, seed: int) -> None:
    """Rows of class-dependent Gaussian features, generated and written chunk by chunk."""
    rng = np.random.default_rng(seed)
    writer = cache.writer(key, shape)
    try:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            labels = rng.integers(0, len(means), n)
            x = rng.standard_normal((n, *shape), dtype=np.float32)
            x += means[labels]
            writer.write(np.arange(start, start + n), labels, x)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__spec__, __doc__)
    parser.add_argument("--gb", type=float, default=4.0, help="size of the training entry")
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--pool", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--val-rows", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=4096, help="rows generated per chunk")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--root", default="/tmp/difftune-bench-cache")
    parser.add_argument("--keep", action="store_true", help="keep the entry afterwards")
    args = parser.parse_args(argv)
    configure(verbose=True)

    shape = (args.channels, args.pool, args.pool)
    row_bytes = 2 * int(np.prod(shape))
    rows = int(args.gb * GB // row_bytes)
    means = np.random.default_rng(0).standard_normal((args.classes, *shape)).astype(np.float32)
    means *= 0.05
    shutil.rmtree(args.root, ignore_errors=True)
    cache = FeatureCache(args.root)
    keys = {split: EntryKey(model="synthetic", model_fp="synthetic", data="synthetic",
                            data_fp=f"rows{n}", split=split, image_size=0, t=0, seed=0, block=1,
                            pool=args.pool)
            for split, n in (("train", rows), ("val", args.val_rows))}
    sampler = PeakRSS()
    try:
        start = time.perf_counter()
        write_entry(cache, keys["train"], rows, shape, means, args.chunk, seed=1)
        write_entry(cache, keys["val"], args.val_rows, shape, means, args.chunk, seed=2)
        write_s = time.perf_counter() - start
        entry_bytes = sum(p.stat().st_size for p in Path(args.root).rglob("*.arrow"))
        write_peak = sampler.reset()
        logger.info("wrote %.2f GB (%d + %d rows) in %.1f s, peak RSS %.2f GB",
                    entry_bytes / GB, rows, args.val_rows, write_s, write_peak / GB)

        start = time.perf_counter()
        train = cache.open({(0, 1): (keys["train"], args.pool)})
        val = cache.open({(0, 1): (keys["val"], args.pool)})
        open_s = time.perf_counter() - start  # includes checking the sha256 of every row
        cfg = TrialConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-2)
        head = LinearHead((0, 1), shape, args.classes)
        start = time.perf_counter()
        history = train_head(head, train, val, cfg)
        train_s = time.perf_counter() - start
        train_peak = sampler.stop()
    finally:
        sampler._stop.set()
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logger.info("open+verify %.1f s, trained %d epoch(s) on %d rows in %.1f s: %s", open_s,
                args.epochs, rows, train_s, history[-1])
    record("cache_memory", entry_gb=entry_bytes / GB, rows=rows, row_dim=int(np.prod(shape)),
           write_s=write_s, verify_s=open_s, train_s=train_s, epochs=args.epochs,
           val_top1=history[-1]["val_top1"], write_peak_rss_gb=write_peak / GB,
           train_peak_rss_gb=train_peak / GB, ru_maxrss_gb=maxrss / GB,
           goal="peak_rss<1.5GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
