"""The Arrow feature cache: every (image, timestep) U-Net forward pass is paid for once.

An *entry* holds the features of one (model, data split, image size, label-fraction subset,
timestep t, noise seed, block) pooled to P x P: an Arrow IPC file of rows ``(index, label,
x)``, ``x`` the flattened ``[C x P x P]`` map (float16 by default), beside a JSON *marker*
(key, shape, rows, bytes, sha256). Layout under the root (a folder or a pyarrow URI)::

    <model fp>/<data fp>/t<t>-s<noise seed>/b<block>-p<P>-<dtype>.arrow   (data)
                                           /b<block>-p<P>-<dtype>.json    (marker)
                                           /.lock

Fingerprints are content hashes (checkpoint bytes + flags; data files + transform + subset),
so a changed model or data never hits a stale entry. Pool p is served by an entry at p, or
derived exactly from one at P when p | P and P | the native map size (average pooling then
composes). Publishing: data under a temporary name then renamed (object stores: one atomic
PUT), marker last; readers trust only entries whose marker exists and whose checksum matches
(a mismatch is logged and re-extracted). One process per ``t<t>-s<seed>`` directory extracts
at a time, under :class:`_Lock`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import mmap
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import unet
from .config import TrialConfig
from .data import data_fingerprint, dataset_indices
from .features import (
    ExtractionError,
    Extractor,
    autocast_for,
    block_sizes,
    check_blocks,
    check_pool,
    check_timestep,
    model_timesteps,
    run_blocks,
)
from .pipeline import Request, TrialData, cached_dataset, cached_unet

logger = logging.getLogger(__name__)

#: Where the cache lives unless ``--cache`` or ``$DIFFTUNE_CACHE`` says otherwise.
DEFAULT_CACHE = "./difftune_cache"
FORMAT = 1
_NAME = re.compile(r"^b(\d+)-p(\d+)-(\w+)\.json$")


def default_root() -> str:
    """``$DIFFTUNE_CACHE`` if set, else :data:`DEFAULT_CACHE`."""
    return os.environ.get("DIFFTUNE_CACHE") or DEFAULT_CACHE


@dataclass(frozen=True)
class EntryKey:
    """Everything an entry's features depend on (names are for listing only)."""

    model: str
    model_fp: str
    data: str
    data_fp: str
    split: str
    image_size: int
    t: int
    seed: int
    block: int
    pool: int
    dtype: str = "float16"

    @property
    def group(self) -> str:
        return f"{self.model_fp}/{self.data_fp}/t{self.t}-s{self.seed}"

    @property
    def name(self) -> str:
        return f"b{self.block}-p{self.pool}-{self.dtype}"

    def content(self) -> dict:
        """The fields that decide the features (names excluded)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("model", "data")}


@dataclass
class CacheStats:
    """What a :class:`FeatureCache` did in this process."""

    forward_batches: int = 0  # U-Net forward passes run on a miss
    forward_images: int = 0
    entries_reused: int = 0  # requests served by a stored entry (at p or derived)
    entries_derived: int = 0  # ... of which pooled down from a larger stored P
    entries_written: int = 0
    entries_corrupt: int = 0  # entries whose checksum failed (re-extracted)
    lock_waits: int = 0  # times another process held the lock we needed

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- storage


class _Store:
    """A root on a local disk or a pyarrow filesystem; paths below are relative to it."""

    def __init__(self, root: str, filesystem: pafs.FileSystem | None = None):
        if filesystem is None and "://" not in str(root):
            filesystem, base = pafs.LocalFileSystem(), os.path.abspath(root)
        elif filesystem is None:
            filesystem, base = pafs.FileSystem.from_uri(str(root))
        else:
            base = str(root)
        self.fs, self.base = filesystem, base.rstrip("/")
        self.local = isinstance(filesystem, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel))

    def files(self, rel: str = "", recursive: bool = False) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=recursive)
        return [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]

    def read_json(self, rel: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def put(self, rel: str, data: bytes) -> None:
        """Atomic small write (temporary name + rename locally; one PUT on object stores)."""
        final = self.path(rel)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        target = f"{final}.{uuid.uuid4().hex}.tmp" if self.local else final
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if self.local:
            self.fs.move(target, final)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except (FileNotFoundError, OSError):
            pass


class EntryWriter:
    """Streams record batches of one entry, then publishes it (data first, marker last).

    :param shape: ``(C, P, P)`` of one row's map.
    :param native: side of the block's full map (an entry at P serves p only if P | native).
    """

    def __init__(self, store: _Store, key: EntryKey, shape: tuple[int, int, int], native: int):
        self.store, self.key, self.shape, self.native = store, key, tuple(shape), native
        self.rel = f"{key.group}/{key.name}"
        final = store.path(self.rel + ".arrow")
        store.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        self._target = f"{final}.{uuid.uuid4().hex}.tmp" if store.local else final
        meta = {"difftune": json.dumps({"format": FORMAT, "key": dataclasses.asdict(key),
                                        "shape": list(self.shape), "native": native})}
        size = int(np.prod(self.shape))
        self.schema = pa.schema([("index", pa.int64()), ("label", pa.int64()),
                                 ("x", pa.list_(pa.from_numpy_dtype(np.dtype(key.dtype)), size))],
                                metadata=meta)
        self._sink = store.fs.open_output_stream(self._target)
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._sha = hashlib.sha256()
        self.rows = 0

    def write(self, index: Sequence[int], labels: Sequence[int], x: torch.Tensor | np.ndarray
              ) -> None:
        """Append rows. :param x: an [N x C x P x P] Tensor or array of features."""
        x = torch.as_tensor(x).detach()  # torch converts float32 -> float16 faster than numpy
        x = x.to("cpu", getattr(torch, self.key.dtype)).contiguous().numpy()
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"rows of shape {tuple(x.shape[1:])} for an entry of {self.shape}")
        idx = np.asarray(index, dtype=np.int64)
        lab = np.asarray(labels, dtype=np.int64)
        flat = pa.array(x.reshape(-1))
        col = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(self.shape)))
        self._writer.write_batch(pa.record_batch([pa.array(idx), pa.array(lab), col],
                                                 schema=self.schema))
        for part in (idx, lab, x):
            self._sha.update(memoryview(part).cast("B"))
        self.rows += len(idx)

    def commit(self) -> dict:
        """Close and publish; returns the marker."""
        self._writer.close()
        self._sink.close()
        final = self.store.path(self.rel + ".arrow")
        if self.store.local:
            self.store.fs.move(self._target, final)
        marker = {"format": FORMAT, "key": dataclasses.asdict(self.key), "shape": list(self.shape),
                  "native": self.native, "rows": self.rows, "sha256": self._sha.hexdigest(),
                  "bytes": self.store.info(self.rel + ".arrow").size,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "host": socket.gethostname()}
        self.store.put(self.rel + ".json", json.dumps(marker, indent=1).encode())
        return marker

    def abort(self) -> None:
        for close in (self._writer.close, self._sink.close):
            try:
                close()
            except Exception:  # noqa: BLE001 - already failing; cleanup is best effort
                pass
        if self.store.local:
            self.store.delete(self._target[len(self.store.base) + 1:])


class _Mapped:
    """One entry's Arrow file, memory-mapped (zero-copy record batches for the schema, index,
    labels and checksum, whose pages are dropped from RSS with ``madvise(MADV_DONTNEED)``).

    Rows for training are copied out with positional reads (``preadv``) of their byte ranges
    in the same file: they come from the page cache like mapped pages, but never enter this
    process's RSS. (Touching random rows of the mapping instead maps whole page-cache folios:
    on Linux 6.x about 1.6 MB of RSS per random 8 KB row.)
    """

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = pa.py_buffer(self.mm)
        reader = pa.ipc.open_file(pa.BufferReader(buf))
        self.meta = json.loads(reader.schema.metadata[b"difftune"])
        self.shape = tuple(self.meta["shape"])
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.offsets = np.cumsum([0] + [b.num_rows for b in self.batches])
        self.views = [b.column(2).flatten().to_numpy(zero_copy_only=True)
                      .reshape(b.num_rows, *self.shape) for b in self.batches]
        self.dtype = self.views[0].dtype if self.views else np.dtype(np.float16)
        self.row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.starts = [v.ctypes.data - buf.address for v in self.views]  # file offsets
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)

    def column(self, i: int) -> np.ndarray:
        if not self.batches:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([b.column(i).to_numpy() for b in self.batches])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """:return: an [N x C x P x P] array of ``rows``, read from the file."""
        out = np.empty((len(rows), *self.shape), dtype=self.dtype)
        batch = np.searchsorted(self.offsets, rows, side="right") - 1
        for i, (r, j) in enumerate(zip(rows.tolist(), batch.tolist(), strict=True)):
            at = self.starts[j] + (r - int(self.offsets[j])) * self.row_bytes
            if os.preadv(self.fd, [out[i]], at) != self.row_bytes:
                raise OSError(f"short read of row {r} from a cache entry")
        return out

    def checksum(self) -> str:
        sha = hashlib.sha256()
        for b, v in zip(self.batches, self.views, strict=True):
            for part in (b.column(0).to_numpy(), b.column(1).to_numpy(), v):
                sha.update(memoryview(np.ascontiguousarray(part)).cast("B"))
            self.release()
        return sha.hexdigest()

    def release(self) -> None:
        self.mm.madvise(mmap.MADV_DONTNEED)


class CachedFeatures(Dataset):
    """Rows of stored entries: item ``i`` is ``({(t, block): [C x p x p] float32}, label)``.

    :param entries: (t, block) -> (local Arrow path, pool p served); every entry's rows are
        the same images in the same order. Picklable: DataLoader workers re-map the files.
    """

    def __init__(self, entries: dict[tuple[int, int], tuple[str, int]], labels: np.ndarray):
        self.entries, self.labels = dict(entries), np.asarray(labels, dtype=np.int64)
        self._maps: dict[tuple[int, int], _Mapped] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def maps(self) -> dict[tuple[int, int], _Mapped]:
        if self._maps is None:
            self._maps = {k: _Mapped(path) for k, (path, _) in self.entries.items()}
        return self._maps

    def shapes(self) -> dict[tuple[int, int], tuple[int, int, int]]:
        return {k: (m.shape[0], self.entries[k][1], self.entries[k][1])
                for k, m in self.maps().items()}

    def __len__(self) -> int:
        return len(self.labels)

    def _read(self, rows: np.ndarray) -> dict[tuple[int, int], torch.Tensor]:
        """(t, block) -> [N x C x p x p] float32 features of ``rows``."""
        out = {}
        for k, m in self.maps().items():
            x = torch.from_numpy(m.take(rows)).float()
            p, big = self.entries[k][1], x.shape[-1]
            if p != big:  # exact: p divides P, and P the native map
                f = big // p
                x = x.view(*x.shape[:2], p, f, p, f).mean(dim=(3, 5))
            out[k] = x
        return out

    def __getitem__(self, i: int) -> tuple[dict[tuple[int, int], torch.Tensor], int]:
        feats = self._read(np.array([i]))
        return {k: v[0] for k, v in feats.items()}, int(self.labels[i])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[dict, int]]:
        """A whole DataLoader batch at once (one gather and conversion per entry)."""
        rows = np.asarray(indices, dtype=np.int64)
        feats = self._read(rows)
        return [({k: v[j] for k, v in feats.items()}, int(self.labels[r]))
                for j, r in enumerate(rows)]


def _where() -> str:
    """Host name and pid namespace: where a pid means one process."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}|{ns}"


