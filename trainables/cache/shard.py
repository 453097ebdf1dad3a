"""Extracting one cache group (a split's entries at one timestep) in shards: each shard is a
contiguous run of the split's images, extracted by whatever runs it (a Ray task on some node:
:mod:`difftune.search.run.extract`; or this process) into part files, and the entries are
published with their manifests once every part is in (:mod:`.parts`).

The entries are the ones a trial's miss would write (:meth:`~.feature_cache.FeatureCache.miss_plan`:
the policy's block set at its stored pool), keyed as the trial keys them, so trials read them.
The group's lock (:class:`~.lock.CacheLock`) is held by the driver while the shards run:
a trial that needs the group meanwhile waits for it, then reads what was published.

Shard boundaries are multiples of the extraction batch, so every shard runs the same image
batches an unsharded extraction runs (:func:`~.extract.extract_rows`, the loop of both):
the rows are identical, in the same order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch.utils.data import DataLoader, Subset

from difftune.trainables.cache import throughput
from difftune.trainables.cache.extract import batch_to_fit, extract_rows, record_rate
from difftune.trainables.cache.parts import part_record, publish, sweep_parts
from difftune.trainables.cache.store import EntryKey, Store, sweep_tmp
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import dataset_indices
from difftune.trainables.heads import Request
from difftune.trainables.model.features import Extractor, block_sizes
from difftune.trainables.model.unet import shared_unet
from difftune.trainables.pipeline import trial_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardJob:
    """One shard: rows ``start:stop`` of ``split`` (positions in the split's dataset) at
    ``group`` (its t, seed, precision), the blocks of ``plan`` (block -> stored pool)."""

    cfg: TrialConfig
    split: str
    group: EntryKey
    plan: dict[int, int]
    root: str
    shard: int
    shards: int
    start: int
    stop: int
    batch: int
    channels_last: bool = False
    #: the model's flags when the batch was not fixed: the shard then sizes its batch to the
    #: free memory of its own device (a GPU worker's, not the driver's), at most ``batch``
    flags: dict | None = None

    @property
    def images(self) -> int:
        return self.stop - self.start

    @property
    def label(self) -> str:
        return f"{self.split} t={self.group.t}"


@dataclass
class ShardResult:
    """What one shard wrote: block -> its part record, and its timing."""

    parts: dict[int, dict]
    shapes: dict[int, tuple[int, int, int]]
    native: dict[int, int]
    images: int
    timed_images: int = 0  # every batch but the first (warm-up)
    seconds: float = 0.0
    device: str = "cpu"  # its kind: ``cpu`` or the GPU's name (throughput.device_kind)
    node: str | None = None
    host: str = field(default_factory=socket.gethostname)


#: runs the shards of one group (in any order, anywhere) and returns their results in order
Runner = Callable[[Sequence[ShardJob]], list[ShardResult]]


def shard_ranges(n: int, shards: int, batch: int) -> list[tuple[int, int]]:
    """``shards`` contiguous ranges covering ``0..n``, their bounds multiples of ``batch``
    (fewer ranges when there are fewer batches than shards)."""
    batches = math.ceil(n / batch)
    per = math.ceil(batches / max(1, min(shards, batches)))
    return [(lo * batch, min(n, (lo + per) * batch)) for lo in range(0, batches, per)]


def run_shard(job: ShardJob, *, device: str = "cpu", node: str | None = None,
              on_batch: Callable[[int], None] | None = None) -> ShardResult:
    """Extract one shard into one part file per block (temporary name, renamed when
    complete). ``on_batch(images done)`` after every batch. Runs on any node."""
    cfg = job.cfg
    model, diffusion = shared_unet(cfg.model, cfg.checkpoint, device)
    ds, _ = trial_dataset(cfg, job.split, model.image_size)
    indices = dataset_indices(ds)[job.start:job.stop]
    batch = job.batch
    if job.flags is not None:
        batch = min(batch, batch_to_fit(job.flags, max(job.plan), precision=job.group.precision,
                                        device=device))
    loader = DataLoader(Subset(ds, range(job.start, job.stop)), batch_size=batch,
                        shuffle=False)
    extractor = Extractor(model, diffusion, precision=job.group.precision,
                          channels_last=job.channels_last)
    done = extract_rows(
        extractor, loader, indices, Store(job.root), job.group, job.plan, block_sizes(model),
        shard=job.shard, on_batch=None if on_batch is None else lambda _n, d: on_batch(d),
        finish=lambda w: part_record(w, w.close(), shard=job.shard, start=job.start,
                                     node=node))
    if done.images != job.images:
        raise RuntimeError(f"shard {job.shard} of {job.label} read {done.images} images, "
                           f"expected {job.images}")
    native = block_sizes(model)
    return ShardResult(done.done, done.shapes, {b: native[b] for b in done.done}, done.images,
                       done.timed_images, done.seconds,
                       throughput.device_kind(extractor.device), node)


def local_runner(device: str = "cpu") -> Runner:
    """Shards run one after the other in this process (one machine, one worker)."""
    return lambda jobs: [run_shard(job, device=device) for job in jobs]


def extract_sharded(cache, cfg: TrialConfig, split: str, requests: Sequence[Request], *,
                    shards: int, runner: Runner) -> dict[str, int]:
    """Extract what ``requests`` on ``split`` miss (and the policy's block set with them) as
    ``shards`` shards per timestep run by ``runner``, publishing each entry when every part
    is in. ``cache`` is the :class:`~.feature_cache.FeatureCache` whose keys and policy are used.
    :return: counts: ``written`` (entries), ``reused``, ``images`` (U-Net image-passes),
    ``timed_images`` and ``seconds`` (the shards' own measure of their passes)."""
    model, diffusion, ds, base, by_t, flags = cache.resolve(cfg, split, requests)
    native = block_sizes(model)
    n = len(dataset_indices(ds))
    counts = {"written": 0, "reused": 0, "images": 0, "timed_images": 0, "seconds": 0.0}
    for t, wanted in sorted(by_t.items()):
        group = dataclasses.replace(base, t=t)
        missing = cache.find(group, wanted, native, {})
        counts["reused"] += len(wanted) - len(missing)
        if not missing:
            continue
        with cache.locked(group):
            missing = cache.find(group, missing, native, {}, purge=True)
            if not missing:
                continue
            plan = cache.miss_plan(group, missing, native)
            for b, p in plan.items():  # parts of attempts that never published
                key = dataclasses.replace(group, block=b, pool=p)
                sweep_parts(cache.store, f"{key.group}/{key.name}")
            cache.room_for(flags, n, plan)
            batch = cache.batch_for(flags, max(plan))
            jobs = [ShardJob(cfg, split, group, plan, cache.root, k, 0, lo, hi, batch,
                             cache.channels_last, None if cache.batch_size else flags)
                    for k, (lo, hi) in enumerate(shard_ranges(n, shards, batch))]
            jobs = [dataclasses.replace(j, shards=len(jobs)) for j in jobs]
            results = runner(jobs)
            for b, p in plan.items():
                key = dataclasses.replace(group, block=b, pool=p)
                parts = [r.parts[b] for r in results]
                publish(cache.store, key, parts, shape=results[0].shapes[b],
                        native=results[0].native[b])
                sweep_parts(cache.store, f"{key.group}/{key.name}",
                            keep=[p["file"] for p in parts])
            sweep_tmp(cache.store, group.group)  # parts of attempts lost with their node
            images = sum(r.timed_images for r in results)
            seconds = sum(r.seconds for r in results)
            counts["written"] += len(plan)
            counts["images"] += sum(r.images for r in results)
            counts["timed_images"] += images
            counts["seconds"] += seconds
            if cache.record_throughput:  # a shard's passes: one worker's rate, for the plan
                record_rate(cache.store, group, flags, results[0].device, max(plan),
                            images=images, seconds=seconds)
            logger.info("cache: published %d entries of %s %s t=%d from %d parts (blocks %s)",
                        len(plan), group.data, split, t, len(results), sorted(plan))
    return counts
