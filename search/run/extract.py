"""Extraction across the cluster before the first trial (``difftune extract --space``, and
``difftune search`` when its plan shows extraction work and the cluster has more than one
worker), and the extension of prefix entries (a rung's sample) across it: a pool of workers
that stay (:class:`WorkerPool`), with progress on the console.

- **Workers that stay**: one Ray actor per GPU (each asks ``num_gpus=1``) on a cluster with
  GPUs; else one per node with CPUs, each asking that node's CPUs (the least of the nodes),
  spread over the nodes (``scheduling_strategy="SPREAD"``), its torch threads = its CPUs. A
  pool is created once per extraction (or per search: pass it on), and each actor loads the
  U-Net once and keeps it, the splits' datasets and its extractor across every timestep,
  split and rung (:class:`~difftune.trainables.cache.shard.ShardWorker`).
- **One work list**: :func:`extract_plan` hands every (split, t) group's shards to the pool at
  once; each actor gets its share of every group (balanced by images) queued back to back,
  and a group's entries are published as soon as its last part is in
  (:func:`~difftune.trainables.cache.shard.extract_groups`): no round per group, no waiting
  for a round's slowest shard, no process started per round. :func:`extract_prefixes`
  extends prefix entries to a rung's rows, one (split, t) per call, on whichever worker has
  the least work queued.
- **Failures**: a shard (or extension) that raises is run again, on any live worker, up to
  :data:`MAX_RETRIES` times; an actor whose node is lost is dropped and its queued work goes
  to the others (its half-written part is a temporary file that no manifest lists).
- **One worker** (one node without GPUs, or one GPU): no shards and no Ray; ``difftune
  search`` leaves extraction to its trials (today's path), ``difftune extract --space``
  extracts in its own process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from difftune.search.plan.estimate import extraction
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.cache.shard import (
    ShardJob,
    ShardResult,
    ShardWorker,
    extract_groups,
    local_runner,
)
from difftune.trainables.config import TrialConfig
from difftune.trainables.heads import Request
from difftune.trainables.model.features import precision_for
from difftune.trainables.progress import Progress

logger = logging.getLogger(__name__)

#: runs of a shard (or an extension) after its first that fail before the extraction does
MAX_RETRIES = 3
#: seconds between the driver's looks at its workers' progress
REPORT_S = 1.0
#: the actors' concurrency group that answers progress while a job runs
_PROGRESS = "progress"


@dataclass(frozen=True)
class Workers:
    """Where shards run: how many workers at once and what each asks of Ray."""

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


class _RayWorker(ShardWorker):
    """A :class:`ShardWorker` as a Ray actor: on its GPU if it was given one, its torch
    threads = its CPUs, its node recorded in its parts."""

    def __init__(self, *, gpu: bool, threads: int):
        import ray  # Ray: only in an actor of a pool

        device = "cuda" if gpu and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        super().__init__(device=device, threads=threads,
                         node=ray.get_runtime_context().get_node_id())


class WorkerPool:
    """Extraction workers that stay: one Ray actor per worker of ``workers``
    (:class:`_RayWorker`), created here and kept until :meth:`close` (a ``with`` block),
    across every extraction run through it: pass one pool to :func:`extract_plan` and to
    each :func:`extract_prefixes` of a search, and each worker loads the U-Net once.

    :param progress: a progress bar on the console; ``lines_s``: progress lines every
        ``lines_s`` seconds instead (:class:`~difftune.trainables.progress.Progress`: what
        ``difftune search``'s console shows).
    """

    def __init__(self, workers: Workers, *, progress: bool = True,
                 lines_s: float | None = None):
        import ray  # Ray: only with a cluster (not `difftune extract` alone)

        self.workers, self.progress, self.lines_s = workers, progress, lines_s
        threads = max(1, int(workers.resources.get("num_cpus", 1)))
        cls = ray.remote(concurrency_groups={_PROGRESS: 1})(_RayWorker)
        self.actors = [cls.options(**workers.resources, scheduling_strategy="SPREAD",
                                   max_restarts=0).remote(gpu=workers.kind == "gpu",
                                                          threads=threads)
                       for _ in range(max(1, workers.shards))]
        self.alive = list(self.actors)
        self._seen = [0] * len(self.actors)  # images each actor said it passed, lately

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End every actor (what they hold goes with them)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.alive = []

    def _ask(self, method: str, timeout: float | None = 30.0) -> list:
        """``method()`` of each live worker, answered while a job runs."""
        import ray

        return ray.get([getattr(a, method).options(concurrency_group=_PROGRESS).remote()
                        for a in self.alive], timeout=timeout)

    def stats(self) -> list[dict[str, Any]]:
        """Each live worker's :meth:`~ShardWorker.stats` (``loads``: U-Net loads, ...)."""
        return self._ask("stats", timeout=None)

    def prepare(self, cfg: TrialConfig, splits: Sequence[str], *, wait: bool = False
                ) -> list[dict[str, Any]] | None:
        """Each worker loads the U-Net and the datasets of ``splits`` now, ahead of the jobs
        queued after this (while the driver plans them); ``wait``: until they have.
        :return: with ``wait``, each worker's :meth:`~ShardWorker.stats`."""
        import ray

        refs = [a.prepare.remote(cfg, list(splits)) for a in self.alive]
        return ray.get(refs) if wait else None

    def _done(self, start: Sequence[int]) -> int:
        """Images the live workers passed since they had passed ``start`` (best effort)."""
        try:
            now = self._ask("progress", timeout=5)
        except Exception:  # noqa: BLE001 - progress is best effort
            return 0
        done = 0
        for actor, n in zip(self.alive, now, strict=True):
            k = self.actors.index(actor)
            self._seen[k] = n
            done += n - start[k]
        return done

    def schedule(self, units: Sequence[Any], sizes: Sequence[int],
                 call: Callable[[Any, Any], Any], what: str, *, batches: bool = True
                 ) -> Iterator[tuple[int, Any]]:
        """Run ``call(actor, unit)`` (an actor method's ``.remote``) for every unit: each on
        the live actor with the fewest images queued (``sizes``: a unit's images), queued back
        to back in order; yield ``(index, result)`` as each finishes. A unit that raises runs
        again (:data:`MAX_RETRIES`); an actor that dies is dropped, its units go to the others.
        Progress under ``what``: the images the workers passed (``batches``: they count
        every batch), else the sizes of the units done."""
        import ray
        from ray.exceptions import RayActorError, RayError

        total = int(sum(sizes))
        queued = {id(a): 0 for a in self.alive}
        pending: dict[Any, tuple[int, Any]] = {}
        tries = [0] * len(units)

        def submit(i: int) -> None:
            if not self.alive:
                raise RuntimeError(f"{what}: every extraction worker was lost")
            actor = min(self.alive, key=lambda a: queued[id(a)])
            queued[id(actor)] += sizes[i]
            pending[call(actor, units[i])] = (i, actor)

        began = time.monotonic()
        for i in range(len(units)):
            submit(i)
        start = list(self._seen)
        bar = tqdm(total=total, unit="img", desc=what, mininterval=1.0,
                   disable=not self.progress or self.lines_s is not None)
        said = Progress(what, total, every_s=self.lines_s) if self.lines_s is not None else None
        seen, finished, looked = 0, 0, time.monotonic()
        nodes: set[str] = set()
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=REPORT_S)
                for ref in ready:
                    i, actor = pending.pop(ref)
                    queued[id(actor)] -= sizes[i]
                    try:
                        result = ray.get(ref)
                    except RayError as e:
                        if isinstance(e, RayActorError) and actor in self.alive:
                            self.alive.remove(actor)
                            logger.warning("%s: a worker was lost (%s); %d left", what,
                                           type(e).__name__, len(self.alive))
                        tries[i] += 1
                        if tries[i] > MAX_RETRIES:
                            raise
                        logger.warning("%s: unit %d failed (%s); running it again", what, i,
                                       str(e).splitlines()[0][:200])
                        submit(i)
                        continue
                    finished += sizes[i]
                    node = result.get("node") if isinstance(result, dict) else \
                        getattr(result, "node", None)
                    nodes.add((node or "?")[:8])
                    yield i, result
                if pending and time.monotonic() - looked < REPORT_S:
                    continue
                looked = time.monotonic()
                done = self._done(start) if batches else finished
                step = max(0, min(total if not pending else done, total) - seen)
                seen += step
                bar.update(step)
                if said is not None and step:
                    said.update(step)
        finally:
            for ref in pending:  # the extraction failed: the queued shards are not wanted
                ray.cancel(ref)
            bar.close()
            if said is not None:
                said.close()
        wall = time.monotonic() - began
        logger.info("%s: %d images in %.1f s (%.3g img/s) on %d worker(s), nodes %s", what,
                    total, wall, total / max(wall, 1e-9), len(self.alive), sorted(nodes))

    def runner(self, jobs: Sequence[ShardJob]) -> Iterator[tuple[int, ShardResult]]:
        """A :data:`~difftune.trainables.cache.shard.Runner`: every job of the work list
        queued at once on the actors, results yielded as they finish."""
        return self.schedule(jobs, [j.images for j in jobs],
                             lambda actor, job: actor.run.remote(job), _label(jobs))


