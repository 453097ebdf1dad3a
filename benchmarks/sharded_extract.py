"""Wall time of one timestep's extraction (train + val, the demo space's block set at its
cache_pool) on the demo U-Net and digits, as Ray tasks on 1 worker and on 2 workers (one
shard each, 1 CPU per worker), on a local Ray of 2 CPUs. Each run writes a fresh cache; a
warm-up run first starts the Ray workers and loads the model in them.

    python -m benchmarks.sharded_extract [--t 90] [--batch 64]
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from benchmarks._results import arguments, configure, record
from difftune.search.run.extract import Workers, ray_runner
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.cache.shard import extract_sharded
from difftune.trainables.config import TrialConfig

BLOCKS = range(1, 20)  # the demo space's block set
POOL = 4  # its cache_pool


def once(root: str, workers: int, t: int, batch: int, cfg: TrialConfig) -> tuple[float, int]:
    cache = FeatureCache(root, batch_size=batch, store_pool=POOL, extra_blocks=BLOCKS,
                         precision="fp32")
    runner = ray_runner(Workers(workers, {"num_cpus": 1}), progress=False)
    began, images = time.perf_counter(), 0
    for split in ("train", "val"):
        images += extract_sharded(cache, cfg, split, [(t, b, POOL) for b in BLOCKS],
                                  shards=workers, runner=runner)["images"]
    return time.perf_counter() - began, images


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--t", type=int, default=90)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    configure()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="sharded-extract-")
    try:
        once(f"{tmp}/warm", 2, args.t, args.batch, TrialConfig(label_fraction=0.05))
        wall = {}
        for n in (1, 2):
            wall[n], images = once(f"{tmp}/w{n}", n, args.t, args.batch, TrialConfig())
            print(f"{n} worker(s): {images} images in {wall[n]:.2f} s "
                  f"({images / wall[n]:.3g} img/s)", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    record("sharded_extract", workers=2, speedup=wall[1] / wall[2], wall_1=wall[1],
           wall_2=wall[2], images=images, t=args.t, blocks="1-19", pool=POOL,
           load=os.getloadavg()[0])


if __name__ == "__main__":
    main()
