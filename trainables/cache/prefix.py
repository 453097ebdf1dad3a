"""Cache entries that extend (the foundation of rungs over images): an entry holding the
features of the first n images of a split in its interleaved order
(:func:`~difftune.trainables.data.order.interleaved_order`), which grows from n to m images
by passing only the m - n new ones through the U-Net.

A prefix entry is a sharded entry (:mod:`.parts`) whose key names the order
(``EntryKey.order`` = :data:`~difftune.trainables.data.order.ORDER`, so it lives in its own
group folder, ``t<t>-s<seed>-<precision>[-v<view>]-interleaved-v1``, and never answers a
whole-split lookup, nor a whole-split entry a prefix one). Its manifest lists parts in row
order; an extension writes one more part per block (rows n..m, under a temporary name, then
renamed) and publishes the manifest over the old parts and the new one, replacing the old
manifest in one rename (one PUT on an object store): a reader sees n rows or m rows, never a
part that is not complete. Old parts are never rewritten, so a reader of the first n rows
reads the same bytes before and after an extension; it maps only the parts holding them
(:func:`head_marker`) and reads only its rows (:meth:`~.entry.CachedFeatures.of` ``rows``).

One pass per extension serves every block of the policy (:meth:`~.feature_cache.FeatureCache.miss_plan`'s
block set): it starts at the fewest rows any of them holds, and a block holding more writes
only the rows it lacks (``skip`` of :func:`~.extract.extract_rows`), so no image passes twice
for one (t, view) while the block set stays the same. Extensions of one group run under its
lock, one process at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset, Subset

from difftune.trainables.cache import throughput
from difftune.trainables.cache.entry import CachedFeatures
from difftune.trainables.cache.extract import extract_rows, record_rate
from difftune.trainables.cache.parts import (
    EntryPath,
    check_entry,
    delete_entry,
    entry_paths,
    part_record,
    publish,
    sweep_parts,
)
from difftune.trainables.cache.policy import stored_pool, touch
from difftune.trainables.cache.store import ENTRY_NAME, EntryKey
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import dataset_indices, targets_of
from difftune.trainables.data.order import ORDER, Rung, interleaved_order
from difftune.trainables.data.views import ViewCycle
from difftune.trainables.heads import Request
from difftune.trainables.model.features import block_sizes
from difftune.trainables.pipeline import TrialData, split_views, trial_dataset
from difftune.trainables.progress import Progress

logger = logging.getLogger(__name__)


#: data fingerprint -> the interleaved order of that split (per process; ImageNet's train
#: split takes seconds to order)
_ORDERS: dict[str, np.ndarray] = {}


def split_order(ds: Dataset, data_fp: str) -> np.ndarray:
    """:func:`~difftune.trainables.data.order.interleaved_order` of ``ds`` (the split whose
    fingerprint is ``data_fp``), memoised per process. :return: [N] positions in ``ds``."""
    order = _ORDERS.get(data_fp)
    if order is None or len(order) != len(ds):
        if len(_ORDERS) >= 8:
            _ORDERS.pop(next(iter(_ORDERS)))
        order = _ORDERS[data_fp] = interleaved_order(targets_of(ds))
        order.flags.writeable = False
    return order


def head_marker(marker: dict, rows: int) -> dict:
    """The manifest of the first ``rows`` rows of a prefix entry: its first parts, as many as
    hold them (the last may hold more), with their rows, bytes and sha256."""
    parts, at = [], 0
    for p in marker["parts"]:
        if at >= rows:
            break
        parts.append(p)
        at += p["rows"]
    sha = hashlib.sha256("\n".join(p["sha256"] for p in parts).encode()).hexdigest()
    return {**marker, "parts": parts, "rows": at, "sha256": sha,
            "bytes": sum(p["bytes"] for p in parts)}


def stored(cache, key: EntryKey, p: int, native: int) -> list[tuple[EntryKey, dict]]:
    """The published prefix entries of ``key``'s block that serve pool ``p`` (at p, or at a
    P that p divides): ``(key at P, manifest)``, p first, then by P."""
    out = []
    for info in cache.store.files(key.group):
        m = ENTRY_NAME.match(info.base_name)
        if not (m and int(m[1]) == key.block and m[3] == key.dtype):
            continue
        big = int(m[2])
        if big == p or (big % p == 0 and native % big == 0):
            k = dataclasses.replace(key, pool=big)
            marker = cache.store.read_json(f"{k.group}/{k.name}.json") or {}
            fields = {n: v for n, v in marker.get("key", {}).items() if n not in ("model", "data")}
            if fields == k.content() and marker.get("parts"):
                out.append((k, marker))
    return sorted(out, key=lambda e: (e[0].pool != p, e[0].pool))


def open_head(cache, key: EntryKey, marker: dict, rows: int) -> EntryPath | None:
    """Verified local paths of the parts holding the first ``rows`` rows, or None."""
    head = head_marker(marker, rows)
    path = entry_paths(cache.store, f"{key.group}/{key.name}", head, cache.mirror)
    return path if path is not None and check_entry(path, head) else None


def _purge(cache, key: EntryKey) -> None:
    cache.stats.entries_corrupt += 1
    logger.warning("cache entry %s/%s is corrupt (checksum or size mismatch); re-extracting "
                   "it", cache.store.path(key.group), key.name)
    delete_entry(cache.store, f"{key.group}/{key.name}")


def find(cache, group: EntryKey, wanted: Mapping[int, int], native: Mapping[int, int],
         rows: int, found: dict[int, EntryPath], *, purge: bool = False) -> dict[int, int]:
    """Look up the first ``rows`` rows of ``wanted`` (block -> pool) at ``group`` (a prefix
    group): what a stored entry of at least ``rows`` rows serves goes into ``found``.
    :return: the rest (block -> pool). With ``purge`` (under the lock), a corrupt entry is
    counted, logged and deleted."""
    missing = {}
    for b, p in wanted.items():
        for k, marker in stored(cache, dataclasses.replace(group, block=b), p, native[b]):
            if marker["rows"] < rows:
                continue
            path = open_head(cache, k, marker, rows)
            if path is not None:
                found[b] = path
                cache.stats.entries_derived += k.pool != p
                touch(cache.store, f"{k.group}/{k.name}")
                cache.serving.add(f"{k.group}/{k.name}")
                break
            if purge:
                _purge(cache, k)
        else:
            missing[b] = p
    return missing


def _holding(cache, group: EntryKey, b: int, p: int, native: int, *, extra: bool
             ) -> tuple[EntryKey, dict | None]:
    """The entry block ``b`` extends (its key at the stored pool, and its manifest if it holds
    rows whose parts check; a corrupt one is purged): for a block asked at ``p``, the stored
    entry serving p that holds the most rows, else a new one at the policy's pool; for an
    extra block of the policy (``extra``), the entry at the policy's pool."""
    pool = stored_pool(p, native, cache.store_pool)
    key = dataclasses.replace(group, block=b, pool=pool)
    candidates = stored(cache, dataclasses.replace(group, block=b), p, native)
    if extra:
        candidates = [(k, m) for k, m in candidates if k.pool == pool]
    if not candidates:
        return key, None
    key, marker = max(candidates, key=lambda e: e[1]["rows"])
    if open_head(cache, key, marker, marker["rows"]) is None:
        _purge(cache, key)
        return key, None
    return key, marker