def _label(jobs: Sequence[ShardJob]) -> str:
    splits = "+".join(dict.fromkeys(j.split for j in jobs))
    ts = ",".join(str(t) for t in sorted({j.group.t for j in jobs}))
    return f"extract {splits} t={ts} [{len(jobs)} shards]"


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
        return "one worker: a trial's miss extracts as fast, without Ray"
    ahead = extraction(plan)
    if workers is not None and ahead and not ahead["worth_it"]:  # a search, not the user's ask
        return (f"{len(plan.timesteps)} timesteps for {plan.trials} trials: extracting them "
                f"all would pass {ahead['image_passes']:,} images through the U-Net, the "
                f"trials at most {plan.unet_image_passes:,}")
    return None


def extract_plan(space, plan, *, cache: str, workers: Workers | None,
                 pool: WorkerPool | None = None, progress: bool = True,
                 lines_s: float | None = None, **cache_kw: Any) -> dict[str, Any]:
    """Extract every entry ``plan`` foresees for ``space`` into ``cache`` (train and val),
    in shards on a :class:`WorkerPool` of ``workers`` (``pool``: one already started, kept
    open; else one started and closed here), or in this process when ``workers`` is None or
    has one CPU worker. ``cache_kw``: the trials' :class:`~difftune.trainables.cache.feature_cache.FeatureCache`
    options (``store_pool``, ``extra_blocks``, ``budget``, ``data_files``, ``data_hash``,
    ``batch_size``); ``lines_s``: progress lines instead of bars (:class:`WorkerPool`).
    :return: counts (written, reused, images, seconds, wall_s, shards, loads: the U-Net
    loads of the workers, one each)."""
    cfg = space_config(space)
    requests = planned_requests(plan)
    if cfg is None or not requests:
        raise ValueError("the plan foresees no entries to extract")
    sharded = pool is not None or (workers is not None and (workers.shards > 1
                                                            or workers.kind == "gpu"))
    began = time.monotonic()
    own = pool is None and sharded
    if own:
        pool = WorkerPool(workers, progress=progress, lines_s=lines_s)
    try:
        if sharded:
            pool.prepare(cfg, ("train", "val"))  # the workers load while the driver plans
        device = "cuda" if torch.cuda.is_available() else "cpu"
        precision = "fp32" if sharded else precision_for(device)
        if sharded and pool.workers.kind == "gpu":
            precision, free = pool._ask("probe", timeout=None)[0]
            logger.info("GPU workers: %s autocast, %.3g GB free", precision, free / 1e9)
        cache_kw = dict(cache_kw)
        if not cache_kw.get("batch_size"):
            cache_kw.pop("batch_size", None)
        fc = FeatureCache(cache, device="cpu", precision=precision, progress=progress,
                          **cache_kw)
        shards = len(pool.alive) if sharded else 1
        runner = pool.runner if sharded else local_runner(device)
        totals: dict[str, Any] = extract_groups(fc, cfg, ("train", "val"), requests,
                                                shards=shards, runner=runner)
        if sharded:
            totals["loads"] = [s["loads"] for s in pool.stats()]
    finally:
        if own:
            pool.close()
    totals["wall_s"] = time.monotonic() - began
    totals["shards"] = shards
    totals["precision"] = precision
    totals["root"] = fc.root
    return totals


