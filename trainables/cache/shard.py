"""Extracting cache groups (a split's entries at one timestep) in shards: each shard is a
contiguous run of the split's images, extracted by a worker (a Ray actor on some node that
keeps the U-Net and the data across every shard it runs: :mod:`difftune.search.run.extract`;
or this process) into part files, and each entry is published with its manifest once every
part of it is in (:mod:`.parts`).

The entries are the ones a trial's miss would write (:meth:`~.feature_cache.FeatureCache.miss_plan`:
the policy's block set at its stored pool), keyed as the trial keys them, so trials read them.
Every group's lock (:class:`~.lock.CacheLock`) is held by the driver from before its shards
run until its entries are published: a trial that needs the group meanwhile waits for it,
then reads what was published.

One work list covers every (split, t) group of an extraction (:func:`extract_groups`): a
worker runs its shards back to back, and a group is published as soon as its last part is in,
without a round per group that waits for its slowest shard.

Shard boundaries are multiples of the extraction batch, so every shard runs the same image
batches an unsharded extraction runs (:func:`~.extract.extract_rows`, the loop of both):
the rows are identical, in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from difftune.trainables.cache import throughput
from difftune.trainables.cache.extract import batch_to_fit, extract_rows, record_rate
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.cache.parts import part_record, publish, sweep_parts
from difftune.trainables.cache.store import EntryKey, Store, sweep_tmp
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import dataset_indices
from difftune.trainables.heads import Request
from difftune.trainables.model.cost import free_memory
from difftune.trainables.model.features import Extractor, block_sizes, precision_for
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


#: runs shard jobs (in any order, anywhere) and yields ``(index in jobs, result)`` of each as
#: it finishes; every job once
Runner = Callable[[Sequence[ShardJob]], Iterable[tuple[int, ShardResult]]]


def shard_ranges(n: int, shards: int, batch: int) -> list[tuple[int, int]]:
    """``shards`` contiguous ranges covering ``0..n``, their bounds multiples of ``batch``
    (fewer ranges when there are fewer batches than shards)."""
    batches = math.ceil(n / batch)
    per = math.ceil(batches / max(1, min(shards, batches)))
    return [(lo * batch, min(n, (lo + per) * batch)) for lo in range(0, batches, per)]


class ShardWorker:
    """One extraction worker (a Ray actor per GPU or node, or this process): what it holds
    stays across every job it runs, timesteps, splits and rungs alike: the U-Net (loaded
    once per process, :func:`~.unet.shared_unet`), the splits' datasets (memoised), an
    extractor per model and precision, and the feature caches it extends prefix entries in.

    :param threads: torch CPU threads (its CPUs); None leaves torch's.
    :param node: the Ray node it runs on, recorded in every part it writes.
    """

    def __init__(self, *, device: str = "cpu", threads: int | None = None,
                 node: str | None = None):
        self.device, self.threads, self.node = device, threads, node
        if threads:
            torch.set_num_threads(threads)
        self._misses = shared_unet.cache_info().misses
        self._extractors: dict[tuple, Extractor] = {}
        self._batches: dict[tuple, int] = {}
        self._caches: dict[str, FeatureCache] = {}
        self._stores: dict[str, Store] = {}
        self.images_done = 0  # images through the U-Net in this worker, every job together
        self.jobs_done = 0

    @property
    def loads(self) -> int:
        """U-Net loads in this process since this worker started (one per model)."""
        return shared_unet.cache_info().misses - self._misses

    def stats(self) -> dict[str, Any]:
        """``loads``, ``jobs`` and ``images`` done so far, ``threads``, ``device``, ``node``."""
        return {"loads": self.loads, "jobs": self.jobs_done, "images": self.images_done,
                "threads": torch.get_num_threads(), "device": self.device, "node": self.node}

    def progress(self) -> int:
        """Images passed so far (every job together; a failed job's count too)."""
        return self.images_done

    def probe(self) -> tuple[str, int]:
        """The precision a trial runs the U-Net in on this worker's device, and its free
        bytes."""
        return precision_for(self.device), int(free_memory(self.device))

    def prepare(self, cfg: TrialConfig, splits: Sequence[str]) -> dict[str, Any]:
        """Load what jobs on ``splits`` of ``cfg``'s data will need (the U-Net, the splits'
        datasets) ahead of them. :return: :meth:`stats`."""
        model, _ = shared_unet(cfg.model, cfg.checkpoint, self.device)
        for split in splits:
            dataset_indices(trial_dataset(cfg, split, model.image_size)[0])
        return self.stats()

    def _extractor(self, model, diffusion, precision: str, channels_last: bool) -> Extractor:
        key = (id(model), precision, channels_last)
        if key not in self._extractors or self._extractors[key].model is not model:
            self._extractors[key] = Extractor(model, diffusion, precision=precision,
                                              channels_last=channels_last)
        return self._extractors[key]

    def _batch(self, job: ShardJob) -> int:
        if job.flags is None:
            return job.batch
        key = (job.cfg.model, job.cfg.checkpoint, max(job.plan), job.group.precision)
        if key not in self._batches:
            self._batches[key] = batch_to_fit(job.flags, max(job.plan),
                                              precision=job.group.precision, device=self.device)
        return min(job.batch, self._batches[key])

    def run(self, job: ShardJob, on_batch: Callable[[int], None] | None = None
            ) -> ShardResult:
        """Extract one shard into one part file per block (temporary name, renamed when
        complete). ``on_batch(images done)`` after every batch."""
        if self.threads:
            torch.set_num_threads(self.threads)  # the thread Ray runs the job in, too
        cfg = job.cfg
        model, diffusion = shared_unet(cfg.model, cfg.checkpoint, self.device)
        ds, _ = trial_dataset(cfg, job.split, model.image_size)
        indices = dataset_indices(ds)[job.start:job.stop]
        loader = DataLoader(Subset(ds, range(job.start, job.stop)), batch_size=self._batch(job),
                            shuffle=False)
        extractor = self._extractor(model, diffusion, job.group.precision, job.channels_last)
        native = block_sizes(model)

        def step(n: int, done: int) -> None:
            self.images_done += n
            if on_batch is not None:
                on_batch(done)

        if job.root not in self._stores:
            self._stores[job.root] = Store(job.root)
        store = self._stores[job.root]
        done = extract_rows(
            extractor, loader, indices, store, job.group, job.plan, native,
            shard=job.shard, on_batch=step,
            finish=lambda w: part_record(w, w.close(), shard=job.shard, start=job.start,
                                         node=self.node))
        if done.images != job.images:
            raise RuntimeError(f"shard {job.shard} of {job.label} read {done.images} images, "
                               f"expected {job.images}")
        self.jobs_done += 1
        return ShardResult(done.done, done.shapes, {b: native[b] for b in done.done},
                           done.images, done.timed_images, done.seconds,
                           throughput.device_kind(extractor.device), self.node)

    def extend(self, root: str, options: dict[str, Any], cfg: TrialConfig, split: str,
               requests: Sequence[Request], rows: int, view: int = 0) -> dict[str, Any]:
        """Extend the prefix entries of ``requests`` on ``split`` to its first ``rows``
        images (:meth:`~.feature_cache.FeatureCache.get_prefix`: only the images they lack
        pass, under each group's lock), in the cache at ``root`` with ``options`` (its
        :class:`~.feature_cache.FeatureCache` keyword arguments, the trials').
        :return: ``images`` (U-Net image-passes), ``written`` and ``reused`` (entries)."""
        if self.threads:
            torch.set_num_threads(self.threads)
        key = repr((root, sorted(options.items())))
        if key not in self._caches:
            self._caches[key] = FeatureCache(root, device=self.device, **options)
        cache = self._caches[key]
        before = dataclasses.replace(cache.stats)
        cache.get_prefix(cfg, split, requests, rows, view=view)
        images = cache.stats.forward_images - before.forward_images
        self.images_done += images
        self.jobs_done += 1
        return {"images": images,
                "written": cache.stats.entries_written - before.entries_written,
                "reused": cache.stats.entries_reused - before.entries_reused,
                "split": split, "rows": rows, "node": self.node}


def run_shard(job: ShardJob, *, device: str = "cpu", node: str | None = None,
              on_batch: Callable[[int], None] | None = None) -> ShardResult:
    """One shard in a worker of its own (:meth:`ShardWorker.run`)."""
    return ShardWorker(device=device, node=node).run(job, on_batch)


def local_runner(device: str = "cpu", worker: ShardWorker | None = None) -> Runner:
    """Jobs run one after the other in this process, by one :class:`ShardWorker` kept
    across them (one machine, one worker)."""
    worker = worker or ShardWorker(device=device)
    return lambda jobs: ((i, worker.run(job)) for i, job in enumerate(jobs))


@dataclass
class _Group:
    """One (split, t) group being extracted: its key, plan, jobs' indices and lock."""

    split: str
    group: EntryKey
    plan: dict[int, int]
    flags: dict
    jobs: list[int]
    lock: contextlib.ExitStack
    results: dict[int, ShardResult] = field(default_factory=dict)


def _claim(cache: FeatureCache, cfg: TrialConfig, split: str, t: int, base: EntryKey,
           wanted: dict[int, int], native: dict[int, int], n: int, flags: dict, *,
           shards: int, jobs: list[ShardJob], counts: dict[str, Any]) -> _Group | None:
    """Lock one group and plan its shards into ``jobs``, or None if every entry is stored."""
    group = dataclasses.replace(base, t=t)
    missing = cache.find(group, wanted, native, {})
    counts["reused"] += len(wanted) - len(missing)
    if not missing:
        return None
    lock = contextlib.ExitStack()
    lock.enter_context(cache.locked(group))
    try:
        missing = cache.find(group, missing, native, {}, purge=True)
        if not missing:
            lock.close()
            return None
        plan = cache.miss_plan(group, missing, native)
        for b, p in plan.items():  # parts of attempts that never published
            key = dataclasses.replace(group, block=b, pool=p)
            sweep_parts(cache.store, f"{key.group}/{key.name}")
        cache.room_for(flags, n, plan)
        batch = cache.batch_for(flags, max(plan))
        ranges = shard_ranges(n, shards, batch)
        first = len(jobs)
        jobs.extend(ShardJob(cfg, split, group, plan, cache.root, k, len(ranges), lo, hi,
                             batch, cache.channels_last, None if cache.batch_size else flags)
                    for k, (lo, hi) in enumerate(ranges))
        return _Group(split, group, plan, flags, list(range(first, len(jobs))), lock)
    except BaseException:
        lock.close()
        raise


def _publish(cache: FeatureCache, g: _Group, counts: dict[str, Any]) -> None:
    """Publish every entry of a group whose parts are all in, and release its lock."""
    results = [g.results[i] for i in g.jobs]
    for b, p in g.plan.items():
        key = dataclasses.replace(g.group, block=b, pool=p)
        parts = [r.parts[b] for r in results]
        publish(cache.store, key, parts, shape=results[0].shapes[b], native=results[0].native[b])
        sweep_parts(cache.store, f"{key.group}/{key.name}", keep=[p["file"] for p in parts])
    sweep_tmp(cache.store, g.group.group)  # parts of attempts lost with their node
    g.lock.close()
    images = sum(r.timed_images for r in results)
    seconds = sum(r.seconds for r in results)
    counts["written"] += len(g.plan)
    counts["images"] += sum(r.images for r in results)
    counts["timed_images"] += images
    counts["seconds"] += seconds
    if cache.record_throughput:  # a shard's passes: one worker's rate, for the plan
        record_rate(cache.store, g.group, g.flags, results[0].device, max(g.plan),
                    images=images, seconds=seconds)
    logger.info("cache: published %d entries of %s %s t=%d from %d parts (blocks %s)",
                len(g.plan), g.group.data, g.split, g.group.t, len(results), sorted(g.plan))


def extract_groups(cache: FeatureCache, cfg: TrialConfig, splits: Sequence[str],
                   requests: Sequence[Request], *, shards: int, runner: Runner
                   ) -> dict[str, Any]:
    """Extract what ``requests`` on each of ``splits`` miss (and the policy's block set with
    them) as ``shards`` shards per (split, t) group, all groups' shards handed to ``runner``
    as one work list; each group's entries are published (and its lock released) as soon as
    its last part is in. ``cache``: the :class:`~.feature_cache.FeatureCache` whose keys,
    policy and locks are used.
    :return: counts: ``written`` (entries), ``reused``, ``images`` (U-Net image-passes),
    ``timed_images`` and ``seconds`` (the shards' own measure of their passes)."""
    counts: dict[str, Any] = {"written": 0, "reused": 0, "images": 0, "timed_images": 0,
                              "seconds": 0.0}
    jobs: list[ShardJob] = []
    groups: list[_Group] = []
    try:
        for split in splits:
            model, _, ds, base, by_t, flags = cache.resolve(cfg, split, requests)
            native, n = block_sizes(model), len(dataset_indices(ds))
            for t, wanted in sorted(by_t.items()):
                g = _claim(cache, cfg, split, t, base, wanted, native, n, flags,
                           shards=shards, jobs=jobs, counts=counts)
                if g is not None:
                    groups.append(g)
        of = {i: g for g in groups for i in g.jobs}
        for i, result in (runner(jobs) if jobs else ()):
            g = of[i]
            g.results[i] = result
            if len(g.results) == len(g.jobs):
                _publish(cache, g, counts)
        if any(len(g.results) < len(g.jobs) for g in groups):
            raise RuntimeError("the extraction's runner ended before every shard was done")
    finally:
        for g in groups:
            g.lock.close()  # a group not published: its parts are debris the next one sweeps
    return counts


def extract_sharded(cache: FeatureCache, cfg: TrialConfig, split: str,
                    requests: Sequence[Request], *, shards: int, runner: Runner
                    ) -> dict[str, Any]:
    """:func:`extract_groups` of one split."""
    return extract_groups(cache, cfg, [split], requests, shards=shards, runner=runner)
