"""What the feature cache stores on a miss (its *policy*), and how it stays under a storage
budget.

- ``block-set``: a miss at timestep t extracts every block the search space can ask for
  (:attr:`~difftune.search.space.spec.Space.block_set`) at the space's ``cache_pool``, in the one
  U-Net pass the miss pays anyway: the whole search then costs one pass per image and
  timestep. Chosen when all of it fits the budget.
- ``per-request``: a miss stores only what the trial asked, at the pool it asked, and the
  pass stops after the deepest block asked (early exit): at most one pass per trial and
  timestep. Chosen when the block set does not fit; with a budget, the least recently used
  entries are evicted to make room (:func:`make_room`), so the cache holds at most the
  budget, provided the entries of the trials running at once fit in it (``difftune plan``
  checks that before a search starts).

The plan (:mod:`difftune.search.plan.estimate`) and the cache (:mod:`.feature_cache`) share
the arithmetic here so that what is planned is what is stored.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Collection
from dataclasses import dataclass

from difftune.trainables.cache.parts import delete_entry, entry_of
from difftune.trainables.cache.store import ENTRY_NAME, Store

logger = logging.getLogger(__name__)

POLICIES = ("block-set", "per-request")


def stored_pool(p: int, native: int, store_pool: int | None) -> int:
    """The pool an entry serving pool ``p`` of a block whose map is ``native`` wide is stored
    at: ``min(store_pool, native)`` when ``p`` divides it and it divides ``native`` (average
    pooling then composes exactly, so the entry serves every such ``p``), else ``p``."""
    big = min(store_pool, native) if store_pool else p
    return big if big % p == 0 and native % big == 0 else p


@dataclass(frozen=True)
class StoredEntry:
    """One published entry as the budget sees it."""

    rel: str  # below the root, without the extension
    bytes: int  # data + marker
    used_ns: int  # when it was last served (its marker's modification time)

    @property
    def group(self) -> str:
        return posixpath.dirname(self.rel)


def usage(store: Store) -> tuple[int, list[StoredEntry]]:
    """``(bytes of every file under the root, the published entries)``."""
    files = store.files(recursive=True)
    sizes = {i.path[len(store.base) + 1:]: i for i in files}
    total = sum(i.size for i in files)
    data: dict[str, int] = {}  # entry -> bytes of its data file or parts
    for rel, info in sizes.items():
        name = entry_of(posixpath.basename(rel))
        if name:
            stem = posixpath.join(posixpath.dirname(rel), name)
            data[stem] = data.get(stem, 0) + info.size
    entries = []
    for rel, info in sizes.items():
        if ENTRY_NAME.match(posixpath.basename(rel)):
            stem = rel[: -len(".json")]
            entries.append(StoredEntry(stem, info.size + data.get(stem, 0),
                                       info.mtime_ns or 0))
    return total, entries


def touch(store: Store, rel: str) -> None:
    """Mark entry ``rel`` (without extension) used now, for the least-recently-used order
    (a local or mounted root; on an object store an entry's age is its creation)."""
    if store.local:
        try:
            os.utime(store.path(rel + ".json"))
        except OSError:
            pass


def make_room(store: Store, need: int, budget: int, *, keep: Collection[str] = ()) -> int:
    """Evict least recently used entries until everything under the root plus ``need`` bytes
    fits ``budget``. Never evicted: an entry of ``keep`` (rels without extension, e.g. what
    this process serves), nor one in a group some process holds the lock of (being
    written). A process already reading an evicted entry keeps reading it (an open file
    outlives its name). :return: bytes evicted."""
    total, entries = usage(store)
    if total + need <= budget:
        return 0
    locked = {posixpath.dirname(i.path[len(store.base) + 1:])
              for i in store.files(recursive=True) if i.base_name == ".lock"}
    evicted = 0
    for e in sorted(entries, key=lambda e: e.used_ns):
        if total + need <= budget:
            break
        if e.rel in keep or e.group in locked:
            continue
        delete_entry(store, e.rel)  # marker first: never half-visible
        total -= e.bytes
        evicted += e.bytes
        logger.info("cache budget: evicted %s (%d bytes, least recently used)", e.rel, e.bytes)
    if total + need > budget:
        logger.warning("cache budget %d bytes: %d bytes are stored or being read and %d more "
                       "are needed; writing over budget", budget, total, need)
    return evicted