def extract_prefixes(cfg: TrialConfig, requests: Sequence[Request], rows: Mapping[str, int],
                     *, cache: str, pool: WorkerPool, view: int = 0,
                     **cache_kw: Any) -> dict[str, Any]:
    """Extend the prefix entries of ``requests`` ((t, block, pool)) on each split of ``rows``
    to that split's first ``rows[split]`` images in its interleaved order (a rung's sample:
    :func:`~difftune.trainables.data.order.rung_rows`) across ``pool``'s workers, before the
    trials of the rung read them. One call per (split, t), on the worker with the least work
    queued; each runs :meth:`~difftune.trainables.cache.feature_cache.FeatureCache.get_prefix`
    in the worker, under the group's lock, passing only the images the entries lack (none
    when they hold ``rows`` already). ``cache_kw``: the trials' FeatureCache options
    (``store_pool``, ``extra_blocks``, ``budget``, ``data_files``, ``data_hash``,
    ``batch_size``; the precision is the worker's device's, as a trial's there).

    Example (a rung of 10 % before its trials, the search's pool kept)::

        with WorkerPool(cluster_workers()) as pool:
            extract_plan(space, plan, cache=root, workers=pool.workers, pool=pool, **kw)
            extract_prefixes(cfg, requests, {"train": 108, "val": 36}, cache=root,
                             pool=pool, **kw)

    :return: counts: ``images`` (U-Net image-passes), ``written`` and ``reused`` (entries),
        ``units`` (split, t), ``wall_s``."""
    by_t: dict[int, list[Request]] = {}
    for r in requests:
        by_t.setdefault(r[0], []).append(tuple(r))
    units = [(split, sorted(reqs)) for split in rows for _, reqs in sorted(by_t.items())]
    sizes = [int(rows[split]) for split, _ in units]
    began = time.monotonic()
    totals: dict[str, Any] = {"images": 0, "written": 0, "reused": 0, "units": len(units)}
    what = (f"extend {'+'.join(rows)} t={','.join(str(t) for t in sorted(by_t))} to "
            + ", ".join(f"{rows[s]} {s}" for s in rows) + " images")

    def call(actor, unit):
        split, reqs = unit
        return actor.extend.remote(cache, cache_kw, cfg, split, reqs, int(rows[split]), view)

    for _, done in pool.schedule(units, sizes, call, what, batches=False):
        for k in ("images", "written", "reused"):
            totals[k] += done[k]
    totals["wall_s"] = time.monotonic() - began
    return totals


__all__ = ["MAX_RETRIES", "WorkerPool", "Workers", "cluster_workers", "extract_plan",
           "extract_prefixes", "planned_requests", "space_config", "why_not"]
