"""An entry's Arrow file: written as a stream of record batches and published
(:class:`EntryWriter`), memory-mapped for reading (:class:`MappedEntry`), checked against its
marker once per node (:func:`check_entry_file`), and the dataset that serves the rows of the
entries a trial asked for (:class:`CachedFeatures`). Keys and the root: :mod:`.store`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from difftune.trainables.cache.store import FORMAT, EntryKey, Store

logger = logging.getLogger(__name__)

#: where a node remembers which entries it verified (a local folder; default in the temp dir)
VERIFIED_DIR_ENV = "DIFFTUNE_VERIFIED_DIR"


class EntryWriter:
    """Streams record batches of one entry, then publishes it (data first, marker last).

    :param shape: ``(C, P, P)`` of one row's map.
    :param native: side of the block's full map (an entry at P serves p only if P | native).
    """

    def __init__(self, store: Store, key: EntryKey, shape: tuple[int, int, int], native: int,
                 *, rel: str | None = None):
        self.store, self.key, self.shape, self.native = store, key, tuple(shape), native
        self.rel = rel or f"{key.group}/{key.name}"  # a part file of a sharded entry: its own
        final = store.path(self.rel + ".arrow")
        store.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        self._target = f"{final}.{uuid.uuid4().hex}.tmp" if store.local else final
        meta = {"difftune": json.dumps({"format": FORMAT, "key": key.fields(),
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

    def close(self) -> dict:
        """Close the data file and give it its final name (a rename: never seen half
        written); returns the marker, not written."""
        self._writer.close()
        self._sink.close()
        final = self.store.path(self.rel + ".arrow")
        if self.store.local:
            self.store.fs.move(self._target, final)
        return {"format": FORMAT, "key": self.key.fields(),
                "shape": list(self.shape), "native": self.native, "rows": self.rows,
                "sha256": self._sha.hexdigest(),
                "bytes": self.store.info(self.rel + ".arrow").size,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": socket.gethostname()}

    def commit(self) -> dict:
        """Close and publish (data first, marker last); returns the marker."""
        marker = self.close()
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


class MappedEntry:
    """One entry's Arrow file, memory-mapped (zero-copy record batches for the schema, index,
    labels and checksum, whose pages are dropped from RSS with ``madvise(MADV_DONTNEED)``).

    Rows for training are copied out with positional reads (``preadv``) of their byte ranges
    in the same file: they come from the page cache like mapped pages, but never enter this
    process's RSS. (Touching random rows of the mapping instead maps whole page-cache folios:
    on Linux 6.x about 1.6 MB of RSS per random 8 KB row.)
    """

    def __init__(self, path: str | Sequence[str]):
        # a sharded entry is its part files in order: their batches read as one file's
        paths = [path] if isinstance(path, str) else list(path)
        self.mms, self.fds, self.batches, self.views, self.starts = [], [], [], [], []
        self.batch_fd: list[int] = []
        self.meta: dict = {}
        for p in paths:
            with open(p, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.mms.append(mm)
            buf = pa.py_buffer(mm)
            reader = pa.ipc.open_file(pa.BufferReader(buf))
            self.meta = self.meta or json.loads(reader.schema.metadata[b"difftune"])
            self.shape = tuple(self.meta["shape"])
            fd = os.open(p, os.O_RDONLY)
            self.fds.append(fd)
            for i in range(reader.num_record_batches):
                b = reader.get_batch(i)
                v = b.column(2).flatten().to_numpy(zero_copy_only=True).reshape(b.num_rows,
                                                                                 *self.shape)
                self.batches.append(b)
                self.views.append(v)
                self.starts.append(v.ctypes.data - buf.address)  # file offsets
                self.batch_fd.append(fd)
        self.offsets = np.cumsum([0] + [b.num_rows for b in self.batches])
        self.dtype = self.views[0].dtype if self.views else np.dtype(np.float16)
        self.row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def __del__(self) -> None:
        for fd in getattr(self, "fds", ()):
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
            if os.preadv(self.batch_fd[j], [out[i]], at) != self.row_bytes:
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
        for mm in self.mms:
            mm.madvise(mmap.MADV_DONTNEED)


class CachedFeatures(Dataset):
    """Rows of stored entries: item ``i`` is ``({(t, block): [C x p x p] float32}, label)``.

    :param entries: (t, block) -> (local Arrow path, pool p served); every entry's rows are
        the same images in the same order. Picklable: DataLoader workers re-map the files.
    """

    def __init__(self, entries: dict[tuple[int, int], tuple[str | tuple[str, ...], int]],
                 labels: np.ndarray):
        self.entries, self.labels = dict(entries), np.asarray(labels, dtype=np.int64)
        self._maps: dict[tuple[int, int], MappedEntry] | None = None

    @classmethod
    def of(cls, served: dict[tuple[int, int], tuple[str | tuple[str, ...], int]],
           rows: int | None = None) -> CachedFeatures:
        """The rows of ``served`` ((t, block) -> (local path(s), pool)), labelled as the
        entries are; with ``rows``, only the first ``rows`` of them (an entry that extends,
        read at a rung below what it stores: the rest is mapped, never read)."""
        out = cls(served, np.zeros(0))
        out.labels = next(iter(out.maps().values())).column(1)[:rows]
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def maps(self) -> dict[tuple[int, int], MappedEntry]:
        if self._maps is None:
            self._maps = {k: MappedEntry(path) for k, (path, _) in self.entries.items()}
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


VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, sha256) checked in this process


def verified_dir() -> str:
    """This node's folder of verified-entry markers (``$DIFFTUNE_VERIFIED_DIR``, else
    ``difftune-verified`` in the temp dir): every process of the node reads it."""
    return os.environ.get(VERIFIED_DIR_ENV) or os.path.join(tempfile.gettempdir(),
                                                            "difftune-verified")


def _stamp(path: str, st: os.stat_result) -> dict:
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _node_verified(path: str, st: os.stat_result, sha: str) -> bool:
    try:
        with open(os.path.join(verified_dir(), f"{sha}.json")) as f:
            return json.load(f) == _stamp(path, st)
    except (OSError, ValueError):
        return False


def _mark_node_verified(path: str, st: os.stat_result, sha: str) -> None:
    folder = verified_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{sha}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "w") as f:
            json.dump(_stamp(path, st), f)
        os.replace(tmp, os.path.join(folder, f"{sha}.json"))
    except OSError as exc:  # verification still holds for this process
        logger.debug("cannot remember a verified entry in %s: %s", folder, exc)


def forget_verified() -> None:
    """Forget every verification, of this process and of this node (the next open of each
    entry reads it whole again)."""
    VERIFIED.clear()
    shutil.rmtree(verified_dir(), ignore_errors=True)


def check_entry_file(path: str, marker: dict) -> bool:
    """Whether the Arrow file at ``path`` is the entry ``marker`` describes (checksum, key,
    rows). Reading a whole entry to check it is paid once per node: the result is remembered
    by this process and, keyed by the entry's sha256, in this node's :func:`verified_dir`,
    for the same file unchanged (path, size, modification time)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    sha = str(marker.get("sha256"))
    memo = (path, st.st_size, st.st_mtime_ns, sha)
    if memo in VERIFIED:
        return True
    if st.st_size != marker.get("bytes"):
        return False
    if _node_verified(path, st, sha):
        VERIFIED.add(memo)
        return True
    try:
        m = MappedEntry(path)
        ok = (m.meta.get("key") == marker.get("key") and int(m.offsets[-1]) == marker["rows"]
              and m.checksum() == sha)
    except (pa.ArrowException, OSError, ValueError, KeyError, IndexError):
        ok = False
    if ok:
        VERIFIED.add(memo)
        _mark_node_verified(path, st, sha)
    return ok