class _Lock:
    """The right to extract into one group directory, held across processes and nodes.

    Local (or shared, e.g. NFS) disk: ``.lock`` created with ``O_CREAT | O_EXCL`` holding pid,
    host (+ pid namespace) and a token; the holder touches it every ``stale_s / 4`` seconds.
    A lock is stale when its holder is a dead process on this host, or nobody touched it for
    ``stale_s`` (a holder on another node died); a stale lock is renamed away (one breaker
    wins; a fresh lock renamed by mistake is linked back) and deleted.
    Object stores have no exclusive create, so this is best effort: a contender that sees no
    lock object writes one with its token, waits ``settle`` seconds and reads it back; the
    last writer wins, so contenders racing within ``settle`` agree on one owner. Should two
    owners still result, both publish identical entries with atomic PUTs: work is wasted,
    nothing is corrupted.
    """

    def __init__(self, store: _Store, rel: str, stale_s: float, settle: float = 0.5):
        self.store, self.rel, self.stale_s, self.settle = store, rel, stale_s, settle
        self.path = store.path(rel)
        self.owner = {"pid": os.getpid(), "host": _where(), "token": uuid.uuid4().hex}
        self.waited = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _try(self) -> bool:
        data = json.dumps(self.owner).encode()
        if self.store.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.store.info(self.rel).type != pafs.FileType.NotFound:
            return False
        self.store.put(self.rel, data)
        time.sleep(self.settle)
        held = self.store.read_json(self.rel) or {}
        return held.get("token") == self.owner["token"]

    def _break_if_stale(self) -> None:
        info = self.store.info(self.rel)
        if info.type == pafs.FileType.NotFound:
            return
        raw = b""
        if self.store.local:
            try:
                with open(self.path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                return
        try:
            held = json.loads(raw) if self.store.local else self.store.read_json(self.rel)
        except ValueError:
            held = None  # being written, or its writer died before writing
        held = held if isinstance(held, dict) else {}
        dead = False
        if held.get("host") == self.owner["host"] and isinstance(held.get("pid"), int):
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                dead = True
            except PermissionError:
                pass
        age = time.time() - info.mtime_ns / 1e9 if info.mtime_ns else 0.0
        if not (dead or age > self.stale_s):
            return
        logger.warning("breaking stale cache lock %s (holder %s, %.0f s old)", self.path,
                       held or "unknown", age)
        if self.store.local:
            away = f"{self.path}.stale-{self.owner['token']}"
            try:
                os.rename(self.path, away)
            except FileNotFoundError:
                return  # another waiter broke it first
            with open(away, "rb") as f:
                fresh = f.read() != raw
            if fresh:  # we took a lock newer than the stale one: give it back
                try:
                    os.link(away, self.path)
                except FileExistsError:
                    pass
            os.unlink(away)
        else:
            self.store.delete(self.rel)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            try:
                if self.store.local:
                    os.utime(self.path)
                else:
                    self.store.put(self.rel, json.dumps(self.owner).encode())
            except OSError as exc:
                logger.warning("cannot refresh cache lock %s: %s", self.path, exc)

    def __enter__(self) -> _Lock:
        delay = 0.05
        while not self._try():
            if not self.waited:
                logger.info("waiting for another process to extract into %s",
                            os.path.dirname(self.path))
                self.waited = True
            self._break_if_stale()
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if (self.store.read_json(self.rel) or {}).get("token") == self.owner["token"]:
            self.store.delete(self.rel)  # unless it was broken as stale and taken over


_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, sha256) checked in this process


