"""The right to extract into one group directory of the feature cache, held across processes
and nodes, so that a missing entry is extracted by exactly one of them.

The lock is one small object, ``.lock``, holding its owner (pid, host + pid namespace, a
token and a beat counter). Taking it is an exclusive create; holding it means refreshing it
every ``stale_s / 4`` seconds; a lock nobody refreshed for ``stale_s`` (its holder on another
node died), or whose holder is a dead process of this host, is stale and is taken over.

- **Local and network filesystems** (NFS, EFS, Filestore, ...): the owner is written to a
  temporary file that is then hard-linked to ``.lock`` (``link`` fails if the name exists;
  atomic on NFS too, unlike ``O_EXCL`` on old clients, and the lock is never seen half
  written). The holder refreshes the mtime of *its own inode* through a file descriptor, after
  checking that ``.lock`` still is that inode, so it never touches a lock it no longer holds.
  A stale lock is renamed away by the one waiter whose rename succeeds, checked to be the
  inode judged stale (else put back), and deleted.
- **S3** (and S3-compatible stores with conditional writes, such as moto and MinIO): through
  boto3 with the endpoint, region and credentials of the cache's pyarrow filesystem. Create is
  ``PutObject`` with ``If-None-Match: *``; a refresh is ``PutObject`` with ``If-Match`` of the
  ETag the holder wrote last (each beat changes the body, so the ETag), so it fails once anyone
  else wrote the lock; taking over a stale lock is the same compare-and-swap on the ETag judged
  stale; release is ``DeleteObject`` with ``If-Match``. Age is the server's ``Date`` minus the
  object's ``Last-Modified``: no clock of a node is involved.
- **Other object stores** (``gs://``, ...) have no conditional write through pyarrow: there the
  lock is best effort (create if absent, wait ``settle`` seconds, read back; refresh only while
  the lock still holds our token). Two owners can still result; they publish identical
  entries with atomic PUTs, so work is wasted and nothing is corrupted.

A holder that finds its lock taken over (it was judged stale while it was alive, e.g. paused
for longer than ``stale_s``) logs a warning, stops refreshing and leaves the other's lock alone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from difftune.trainables.cache.lock_backends import BestEffortLock, FileLock, Held, S3Lock, close_fd
from difftune.trainables.cache.store import Store

logger = logging.getLogger(__name__)


def where() -> str:
    """Host name and pid namespace: where a pid means one process."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}|{ns}"


# ---------------------------------------------------------------------------- the lock


class CacheLock:
    """The right to extract into one group directory, held across processes and nodes.

    :param store: the cache's storage.
    :param rel: the lock's path below the store's root (``<group>/.lock``).
    :param stale_s: a lock nobody refreshed for this long belongs to a dead holder.
    :param settle: seconds a best-effort lock waits before reading itself back.
    """

    def __init__(self, store: Store, rel: str, stale_s: float, settle: float = 0.5):
        self.store, self.rel, self.stale_s = store, rel, stale_s
        self.path = store.path(rel)
        self.owner = {"pid": os.getpid(), "host": where(), "token": uuid.uuid4().hex}
        if store.local:
            self.backend: Any = FileLock(self.path)
        elif isinstance(store.fs, pafs.S3FileSystem):
            self.backend = S3Lock(store.fs, self.path)
        else:
            self.backend = BestEffortLock(store, rel, settle)
        self.waited = False  # another process held it when we first asked
        self.lost = False  # found taken over by another process while we held it
        self._beats = 0
        self._handle: Any = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _data(self) -> bytes:
        self._beats += 1  # a new body each time: an S3 refresh changes the ETag
        return json.dumps({**self.owner, "beat": self._beats}).encode()

    def _stale(self, held: Held) -> bool:
        owner = held.owner
        if owner.get("host") == self.owner["host"] and isinstance(owner.get("pid"), int):
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                return True  # its holder died on this host
            except PermissionError:
                pass
        return held.age > self.stale_s

    def beat(self) -> bool:
        """Refresh the lock if we still hold it; False (and ``lost``) once another process
        has it. Called every ``stale_s / 4`` seconds by the heartbeat thread."""
        if self.lost:
            return False
        handle = self.backend.refresh(self._handle, self._data())
        if handle is None:
            self.lost = True
            logger.warning("the cache lock %s was taken over by another process (this one "
                           "did not refresh it for %.0f s); both extract, publishing identical "
                           "entries", self.path, self.stale_s)
            return False
        self._handle = handle
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            try:
                if not self.beat():
                    return
            except Exception as exc:  # noqa: BLE001 - a store that hiccups: try next beat
                logger.warning("cannot refresh cache lock %s: %s", self.path, exc)

    def __enter__(self) -> CacheLock:
        delay = 0.05
        while True:
            self._handle = self.backend.create(self._data())
            if self._handle is not None:
                break
            if not self.waited:
                logger.info("waiting for another process to extract into %s",
                            os.path.dirname(self.path))
                self.waited = True
            held = self.backend.read()
            if held is not None and self._stale(held):
                logger.warning("taking over stale cache lock %s (holder %s, %.0f s old)",
                               self.path, held.owner or "unknown", held.age)
                self._handle = self.backend.take_over(held, self._data())
                if self._handle is not None:
                    break
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            if not self.lost:
                self.backend.release(self._handle)  # never deletes another's lock
            elif isinstance(self.backend, FileLock):
                close_fd(self._handle[0])
        except Exception as exc:  # noqa: BLE001 - left behind, it goes stale
            logger.warning("cannot release cache lock %s: %s", self.path, exc)