def extend(cache, model, diffusion, ds: Dataset, order: np.ndarray, group: EntryKey,
           missing: Mapping[int, int], native: Mapping[int, int], flags: dict, rows: int
           ) -> dict[int, EntryPath]:
    """Extend (or start) the prefix entries of ``missing`` (block -> pool) at ``group`` to
    ``rows`` rows, and every entry of the policy's block set with them, in one pass over the
    images they lack; publish each with its new part. Run under ``group``'s lock.

    :param order: [N] positions in ``ds`` of the split's images, in the interleaved order.
    :return: block of ``missing`` -> verified local paths of its first ``rows`` rows.
    """
    default = max(missing.values())
    asked = {b: (p, False) for b, p in missing.items()}
    for b in cache.extra_blocks:
        if b not in asked and b in native:
            asked[b] = (min(default, native[b]), True)
    keys: dict[int, EntryKey] = {}
    held: dict[int, list[dict]] = {}
    for b, (p, extra) in asked.items():
        key, marker = _holding(cache, group, b, p, native[b], extra=extra)
        if marker is not None and marker["rows"] >= rows:
            continue  # an extra block holding enough already
        keys[b], held[b] = key, list(marker["parts"]) if marker else []
        sweep_parts(cache.store, f"{key.group}/{key.name}",  # attempts that never published
                    keep=[part["file"] for part in held[b]])
    plan = {b: k.pool for b, k in keys.items()}
    start = {b: sum(part["rows"] for part in held[b]) for b in plan}
    lo = min(start.values())
    cache.room_for(flags, rows - lo, plan)
    take = [int(i) for i in order[lo:rows]]
    indices = dataset_indices(ds)
    loader = DataLoader(Subset(ds, take), batch_size=cache.batch_for(flags, max(plan)),
                        shuffle=False)
    extractor = cache.extractor_for(model, diffusion)
    progress = Progress(f"extend {group.split} t={group.t} to {rows} images ({len(plan)} "
                        "blocks)", rows - lo, cache.on_progress, cache.progress_s)
    done = extract_rows(
        extractor, loader, [indices[i] for i in take], cache.store, group, plan, dict(native),
        shard=lo, skip={b: s - lo for b, s in start.items()},
        on_batch=lambda n, _done: progress.update(n),
        finish=lambda w: part_record(w, w.close(), shard=lo, start=start[w.key.block],
                                     node=None))
    progress.close()
    cache.stats.add(done)
    for b, key in keys.items():
        publish(cache.store, key, [*held[b], done.done[b]], shape=done.shapes[b],
                native=native[b])
    logger.info("cache: extended %d entries of %s %s t=%d from %d to %d images (blocks %s)",
                len(plan), group.data, group.split, group.t, lo, rows, sorted(plan))
    if cache.record_throughput:
        record_rate(cache.store, group, flags, throughput.device_kind(extractor.device),
                    max(plan), images=cache.stats.timed_images,
                    seconds=cache.stats.forward_seconds)
    out: dict[int, EntryPath] = {}
    lost = find(cache, group, missing, native, rows, out)
    if lost:
        raise OSError(f"cache entries of blocks {sorted(lost)} at {group.group} vanished "
                      "after extending them")
    return out


