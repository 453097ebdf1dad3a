"""Wall time of extracting 6 timesteps (train + val, the demo space's block set at its
cache_pool) on the demo U-Net and digits through a pool of workers that stay
(:class:`~difftune.search.run.extract.WorkerPool`: one Ray actor per worker, 1 CPU each,
holding the model and the data across every timestep and split; one work list), on 1 worker
and on 2, on a local Ray of 2 CPUs; each run writes a fresh cache with a fresh pool.
``speedup``: the extraction on a started pool whose workers have loaded the model and the
data (as a search's pool is at its second extraction, and as the Ray workers of the
warm-up run were before); ``speedup_cold``: counting the pool's start too (its actors'
imports, U-Net and dataset loads), as a one-off ``difftune extract --space`` pays it. A
warm-up run first starts Ray's worker processes. The machine may be shared: the row says
how many CPU seconds other processes used during each arm (``others_cpu_s_N``) and what the
hypervisor stole (``steal_s_N``), and the load before the run (``load_before``).

    python -m benchmarks.sharded_extract [--timesteps 30,90,150,210,270,330] [--batch 64]
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from benchmarks._results import arguments, configure, record
from difftune.search.run.extract import WorkerPool, Workers
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.cache.shard import extract_groups
from difftune.trainables.config import TrialConfig

BLOCKS = range(1, 20)  # the demo space's block set
POOL = 4  # its cache_pool


def cpu() -> tuple[float, float, dict[int, float]]:
    """CPU seconds so far: the machine's busy time (every process), the time the hypervisor
    stole from it (other machines on its host), and this run's own by process (this process
    and every process it started: Ray and its workers)."""
    import psutil

    t = psutil.cpu_times()
    own = {}
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            c = p.cpu_times()
            own[p.pid] = c.user + c.system
        except psutil.Error:  # ended meanwhile
            pass
    return t.user + t.nice + t.system + t.irq + t.softirq, getattr(t, "steal", 0.0), own


def once(root: str, workers: int, timesteps: list[int], batch: int, cfg: TrialConfig
         ) -> dict[str, object]:
    """One extraction on a fresh pool of ``workers``: ``cold`` (seconds from the pool's start),
    ``warm`` (from its workers having loaded the model and data), images, U-Net loads, and
    ``others`` / ``steal``: CPU seconds that processes outside this run used meanwhile, and
    that the hypervisor stole."""
    cache = FeatureCache(root, batch_size=batch, store_pool=POOL, extra_blocks=BLOCKS,
                         precision="fp32")
    busy, steal, own = cpu()
    began = time.perf_counter()
    with WorkerPool(Workers(workers, {"num_cpus": 1}), progress=False) as pool:
        pool.prepare(cfg, ("train", "val"), wait=True)
        ready = time.perf_counter()
        images = extract_groups(cache, cfg, ("train", "val"),
                                [(t, b, POOL) for t in timesteps for b in BLOCKS],
                                shards=workers, runner=pool.runner)["images"]
        end = time.perf_counter()
        loads = [s["loads"] for s in pool.stats()]
        busy2, steal2, own2 = cpu()  # before the pool's actors end
    return {"cold": end - began, "warm": end - ready, "images": images, "loads": loads,
            "others": busy2 - busy - sum(c - own.get(pid, 0.0) for pid, c in own2.items()),
            "steal": steal2 - steal}


def main() -> None:
    ap = arguments(__spec__, __doc__)
    ap.add_argument("--timesteps", default="30,90,150,210,270,330")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    configure()
    import ray

    timesteps = [int(t) for t in args.timesteps.split(",")]
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="sharded-extract-")
    load_before = os.getloadavg()[0]  # before this run added to it
    load = [load_before]
    try:
        once(f"{tmp}/warm", 2, timesteps[:1], args.batch, TrialConfig(label_fraction=0.05))
        run = {}
        for n in (1, 2):
            load.append(os.getloadavg()[0])
            run[n] = once(f"{tmp}/w{n}", n, timesteps, args.batch, TrialConfig())
            print(f"{n} worker(s): {run[n]['images']} images at {len(timesteps)} timesteps in "
                  f"{run[n]['warm']:.2f} s ({run[n]['images'] / run[n]['warm']:.3g} img/s), "
                  f"{run[n]['cold']:.2f} s with the pool's start; U-Net loads per worker "
                  f"{run[n]['loads']}; other processes used {run[n]['others']:.1f} CPU s "
                  f"meanwhile, the hypervisor stole {run[n]['steal']:.1f}", flush=True)
        load.append(os.getloadavg()[0])
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    record("sharded_extract", workers=2, timesteps=len(timesteps),
           speedup=run[1]["warm"] / run[2]["warm"], wall_1=run[1]["warm"],
           wall_2=run[2]["warm"], speedup_cold=run[1]["cold"] / run[2]["cold"],
           wall_cold_1=run[1]["cold"], wall_cold_2=run[2]["cold"], images=run[2]["images"],
           loads_per_worker=max(run[2]["loads"]), blocks="1-19", pool=POOL,
           others_cpu_s_1=run[1]["others"], others_cpu_s_2=run[2]["others"],
           steal_s_1=run[1]["steal"], steal_s_2=run[2]["steal"], load_before=load_before,
           load=max(load), goal="speedup>=1.6")


if __name__ == "__main__":
    main()
