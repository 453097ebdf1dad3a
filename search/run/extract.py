"""Extraction across the cluster before the first trial (``difftune extract --space``, and
``difftune search`` when its plan shows extraction work and the cluster has more than one
worker): every entry the plan foresees at its timesteps is extracted as Ray tasks, one shard
of the images each (:mod:`difftune.trainables.cache.shard`), with progress on the console.

- **Workers**: one shard per GPU (each task asks ``num_gpus=1``) on a cluster with GPUs; else
  one per node with CPUs, each task asking that node's CPUs (the least of the nodes), spread
  over the nodes (``scheduling_strategy="SPREAD"``).
- **Failures**: a task whose worker or node is lost, or that raises, is rerun by Ray
  (``max_retries``, ``retry_exceptions``); its half-written part is a temporary file that no
  manifest lists.
- **One worker** (one node without GPUs, or one GPU): no shards and no Ray tasks; ``difftune
  search`` leaves extraction to its trials (today's path), ``difftune extract --space``
  extracts in its own process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from difftune.search.plan.estimate import extraction
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.cache.shard import (
    ShardJob,
    ShardResult,
    extract_sharded,
    local_runner,
    run_shard,
)
from difftune.trainables.config import TrialConfig
from difftune.trainables.model.cost import free_memory
from difftune.trainables.model.features import precision_for
from difftune.trainables.progress import Progress

logger = logging.getLogger(__name__)

#: reruns of a shard whose node was lost or that failed
MAX_RETRIES = 3


@dataclass(frozen=True)
class Workers:
    """Where shards run: how many at once and what each task asks of Ray."""

    shards: int
    resources: dict[str, float] = field(default_factory=dict)
    kind: str = "cpu"  # cpu | gpu

    def describe(self) -> str:
        what = ", ".join(f"{k}={v:g}" for k, v in self.resources.items())
        return f"{self.shards} {self.kind.upper()} worker(s) ({what} each)"


def cluster_workers(*, gpus: bool = True) -> Workers:
    """The workers of the running Ray cluster: its GPUs (when ``gpus`` and it has any), else
    its alive nodes with CPUs."""
    import ray  # Ray: only with a cluster (not `difftune extract` alone)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total_gpus = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
    if gpus and total_gpus >= 1:
        return Workers(total_gpus, {"num_gpus": 1, "num_cpus": 1}, "gpu")
    cpus = [n["Resources"].get("CPU", 0) for n in nodes if n["Resources"].get("CPU", 0) >= 1]
    return Workers(len(cpus), {"num_cpus": float(int(min(cpus)))} if cpus else {}, "cpu")


#: seconds between a shard's reports to the driver's progress (the driver looks every second)
REPORT_S = 1.0


def _shard_task(job: ShardJob, counter: Any) -> ShardResult:
    """One shard on whatever node Ray chose (a GPU if the task asked one)."""
    import ray  # Ray: only where shards run as its tasks (not `difftune extract` alone)

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"

    last = [0.0]

    def report(done: int) -> None:  # after every batch: one actor call a second at most
        now = time.monotonic()
        if counter is not None and (now - last[0] >= REPORT_S or done == job.images):
            last[0] = now
            counter.report.remote(job.shard, done)

    return run_shard(job, device=device, node=ray.get_runtime_context().get_node_id(),
                     on_batch=report)


class _Progress:
    """Images each shard has done (a retried shard starts again from 0)."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def report(self, shard: int, done: int) -> None:
        self.done[shard] = done

    def total(self) -> int:
        return sum(self.done.values())


def _probe_gpu() -> tuple[str, int]:
    """On a GPU worker: the precision a trial there runs the U-Net in, and free bytes."""
    return precision_for("cuda"), int(free_memory("cuda"))


def probe_gpu(workers: Workers) -> tuple[str, int]:
    """:func:`_probe_gpu` run on one of ``workers`` (a GPU)."""
    import ray  # Ray: only with a cluster (not `difftune extract` alone)

    return ray.get(ray.remote(_probe_gpu).options(**workers.resources).remote())