class InSplitOrder(Subset):
    """The rows of a prefix entry (the interleaved order's first n images) as the split holds
    them: item i is the i-th of those images by its position in the split. A trial trains on
    a rung's sample in the order a search without rungs reads its split, so that the last
    rung trains on exactly what such a trial does (and ``difftune train`` of an exported
    config gives the same numbers)."""

    def __init__(self, features: CachedFeatures, prefix_order: np.ndarray):
        super().__init__(features, np.argsort(prefix_order, kind="stable").tolist())
        self.classes = features.classes
        self.labels = np.asarray(features.labels)[self.indices]

    def shapes(self) -> dict:
        return self.dataset.shapes()


def prepare_rung(cache, cfg: TrialConfig, requests: Sequence[Request], splits: Sequence[str],
                 rung: Rung) -> TrialData:
    """What a trial reads at ``rung`` (``FeatureCache.prepare`` at a rung): each split's
    sample in split order (:class:`InSplitOrder`), every view of train, from prefix entries
    (:func:`get_prefix`)."""
    out: dict[str, Dataset] = {}
    for split in splits:
        views = [get_prefix(cache, cfg, split, requests, rung, view=v)
                 for v in range(split_views(cfg, split))]
        views = [InSplitOrder(v, v.order) for v in views]
        out[split] = views[0] if len(views) == 1 else ViewCycle(views)
    first = next(iter(out.values()))
    return TrialData(out, first.shapes(), len(first.classes))


def get_prefix(cache, cfg: TrialConfig, split: str, requests: Sequence[Request],
               rows: int | Rung, *, view: int = 0) -> CachedFeatures:
    """The features of ``requests`` ((t, block, pool)) over the first ``rows`` images of
    ``split`` in its interleaved order (view ``view``), extending the stored prefix entries
    that hold fewer rows by the images they lack. ``cache`` is the
    :class:`~.feature_cache.FeatureCache` whose keys, policy and lock are used.

    :param rows: a count, or a :class:`~..data.order.Rung` (its sample of the split).
    :return: ``rows`` items; item i is the i-th image of the order (``labels`` [rows] aligned).
    """
    model, diffusion, ds, base, by_t, flags = cache.resolve(cfg, split, requests, view)
    order = split_order(ds, base.data_fp)
    if isinstance(rows, Rung):
        rows = rows.rows(ds)
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) \
            or not 1 <= rows <= len(order):
        raise ValueError(f"rows={rows!r} is invalid for {cfg.data} {split}; allowed: an int in "
                         f"1..{len(order)} (its images)")
    rows = int(rows)
    base = dataclasses.replace(base, order=ORDER)
    native = block_sizes(model)
    served: dict[tuple[int, int], tuple[EntryPath, int]] = {}
    for t, wanted in by_t.items():
        group = dataclasses.replace(base, t=t)
        found: dict[int, EntryPath] = {}
        missing = find(cache, group, wanted, native, rows, found)
        if missing:
            with cache.locked(group):
                missing = find(cache, group, missing, native, rows, found, purge=True)
                if missing:
                    found.update(extend(cache, model, diffusion, ds, order, group, missing,
                                        native, flags, rows))
        cache.stats.entries_reused += len(wanted) - len(missing)
        served.update({(t, b): (path, wanted[b]) for b, path in found.items()})
    out = CachedFeatures.of(served, rows=rows)
    expected = np.asarray(dataset_indices(ds), dtype=np.int64)[order[:rows]]
    for key, m in out.maps().items():
        if not np.array_equal(m.column(0)[:rows], expected):
            raise RuntimeError(f"cache entry {served[key][0]} holds other images than the "
                               f"first {rows} of {cfg.data} {split}")
    out.classes = list(trial_dataset(cfg, split, model.image_size)[1])
    out.order = order[:rows]  # [rows] positions in the split of its rows
    return out
