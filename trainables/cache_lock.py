"""The right to extract into one group directory of the feature cache, held across
processes and nodes, so that a missing entry is extracted by exactly one of them."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import pyarrow.fs as pafs

from .cache_store import Store

logger = logging.getLogger(__name__)


def where() -> str:
    """Host name and pid namespace: where a pid means one process."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}|{ns}"


class CacheLock:
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

    def __init__(self, store: Store, rel: str, stale_s: float, settle: float = 0.5):
        self.store, self.rel, self.stale_s, self.settle = store, rel, stale_s, settle
        self.path = store.path(rel)
        self.owner = {"pid": os.getpid(), "host": where(), "token": uuid.uuid4().hex}
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

    def __enter__(self) -> CacheLock:
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