def _check_file(path: str, marker: dict) -> bool:
    """Whether the Arrow file at ``path`` is the entry ``marker`` describes (checksum, key,
    rows); the result is remembered per process for an unchanged file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    memo = (path, st.st_size, st.st_mtime_ns, marker.get("sha256"))
    if memo in _VERIFIED:
        return True
    if st.st_size != marker.get("bytes"):
        return False
    try:
        m = _Mapped(path)
        ok = (m.meta.get("key") == marker.get("key") and int(m.offsets[-1]) == marker["rows"]
              and m.checksum() == marker["sha256"])
    except (pa.ArrowException, OSError, ValueError, KeyError, IndexError):
        ok = False
    if ok:
        _VERIFIED.add(memo)
    return ok


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


def forward_pooled(extractor: Extractor, x0: torch.Tensor, t: int, pools: dict[int, int], *,
                   indices: Sequence[int] | None = None, noise: torch.Tensor | None = None,
                   seed: int = 0) -> dict[int, torch.Tensor]:
    """One U-Net forward pass (counted on ``extractor``) up to the deepest block of ``pools``,
    each block average-pooled to its own size.

    :param x0: an [N x 3 x H x W] Tensor of images in [-1, 1].
    :param pools: block -> pool size p.
    :param noise: explicit noise; None draws the seeded noise of (seed, t, indices).
    :return: block -> [N x C x p x p] float32 Tensor on the model's device.
    """
    device = extractor.device
    x0 = x0.to(device, torch.float32)
    out: dict[int, torch.Tensor] = {}

    def keep(b: int, h: torch.Tensor) -> None:
        if b in pools:
            out[b] = F.adaptive_avg_pool2d(h.float(), pools[b])

    with torch.no_grad(), autocast_for(device):
        x_t = extractor.noised(x0, t, indices=indices, noise=noise, seed=seed)
        ts = model_timesteps(extractor.diffusion,
                             torch.full((len(x0),), t, dtype=torch.long, device=device))
        run_blocks(extractor.model, x_t, ts, upto=max(pools), on_block=keep)
    extractor.forward_batches += 1
    extractor.forward_images += len(x0)
    return out


class FeatureCache:
    """A :class:`~trainables.pipeline.FeatureSource` serving features from Arrow entries.

    :param root: a local folder or a pyarrow filesystem URI (``s3://bucket/prefix?...``);
        None means :func:`default_root`.
    :param store_pool: store misses at this pool size (clamped to the block's map) when the
        requested p divides it, so that later trials with smaller pools hit.
    :param extra_blocks: the search space's blocks; a miss extracts all of them in the same
        forward pass (it runs up to the deepest of them).
    :param lock_stale_s: a lock untouched this long belongs to a dead process.
    :param mirror: local folder that entries of a remote root are copied into and mapped from.
    """

    def __init__(self, root: str | None = None, *, device: str = "cpu", batch_size: int = 256,
                 store_pool: int | None = None, extra_blocks: Sequence[int] = (),
                 progress: bool = False, dtype: str = "float16", lock_stale_s: float = 120.0,
                 mirror: str | None = None, filesystem: pafs.FileSystem | None = None):
        self.root = root or default_root()
        self.store = _Store(self.root, filesystem)
        self.device, self.batch_size, self.progress = device, batch_size, progress
        self.store_pool, self.extra_blocks = store_pool, sorted(set(extra_blocks))
        self.dtype, self.lock_stale_s = np.dtype(dtype).name, lock_stale_s
        self.mirror = mirror or os.path.join(tempfile.gettempdir(), "difftune-mirror")
        self.stats = CacheStats()
        self._extractor: Extractor | None = None

    # -- FeatureSource
    def prepare(self, cfg: TrialConfig, requests: Sequence[Request]) -> TrialData:
        train, val = self.get(cfg, "train", requests), self.get(cfg, "val", requests)
        return TrialData(train, val, train.shapes(), len(train.classes))

    def get(self, cfg: TrialConfig, split: str, requests: Sequence[Request]) -> CachedFeatures:
        """The features of ``requests`` ((t, block, pool)) for one split of ``cfg``'s data,
        extracting and storing the missing ones."""
        model, diffusion = cached_unet(cfg.model, cfg.checkpoint, self.device)
        ds, classes = cached_dataset(cfg.data, split, model.image_size, cfg.label_fraction,
                                     cfg.seed)
        # the val split is never subsampled, and without a fraction the subset seed is moot
        frac = None if split == "val" or cfg.label_fraction in (None, 1, 1.0) \
            else cfg.label_fraction
        base = EntryKey(model=cfg.model, model_fp=model_key(cfg.model, cfg.checkpoint),
                        data=cfg.data, split=split, image_size=model.image_size,
                        data_fp=data_fingerprint(cfg.data, split=split,
                                                 image_size=model.image_size,
                                                 label_fraction=frac,
                                                 seed=cfg.seed if frac is not None else 0),
                        t=0, seed=cfg.noise_seed, block=0, pool=0, dtype=self.dtype)
        by_t: dict[int, dict[int, int]] = {}
        for t, b, p in requests:
            check_timestep(diffusion, t)
            check_blocks(model, [b])
            if check_pool(p) is None:
                raise ExtractionError("the feature cache stores pooled maps; pool=None is "
                                      "not allowed (give a positive int)")
            by_t.setdefault(t, {})[b] = p
        served: dict[tuple[int, int], tuple[str, int]] = {}
        for t, wanted in by_t.items():
            group = dataclasses.replace(base, t=t)
            for b, path in self._ensure(model, diffusion, ds, group, wanted).items():
                served[(t, b)] = (path, wanted[b])
        out = _dataset(served)
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
            if path is None or not _check_file(path, marker):
                raise FileNotFoundError(f"no valid cache entry {key.group}/{key.name}")
            served[name] = (path, p)
        return _dataset(served)

    # -- internals
    def _stored_pool(self, p: int, native: int) -> int:
        big = min(self.store_pool, native) if self.store_pool else p
        return big if big % p == 0 and native % big == 0 else p

    def _extractor_for(self, model, diffusion) -> Extractor:
        if self._extractor is None or self._extractor.model is not model:
            self._extractor = Extractor(model, diffusion)
        return self._extractor

    def _local_copy(self, key: EntryKey, marker: dict) -> str | None:
        rel = f"{key.group}/{key.name}.arrow"
        if self.store.local:
            return self.store.path(rel)
        path = os.path.join(self.mirror, f"{marker.get('sha256')}.arrow")
        if not (os.path.isfile(path) and os.path.getsize(path) == marker.get("bytes")):
            os.makedirs(self.mirror, exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            try:
                with self.store.fs.open_input_stream(self.store.path(rel)) as src, \
                        open(tmp, "wb") as dst:
                    while chunk := src.read(8 << 20):
                        dst.write(chunk)
            except (FileNotFoundError, OSError):
                return None
            os.replace(tmp, path)
        return path

    def _lookup(self, key: EntryKey, p: int, native: int, *, purge: bool = False
                ) -> str | None:
        """A verified local path of a stored entry serving ``key`` at pool p, or None.
        With ``purge`` (only under the lock) a corrupt entry is counted, logged, deleted."""
        sizes = []
        for info in self.store.files(key.group):
            m = _NAME.match(info.base_name)
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
            if path is not None and _check_file(path, marker):
                self.stats.entries_derived += big != p
                return path
            if purge:
                self.stats.entries_corrupt += 1
                logger.warning("cache entry %s/%s is corrupt (checksum or size mismatch); "
                               "re-extracting it", self.store.path(k.group), k.name)
                self.store.delete(f"{k.group}/{k.name}.json")
                self.store.delete(f"{k.group}/{k.name}.arrow")
                if path is not None and not self.store.local and os.path.isfile(path):
                    os.remove(path)
        return None

    def _ensure(self, model, diffusion, ds: Dataset, group: EntryKey, wanted: dict[int, int]
                ) -> dict[int, str]:
        native = block_sizes(model)
        found: dict[int, str] = {}
        for b, p in wanted.items():
            path = self._lookup(dataclasses.replace(group, block=b), p, native[b])
            if path is not None:
                found[b] = path
        missing = {b: p for b, p in wanted.items() if b not in found}
        if missing:
            lock = _Lock(self.store, f"{group.group}/.lock", self.lock_stale_s)
            with lock:
                self.stats.lock_waits += lock.waited
                if self.store.local:  # debris of writers that died (we hold the lock)
                    for info in self.store.files(group.group):
                        if info.base_name.endswith(".tmp"):
                            self.store.delete(info.path[len(self.store.base) + 1:])
                for b, p in list(missing.items()):
                    path = self._lookup(dataclasses.replace(group, block=b), p, native[b],
                                        purge=True)
                    if path is not None:
                        found[b] = path
                        del missing[b]
                if missing:
                    found.update(self._extract(model, diffusion, ds, group, missing, native))
        self.stats.entries_reused += len(wanted) - len(missing)
        return found

    def _extract(self, model, diffusion, ds: Dataset, group: EntryKey, missing: dict[int, int],
                 native: dict[int, int]) -> dict[int, str]:
        """One forward pass per image batch at ``group.t`` writing the missing entries and
        every ``extra_blocks`` entry (the search space's block set) not stored yet, so that a
        search pays one U-Net pass per image and timestep."""
        plan = {b: self._stored_pool(p, native[b]) for b, p in missing.items()}
        default = max(missing.values())
        for b in self.extra_blocks:
            if b not in plan and b in native:
                k = dataclasses.replace(group, block=b,
                                        pool=self._stored_pool(min(default, native[b]), native[b]))
                if self.store.info(f"{k.group}/{k.name}.json").type == pafs.FileType.NotFound:
                    plan[b] = k.pool
        extractor = self._extractor_for(model, diffusion)
        indices = dataset_indices(ds)
        if not indices:
            raise ValueError(f"no images to extract for {group.data} {group.split}")
        loader = DataLoader(ds, batch_size=self.batch_size, shuffle=False)
        writers: dict[int, EntryWriter] = {}
        bar = tqdm(total=len(loader), desc=f"extract {group.split} t={group.t}", unit="batch",
                   disable=not self.progress, leave=False)
        try:
            start = 0
            for x0, labels in loader:
                idx = indices[start:start + len(x0)]
                start += len(x0)
                feats = forward_pooled(extractor, x0, group.t, plan, indices=idx,
                                       seed=group.seed)
                self.stats.forward_batches += 1
                self.stats.forward_images += len(x0)
                for b, f in feats.items():
                    if b not in writers:
                        key = dataclasses.replace(group, block=b, pool=plan[b])
                        writers[b] = EntryWriter(self.store, key, tuple(f.shape[1:]), native[b])
                    writers[b].write(idx, labels, f.cpu())
                bar.update(1)
            markers = {b: w.commit() for b, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            bar.close()
        self.stats.entries_written += len(markers)
        logger.info("cache: wrote %d entries for %s %s t=%d (blocks %s)", len(markers),
                    group.data, group.split, group.t, sorted(markers))
        out = {}
        for b in missing:
            key = dataclasses.replace(group, block=b, pool=plan[b])
            path = self._local_copy(key, markers[b])
            if path is None or not _check_file(path, markers[b]):
                raise OSError(f"cache entry {key.group}/{key.name} vanished after writing it")
            out[b] = path
        return out


def _dataset(served: dict[tuple[int, int], tuple[str, int]]) -> CachedFeatures:
    out = CachedFeatures(served, np.zeros(0))
    out.labels = next(iter(out.maps().values())).column(1)
    return out


def _entries(store: _Store) -> Iterator[tuple[str, dict]]:
    for info in store.files(recursive=True):
        if _NAME.match(info.base_name):
            rel = info.path[len(store.base) + 1:]
            marker = store.read_json(rel)
            if marker and "key" in marker:
                yield rel[: -len(".json")], marker


def list_entries(root: str | None = None, *, filesystem: pafs.FileSystem | None = None
                 ) -> list[dict]:
    """Published entries: model/data names and fingerprints, split, t, seed, block, pool,
    dtype, rows, bytes, created, and their path below the root."""
    out = []
    for rel, marker in _entries(_Store(root or default_root(), filesystem)):
        k = marker["key"]
        out.append({**{n: k[n] for n in ("model", "model_fp", "data", "data_fp", "split", "t",
                                         "seed", "block", "pool", "dtype")},
                    "rows": marker.get("rows"), "bytes": marker.get("bytes"),
                    "created": marker.get("created"), "path": rel})
    return sorted(out, key=lambda e: (e["model"], e["data"], e["split"], e["t"], e["block"],
                                      e["pool"]))


def total_bytes(root: str | None = None, *, filesystem: pafs.FileSystem | None = None) -> int:
    """Bytes of every file under the root (entries, markers, debris)."""
    return sum(i.size for i in _Store(root or default_root(), filesystem).files(recursive=True))


def remove(root: str | None = None, *, all: bool = False, model: str | None = None,
           t: int | None = None, block: int | None = None,
           filesystem: pafs.FileSystem | None = None) -> int:
    """Delete entries (marker first, so none is ever half-visible); ``all`` empties the root.
    ``model`` matches a model name or a fingerprint prefix. :return: entries removed."""
    store = _Store(root or default_root(), filesystem)
    if all:
        n = sum(1 for _ in _entries(store))
        store.fs.delete_dir_contents(store.base, missing_dir_ok=True)
        return n
    if model is None and t is None and block is None:
        raise ValueError("remove needs a filter (model, t, block) or all=True")
    n = 0
    for rel, marker in list(_entries(store)):
        k = marker["key"]
        if ((model is None or model in (k["model"], k["model_fp"])
             or (len(model) >= 4 and k["model_fp"].startswith(model)))
                and (t is None or k["t"] == t) and (block is None or k["block"] == block)):
            store.delete(rel + ".json")
            store.delete(rel + ".arrow")
            n += 1
    return n
