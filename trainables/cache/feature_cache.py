"""The Arrow feature cache: every (image, timestep) U-Net forward pass is paid for once.

An *entry* holds the features of one (model, data split, image size, label-fraction subset,
timestep t, noise seed, precision of the U-Net pass, block) pooled to P x P: an Arrow IPC
file of rows ``(index, label, x)``, ``x`` the flattened ``[C x P x P]`` map (float16 by
default), beside a JSON *marker* (key, shape, rows, bytes, sha256). Layout under the root (a
folder or a pyarrow URI)::

    <model fp>/<data fp>/t<t>-s<noise seed>-<precision>[-v<view>]/b<block>-p<P>-<dtype>.arrow
                                                             /b<block>-p<P>-<dtype>.json
                                                             /.lock

A trial with ``views: K`` reads K views of every train image (:mod:`.views`: view 0 is the
image itself, views 1..K-1 seeded crops + flips with their own noise; epoch e reads view
e mod K); val and test are read as view 0.

Fingerprints are content hashes (checkpoint bytes + flags; the data files' relative paths and
sizes, or bytes, + transform + subset), so a changed model or data never hits a stale entry
and a copy of the data elsewhere hits the same ones. Pool p is served by an entry at p, or
derived exactly from one at P when p | P and P | the native map size (average pooling then
composes). Publishing: data under a temporary name then renamed (object stores: one atomic
PUT), marker last; readers trust only entries whose marker exists and whose checksum matches
(checked once per node; a mismatch is logged and re-extracted). One process per group
directory extracts at a time, under :class:`~.lock.CacheLock`. What a miss stores, and
the storage budget: :mod:`.policy`; the miss's forward passes: :mod:`.extract`; keys and the
root: :mod:`.store`; the entry files: :mod:`.entry`. Listing and pruning: :mod:`.admin`.
Entries over a prefix of a split's interleaved order, which extend (rungs over images):
:mod:`.prefix` (:meth:`FeatureCache.get_prefix`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow.fs as pafs
from torch.utils.data import Dataset

from difftune.trainables.cache import prefix, throughput
from difftune.trainables.cache.entry import CachedFeatures, EntryWriter
from difftune.trainables.cache.extract import CacheStats, batch_to_fit, extract_entries, record_rate
from difftune.trainables.cache.lock import CacheLock
from difftune.trainables.cache.parts import EntryPath, check_entry, delete_entry, entry_paths
from difftune.trainables.cache.policy import make_room, stored_pool, touch
from difftune.trainables.cache.store import ENTRY_NAME, EntryKey, Store, default_root, sweep_tmp
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import data_fingerprint, dataset_indices
from difftune.trainables.data.order import Rung
from difftune.trainables.data.views import ViewCycle
from difftune.trainables.heads import Request
from difftune.trainables.model import unet
from difftune.trainables.model.cost import entry_bytes, unet_costs
from difftune.trainables.model.features import (
    PRECISIONS,
    ExtractionError,
    Extractor,
    block_sizes,
    check_blocks,
    check_pool,
    check_timestep,
    precision_for,
)
from difftune.trainables.model.unet import shared_unet
from difftune.trainables.pipeline import SPLITS, TrialData, split_views, trial_dataset
from difftune.trainables.progress import DEFAULT_EVERY_S

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=32)
def _fingerprint(model: str, checkpoint: str | None, stamp: tuple) -> str:
    return unet.model_fingerprint(model, checkpoint=checkpoint)


def model_key(model: str, checkpoint: str | None) -> str:
    """``unet.model_fingerprint``, memoised per process for an unchanged checkpoint file
    (hashing a 2 GB checkpoint once per trial would cost more than a cache hit saves)."""
    flags, ckpt = unet.resolve(model, checkpoint=checkpoint)
    st = os.stat(ckpt) if ckpt is not None and os.path.isfile(ckpt) else None
    stamp = (json.dumps(flags, sort_keys=True, default=str), str(ckpt),
             st.st_size if st else None, st.st_mtime_ns if st else None)
    return _fingerprint(model, checkpoint, stamp)


class FeatureCache:
    """A :class:`~.pipeline.FeatureSource` serving features from Arrow entries.

    The policy (:mod:`.policy`) follows from ``extra_blocks`` and ``store_pool``:
    ``block-set`` gives both, ``per-request`` neither.

    :param root: a local folder or a pyarrow filesystem URI (``s3://bucket/prefix?...``);
        None means :func:`default_root`.
    :param batch_size: images per U-Net pass on a miss; None: as many as fit the device's
        free memory (:func:`~.cost.batch_for_memory`), at most 256.
    :param store_pool: store misses at this pool size (clamped to the block's map) when the
        requested p divides it, so that later trials with smaller pools hit.
    :param extra_blocks: the search space's blocks; a miss extracts all of them in the same
        forward pass (it runs up to the deepest of them).
    :param budget: bytes everything under the root may take; before a miss writes, least
        recently used entries are evicted to make room. None: no limit.
    :param data_files: split -> :func:`~.fingerprint.files_fingerprint` of the data, computed once
        by the search's driver (None: walked here at each lookup).
    :param data_hash: how the data files are fingerprinted when ``data_files`` lacks a split.
    :param precision: the U-Net's precision on a miss (default: the device's, see
        :func:`~.features.precision_for`); part of every entry's key.
    :param record_throughput: remember the measured extraction rate in the root (what
        ``difftune plan`` reads).
    :param lock_stale_s: a lock untouched this long belongs to a dead process.
    :param mirror: local folder that entries of a remote root are copied into and mapped from.
    :param on_progress: takes progress lines of long extractions (:class:`~.progress.Progress`:
        images/s, time left), e.g. to show them on a search's console.
    :param progress_s: seconds between those lines.
    """

    def __init__(self, root: str | None = None, *, device: str = "cpu",
                 batch_size: int | None = None, store_pool: int | None = None,
                 extra_blocks: Sequence[int] = (), budget: int | None = None,
                 data_files: Mapping[str, str] | None = None, data_hash: str = "size",
                 precision: str | None = None, channels_last: bool = False,
                 record_throughput: bool = False, progress: bool = False,
                 dtype: str = "float16", lock_stale_s: float = 120.0,
                 mirror: str | None = None, filesystem: pafs.FileSystem | None = None,
                 on_progress: Callable[[str], None] | None = None,
                 progress_s: float = DEFAULT_EVERY_S):
        self.root = root or default_root()
        self.store = Store(self.root, filesystem)
        self.device, self.batch_size, self.progress = device, batch_size, progress
        self.store_pool, self.extra_blocks = store_pool, sorted(set(extra_blocks))
        self.budget, self.data_files = budget, dict(data_files or {})
        self.data_hash, self.record_throughput = data_hash, record_throughput
        if precision is not None and precision not in PRECISIONS:
            raise ExtractionError(f"precision={precision!r} is unknown; allowed: "
                                  f"{list(PRECISIONS)}")
        self.precision = precision or precision_for(device)
        self.channels_last = channels_last
        self.dtype, self.lock_stale_s = np.dtype(dtype).name, lock_stale_s
        self.mirror = mirror or os.path.join(tempfile.gettempdir(), "difftune-mirror")
        self.stats = CacheStats()
        self.on_progress, self.progress_s = on_progress, progress_s
        self._extractor: Extractor | None = None
        self.serving: set[str] = set()  # entries this process serves (never evicted by it)

    @property
    def unet_images(self) -> int:
        """Images this cache has passed through the U-Net (on misses) in this process."""
        return self.stats.forward_images

    # -- FeatureSource
    def prepare(self, cfg: TrialConfig, requests: Sequence[Request],
                splits: Sequence[str] = SPLITS, *, rung: Rung | None = None) -> TrialData:
        if rung is not None:  # every rung, the last too, reads (and extends) prefix entries
            return prefix.prepare_rung(self, cfg, requests, splits, rung)
        out = {}
        for split in splits:
            views = [self.get(cfg, split, requests, view=v)
                     for v in range(split_views(cfg, split))]
            out[split] = views[0] if len(views) == 1 else ViewCycle(views)
        first = next(iter(out.values()))
        return TrialData(out, first.shapes(), len(first.classes))

    def get(self, cfg: TrialConfig, split: str, requests: Sequence[Request], *, view: int = 0
            ) -> CachedFeatures:
        """The features of ``requests`` ((t, block, pool)) for one split of ``cfg``'s data
        (view ``view`` of its images, :mod:`.views`), extracting and storing the missing
        ones."""
        try:
            return self._get(cfg, split, requests, view)
        except FileNotFoundError:  # evicted by another process between lookup and open
            logger.info("a cache entry went away while opening it; looking up again")
            return self._get(cfg, split, requests, view)

    def get_prefix(self, cfg: TrialConfig, split: str, requests: Sequence[Request], rows: int,
                   *, view: int = 0) -> CachedFeatures:
        """The features of ``requests`` over the first ``rows`` images of ``split`` in its
        interleaved order (a rung's sample), extending stored entries by the images they
        lack (:mod:`.prefix`). Whole-split entries (:meth:`get`) are other entries."""
        try:
            return prefix.get_prefix(self, cfg, split, requests, rows, view=view)
        except FileNotFoundError:  # evicted by another process between lookup and open
            return prefix.get_prefix(self, cfg, split, requests, rows, view=view)

    def resolve(self, cfg: TrialConfig, split: str, requests: Sequence[Request], view: int = 0
                ) -> tuple:
        """``(model, diffusion, dataset, base key, {t: {block: pool}}, model flags)`` of
        ``requests`` on one split of ``cfg``'s data, view ``view`` (checked against the
        model)."""
        model, diffusion = shared_unet(cfg.model, cfg.checkpoint, self.device)
        ds, _ = trial_dataset(cfg, split, model.image_size)
        # val and test are never subsampled, and without a fraction the subset seed is moot
        frac = None if split != "train" or cfg.label_fraction in (None, 1, 1.0) \
            else cfg.label_fraction
        base = EntryKey(model=cfg.model, model_fp=model_key(cfg.model, cfg.checkpoint),
                        data=cfg.data, split=split, image_size=model.image_size,
                        data_fp=data_fingerprint(cfg.data, split=split,
                                                 image_size=model.image_size,
                                                 label_fraction=frac,
                                                 seed=cfg.seed if frac is not None else 0,
                                                 holdout=cfg.holdout,
                                                 bad_images=cfg.bad_images,
                                                 files=self.data_files.get(split),
                                                 data_hash=self.data_hash),
                        t=0, seed=cfg.noise_seed, block=0, pool=0, dtype=self.dtype,
                        precision=self.precision, view=view)
        by_t: dict[int, dict[int, int]] = {}
        for t, b, p in requests:
            check_timestep(diffusion, t)
            check_blocks(model, [b])
            if check_pool(p) is None:
                raise ExtractionError("the feature cache stores pooled maps; pool=None is "
                                      "not allowed (give a positive int)")
            by_t.setdefault(t, {})[b] = p
        flags = unet.resolve(cfg.model, checkpoint=cfg.checkpoint)[0]
        return model, diffusion, ds, base, by_t, flags

    def _get(self, cfg: TrialConfig, split: str, requests: Sequence[Request], view: int
             ) -> CachedFeatures:
        model, diffusion, ds, base, by_t, flags = self.resolve(cfg, split, requests, view)
        classes = trial_dataset(cfg, split, model.image_size)[1]
        served: dict[tuple[int, int], tuple[EntryPath, int]] = {}
        for t, wanted in by_t.items():
            group = dataclasses.replace(base, t=t)
            for b, path in self._ensure(model, diffusion, ds, group, wanted, flags).items():
                served[(t, b)] = (path, wanted[b])
        out = CachedFeatures.of(served)
        expected = np.asarray(dataset_indices(ds), dtype=np.int64)
        for key, m in out.maps().items():
            if not np.array_equal(m.column(0), expected):
                raise RuntimeError(f"cache entry {served[key][0]} holds other images than "
                                   f"{cfg.data} {split}")
        out.classes = list(classes)
        return out

    def writer(self, key: EntryKey, shape: tuple[int, int, int], native: int | None = None
               ) -> EntryWriter:
        """A streaming writer of one entry (``write`` record batches, then ``commit``)."""
        return EntryWriter(self.store, key, shape, native or shape[-1])

    def open(self, entries: dict[tuple[int, int], tuple[EntryKey, int]]) -> CachedFeatures:
        """A dataset over stored entries: (t, block) -> (key at its stored P, pool served)."""
        served = {}
        for name, (key, p) in entries.items():
            marker = self.store.read_json(f"{key.group}/{key.name}.json")
            path = self._local_copy(key, marker) if marker else None
            if path is None or not check_entry(path, marker):
                raise FileNotFoundError(f"no valid cache entry {key.group}/{key.name}")
            served[name] = (path, p)
        return CachedFeatures.of(served)

    # -- lookup and the miss path (also used by :func:`~.shard.extract_sharded`)
    def extractor_for(self, model, diffusion) -> Extractor:
        if self._extractor is None or self._extractor.model is not model:
            self._extractor = Extractor(model, diffusion, precision=self.precision,
                                        channels_last=self.channels_last)
        return self._extractor

    def batch_for(self, flags: dict, upto: int) -> int:
        """The configured batch, or as many images as fit the device's free memory."""
        return self.batch_size or batch_to_fit(flags, upto, precision=self.precision,
                                               device=self.device)

    def _local_copy(self, key: EntryKey, marker: dict) -> EntryPath | None:
        return entry_paths(self.store, f"{key.group}/{key.name}", marker, self.mirror)

    def lookup(self, key: EntryKey, p: int, native: int, *, purge: bool = False
               ) -> EntryPath | None:
        """A verified local path of a stored entry serving ``key`` at pool p, or None.
        With ``purge`` (only under the lock) a corrupt entry is counted, logged, deleted."""
        sizes = []
        for info in self.store.files(key.group):
            m = ENTRY_NAME.match(info.base_name)
            if m and int(m[1]) == key.block and m[3] == key.dtype:
                big = int(m[2])
                if big == p or (big % p == 0 and native % big == 0):
                    sizes.append(big)
        for big in sorted(sizes, key=lambda s: (s != p, s)):
            k = dataclasses.replace(key, pool=big)
            marker = self.store.read_json(f"{k.group}/{k.name}.json") or {}
            stored = {n: v for n, v in marker.get("key", {}).items() if n not in ("model", "data")}
            if stored != k.content():
                continue
            path = self._local_copy(k, marker)
            if path is not None and check_entry(path, marker):
                self.stats.entries_derived += big != p
                touch(self.store, f"{k.group}/{k.name}")
                self.serving.add(f"{k.group}/{k.name}")
                return path
            if purge:
                self.stats.entries_corrupt += 1
                logger.warning("cache entry %s/%s is corrupt (checksum or size mismatch); "
                               "re-extracting it", self.store.path(k.group), k.name)
                delete_entry(self.store, f"{k.group}/{k.name}")
                for local in ((path,) if isinstance(path, str) else path or ()):
                    if not self.store.local and os.path.isfile(local):
                        os.remove(local)
        return None

    def find(self, group: EntryKey, wanted: Mapping[int, int], native: Mapping[int, int],
             found: dict[int, EntryPath], *, purge: bool = False) -> dict[int, int]:
        """Look up ``wanted`` (block -> pool) at ``group``: what a stored entry serves goes
        into ``found`` (block -> path). :return: the rest (block -> pool), the misses."""
        missing = {}
        for b, p in wanted.items():
            path = self.lookup(dataclasses.replace(group, block=b), p, native[b], purge=purge)
            if path is None:
                missing[b] = p
            else:
                found[b] = path
        return missing

    @contextlib.contextmanager
    def locked(self, group: EntryKey) -> Iterator[None]:
        """Hold ``group``'s lock (one extracting process per group), the debris of writers
        that died swept away."""
        lock = CacheLock(self.store, f"{group.group}/.lock", self.lock_stale_s)
        with lock:
            self.stats.lock_waits += lock.waited
            sweep_tmp(self.store, group.group)
            yield

    def miss_plan(self, group: EntryKey, missing: dict[int, int], native: dict[int, int]
                  ) -> dict[int, int]:
        """block -> stored pool of what a miss of ``missing`` at ``group`` writes: the
        missing entries and every ``extra_blocks`` entry not stored yet (the policy)."""
        plan = {b: stored_pool(p, native[b], self.store_pool) for b, p in missing.items()}
        default = max(missing.values())
        for b in self.extra_blocks:
            if b not in plan and b in native:
                k = dataclasses.replace(group, block=b,
                                        pool=stored_pool(min(default, native[b]), native[b],
                                                             self.store_pool))
                if self.store.info(f"{k.group}/{k.name}.json").type == pafs.FileType.NotFound:
                    plan[b] = k.pool
        return plan

    def room_for(self, flags: dict, rows: int, plan: dict[int, int]) -> None:
        """Under a budget, evict least recently used entries for ``plan``'s entries."""
        if self.budget is not None:
            costs = unet_costs(flags)
            need = sum(entry_bytes(rows, costs[b].channels, p, self.dtype)
                       for b, p in plan.items())
            make_room(self.store, need, self.budget, keep=self.serving)

    def _ensure(self, model, diffusion, ds: Dataset, group: EntryKey, wanted: dict[int, int],
                flags: dict) -> dict[int, EntryPath]:
        native = block_sizes(model)
        found: dict[int, EntryPath] = {}
        missing = self.find(group, wanted, native, found)
        if missing:
            with self.locked(group):
                missing = self.find(group, missing, native, found, purge=True)
                if missing:
                    found.update(self._extract(model, diffusion, ds, group, missing, native,
                                               flags))
        self.stats.entries_reused += len(wanted) - len(missing)
        return found

    def _extract(self, model, diffusion, ds: Dataset, group: EntryKey, missing: dict[int, int],
                 native: dict[int, int], flags: dict) -> dict[int, EntryPath]:
        """One forward pass per image batch at ``group.t`` writing the missing entries and
        every ``extra_blocks`` entry (the search space's block set) not stored yet, so that a
        search pays one U-Net pass per image and timestep."""
        plan = self.miss_plan(group, missing, native)
        indices = dataset_indices(ds)
        if not indices:
            raise ValueError(f"no images to extract for {group.data} {group.split}")
        self.room_for(flags, len(indices), plan)
        extractor = self.extractor_for(model, diffusion)
        done = extract_entries(extractor, ds, indices, self.store, group, plan, native,
                               batch=self.batch_for(flags, max(plan)), bar=self.progress,
                               on_progress=self.on_progress, progress_s=self.progress_s)
        self.stats.add(done)
        logger.info("cache: wrote %d entries for %s %s t=%d (blocks %s)", len(done.done),
                    group.data, group.split, group.t, sorted(done.done))
        if self.record_throughput:  # what this process measured so far
            record_rate(self.store, group, flags, throughput.device_kind(extractor.device),
                        max(plan),
                        images=self.stats.timed_images, seconds=self.stats.forward_seconds)
        out = {}
        for b in missing:
            key = dataclasses.replace(group, block=b, pool=plan[b])
            path = self._local_copy(key, done.done[b])
            if path is None or not check_entry(path, done.done[b]):
                raise OSError(f"cache entry {key.group}/{key.name} vanished after writing it")
            self.serving.add(f"{key.group}/{key.name}")
            out[b] = path
        return out