def ray_runner(workers: Workers, *, progress: bool = True, lines_s: float | None = None):
    """A :data:`~difftune.trainables.cache.shard.Runner` running each shard as a Ray task
    with ``workers.resources``, retried on failure, and a progress bar on the console
    (images/s, time left) fed by a small actor on the driver's node; with ``lines_s``, a
    progress line every ``lines_s`` seconds instead (:class:`~difftune.trainables.progress.
    Progress`: what ``difftune search``'s console shows)."""
    # Ray: only with a cluster (not `difftune extract` alone)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(_shard_task).options(**workers.resources, max_retries=MAX_RETRIES,
                                           retry_exceptions=True, scheduling_strategy="SPREAD")
    here = ray.get_runtime_context().get_node_id()

    def run(jobs: list[ShardJob]) -> list[ShardResult]:
        counter = ray.remote(num_cpus=0)(_Progress).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()
        total = sum(j.images for j in jobs)
        began = time.monotonic()
        refs = [task.remote(job, counter) for job in jobs]
        what = f"extract {jobs[0].label} [{len(jobs)} shards]"
        bar = tqdm(total=total, unit="img", desc=what, mininterval=1.0,
                   disable=not progress or lines_s is not None)
        said = Progress(what, total, every_s=lines_s) if lines_s is not None else None
        seen = 0  # images reported so far (a disabled bar counts nothing)
        pending = list(refs)
        try:
            while pending:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
                try:
                    done = ray.get(counter.total.remote(), timeout=5)
                except Exception:  # noqa: BLE001 - progress is best effort
                    done = seen
                step = max(0, min(done, total) - seen)
                seen += step
                bar.update(step)
                if said is not None and step:
                    said.update(step)
            results = ray.get(refs)
            if said is not None:
                said.update(total - seen)
                said.close()
            bar.update(total - bar.n)  # the last reports may still be on their way
        finally:
            bar.close()
            ray.kill(counter)
        wall = time.monotonic() - began
        logger.info("extracted %s: %d images in %.1f s (%.3g img/s) on %d shards, nodes %s",
                    jobs[0].label, total, wall, total / max(wall, 1e-9), len(jobs),
                    sorted({(r.node or "?")[:8] for r in results}))
        return results

    return run


# ------------------------------------------------------------------------ a space's plan


def planned_requests(plan) -> list[tuple[int, int, int]]:
    """The (t, block, pool) of every entry the plan's search stage writes (its timesteps)."""
    return sorted({(e["t"], e["block"], e["pool"]) for e in plan.entries
                   if e.get("stage", "search") == "search"})


def space_config(space):
    """The trial settings every trial of ``space`` shares that key its cache entries, or None
    when a trial may choose them (a searched ``seed`` or ``noise_seed``: not foreseeable)."""
    if {"seed", "noise_seed"} & set(space.params):
        return None
    return TrialConfig.from_dict({
        "model": space.model, "checkpoint": space.checkpoint, "data": space.data,
        "label_fraction": space.label_fraction, "seed": space.fixed.get("seed", 0),
        "noise_seed": space.fixed.get("noise_seed", 0)})


def why_not(plan, space, workers: Workers | None) -> str | None:
    """Why a search leaves extraction to its trials, or None when it extracts first
    (``workers``: the cluster's, for a search; None when the user asked for the extraction,
    which then is not weighed against what the trials can ask)."""
    if plan.policy != "block-set":
        return (f"the {plan.policy} cache policy stores what trials ask, which no plan "
                "foresees")
    if space_config(space) is None:
        return "the space searches seed or noise_seed"
    if workers is not None and workers.shards <= 1:
        return "one worker: a trial's miss extracts as fast, without Ray tasks"
    ahead = extraction(plan)
    if workers is not None and ahead and not ahead["worth_it"]:  # a search, not the user's ask
        return (f"{len(plan.timesteps)} timesteps for {plan.trials} trials: extracting them "
                f"all would pass {ahead['image_passes']:,} images through the U-Net, the "
                f"trials at most {plan.unet_image_passes:,}")
    return None


def extract_plan(space, plan, *, cache: str, workers: Workers | None, progress: bool = True,
                 lines_s: float | None = None, **cache_kw: Any) -> dict[str, Any]:
    """Extract every entry ``plan`` foresees for ``space`` into ``cache`` (train and val),
    in shards on ``workers`` (a Ray cluster), or in this process when ``workers`` is None or
    has one worker. ``cache_kw``: the trials' :class:`~difftune.trainables.cache.feature_cache.FeatureCache`
    options (``store_pool``, ``extra_blocks``, ``budget``, ``data_files``, ``data_hash``,
    ``batch_size``); ``lines_s``: progress lines instead of bars (:func:`ray_runner`).
    :return: counts (written, reused, images, seconds, wall_s, shards)."""
    cfg = space_config(space)
    requests = planned_requests(plan)
    if cfg is None or not requests:
        raise ValueError("the plan foresees no entries to extract")
    sharded = workers is not None and (workers.shards > 1 or workers.kind == "gpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "fp32" if sharded else precision_for(device)
    if sharded and workers.kind == "gpu":
        precision, free = probe_gpu(workers)
        logger.info("GPU workers: %s autocast, %.3g GB free", precision, free / 1e9)
    cache_kw = dict(cache_kw)
    if not cache_kw.get("batch_size"):
        cache_kw.pop("batch_size", None)
    fc = FeatureCache(cache, device="cpu", precision=precision, progress=progress, **cache_kw)
    runner = (ray_runner(workers, progress=progress, lines_s=lines_s) if sharded
              else local_runner(device))
    shards = workers.shards if sharded else 1
    began = time.monotonic()
    totals: dict[str, Any] = {}
    for split in ("train", "val"):
        counts = extract_sharded(fc, cfg, split, requests, shards=shards, runner=runner)
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    totals["wall_s"] = time.monotonic() - began
    totals["shards"] = shards
    totals["precision"] = precision
    totals["root"] = fc.root
    return totals


__all__ = ["MAX_RETRIES", "Workers", "cluster_workers", "extract_plan", "planned_requests",
           "ray_runner", "space_config", "why_not"]
