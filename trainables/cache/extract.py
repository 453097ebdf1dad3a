"""The miss path: one U-Net forward pass per image batch at one timestep, its features written
into the entries of a *plan* (block -> stored pool). A trial's miss
(:class:`~.feature_cache.FeatureCache`) writes whole entries with it; a shard of a sharded
extraction (:mod:`.shard`) writes one part of each entry with the same loop, so both store the
same rows in the same order.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from difftune.trainables.cache import throughput
from difftune.trainables.cache.entry import EntryWriter
from difftune.trainables.cache.parts import part_writer
from difftune.trainables.cache.store import EntryKey, Store
from difftune.trainables.data.views import view_batch
from difftune.trainables.model.cost import (
    activation_bytes_per_image,
    batch_for_memory,
    free_memory,
    unet_costs,
)
from difftune.trainables.model.features import Extractor
from difftune.trainables.progress import DEFAULT_EVERY_S, Progress

logger = logging.getLogger(__name__)


@dataclass
class Extracted:
    """What one extraction wrote: block -> what ``finish`` gave for its writer (a marker, or
    a part's record), the rows' shapes, and the passes it ran."""

    done: dict[int, dict] = field(default_factory=dict)
    shapes: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    images: int = 0
    batches: int = 0
    timed_images: int = 0  # every batch but the first (warm-up), unless there is one only
    seconds: float = 0.0  # ... and their time


@dataclass
class CacheStats:
    """What a :class:`~.feature_cache.FeatureCache` did in this process: its lookups and
    the passes of its misses."""

    forward_batches: int = 0  # U-Net forward passes run on a miss
    forward_images: int = 0
    entries_reused: int = 0  # requests served by a stored entry (at p or derived)
    entries_derived: int = 0  # ... of which pooled down from a larger stored P
    entries_written: int = 0
    entries_corrupt: int = 0  # entries whose checksum failed (re-extracted)
    lock_waits: int = 0  # times another process held the lock we needed
    forward_seconds: float = 0.0  # time of the U-Net passes (first batch of each miss excluded)
    timed_images: int = 0  # ... and the images they passed

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)



    def add(self, done: Extracted) -> None:
        """Count the passes of one extraction."""
        self.forward_batches += done.batches
        self.forward_images += done.images
        self.entries_written += len(done.done)
        self.forward_seconds += done.seconds
        self.timed_images += done.timed_images


def batch_to_fit(flags: dict, upto: int, *, precision: str, device: str | torch.device) -> int:
    """As many images per pass to block ``upto`` as fit the device's free memory."""
    per_image, fixed = activation_bytes_per_image(flags, upto, precision=precision)
    batch = batch_for_memory(free_memory(device), per_image, fixed)
    logger.info("extraction batch %d: %.3g MB of activations per image to block %d (%s)",
                batch, per_image / 1e6, upto, precision)
    return batch


def record_rate(store: Store, group: EntryKey, flags: dict, device: str, upto: int, *,
                images: int, seconds: float) -> None:
    """Remember in the root the rate of ``images`` passes to block ``upto`` in ``seconds``
    on a device of kind ``device`` (:func:`~.throughput.device_kind`), for the plan."""
    throughput.record(store, model=group.model, flags=flags, device=device,
                      precision=group.precision, images=images, seconds=seconds,
                      gflops_per_image=unet_costs(flags)[upto].gflops_to, upto=upto)


def extract_rows(extractor: Extractor, loader: DataLoader, indices: Sequence[int], store: Store,
                 group: EntryKey, plan: dict[int, int], native: dict[int, int], *,
                 finish: Callable[[EntryWriter], dict], shard: int | None = None,
                 on_batch: Callable[[int, int], None] | None = None,
                 skip: Mapping[int, int] | None = None) -> Extracted:
    """Pass ``loader``'s images (dataset indices ``indices``, in order) through the U-Net at
    ``group``'s timestep, noise seed and view, writing block b of ``plan`` at pool
    ``plan[b]``: into the entry itself, or with ``shard`` into that shard's part file.
    ``finish(writer)`` ends each writer once every row is in (``EntryWriter.commit``
    publishes the entry); on any error every writer is aborted. ``on_batch(images of the
    batch, images done)`` after each batch. ``skip[b]``: block b writes no row before the
    pass's row ``skip[b]`` (an entry that extends, already holding them: :mod:`.prefix`)."""
    out = Extracted()
    writers: dict[int, EntryWriter] = {}
    try:
        for i, (x0, labels) in enumerate(loader):
            idx = indices[out.images:out.images + len(x0)]
            began = time.perf_counter()
            x, noise = view_batch(x0, idx, t=group.t, seed=group.seed, view=group.view)
            feats = extractor.extract(x, group.t, plan, indices=idx, seed=group.seed,
                                      noise=noise)
            feats = {b: f.cpu() for b, f in feats.items()}  # waits for the device
            if i > 0 or len(loader) == 1:
                out.timed_images += len(x0)
                out.seconds += time.perf_counter() - began
            for b, f in feats.items():
                drop = max(0, (skip or {}).get(b, 0) - out.images)  # rows b already holds
                if drop >= len(x0):
                    continue
                if drop:
                    f = f[drop:]
                if b not in writers:
                    key = dataclasses.replace(group, block=b, pool=plan[b])
                    shape = tuple(f.shape[1:])
                    writers[b] = EntryWriter(store, key, shape, native[b]) if shard is None \
                        else part_writer(store, key, shape, native[b], shard)
                writers[b].write(idx[drop:], labels[drop:], f)
            out.batches += 1
            out.images += len(x0)
            if on_batch is not None:
                on_batch(len(x0), out.images)
        out.done = {b: finish(w) for b, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    out.shapes = {b: w.shape for b, w in writers.items()}
    return out


def extract_entries(extractor: Extractor, ds: Dataset, indices: Sequence[int], store: Store,
                    group: EntryKey, plan: dict[int, int], native: dict[int, int], *,
                    batch: int, bar: bool = False,
                    on_progress: Callable[[str], None] | None = None,
                    progress_s: float = DEFAULT_EVERY_S) -> Extracted:
    """Extract and publish the entries of ``plan`` at ``group`` over all of ``ds`` (a
    trial's miss), with a progress bar (``bar``) and progress lines for ``on_progress``.
    :return: what :func:`extract_rows` did; ``done`` holds the published markers."""
    loader = DataLoader(ds, batch_size=batch, shuffle=False)
    view = f" view {group.view}" if group.view else ""
    progress = Progress(f"extract {group.split} t={group.t}{view} ({len(plan)} blocks)",
                        len(indices), on_progress, progress_s)
    with tqdm(total=len(loader), desc=f"extract {group.split} t={group.t} view {group.view}",
              unit="batch", disable=not bar, leave=False) as pbar:
        def step(images: int, _done: int) -> None:
            pbar.update(1)
            progress.update(images)

        out = extract_rows(extractor, loader, indices, store, group, plan, native,
                           finish=EntryWriter.commit, on_batch=step)
    progress.close()
    return out
