"""How the feature cache's lock is stored (:mod:`.lock` describes the protocol):
``FileLock`` on local and network filesystems, ``S3Lock`` with S3's conditional writes
(through boto3: pyarrow does not expose ``If-None-Match`` / ``If-Match``), ``BestEffortLock``
on other object stores. Each creates, reads, refreshes, takes over and releases ``.lock``."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import pyarrow.fs as pafs

from difftune.trainables.cache.store import Store

logger = logging.getLogger(__name__)


@dataclass
class Held:
    """A lock as a contender sees it: its owner, its age in seconds and what identifies this
    very version of it (for a compare-and-swap)."""

    owner: dict
    age: float
    version: Any


class FileLock:
    """``.lock`` on a local or network filesystem (see :mod:`.lock`)."""

    def __init__(self, path: str):
        self.path = path

    def _scratch(self, what: str) -> str:
        # ends in .tmp: a writer that dies here leaves debris the cache's holder removes
        return f"{self.path}.{what}-{uuid.uuid4().hex}.tmp"

    def create(self, data: bytes) -> tuple[int, int, int] | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self._scratch("new")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            os.write(fd, data)
            try:
                os.link(tmp, self.path)
                linked = True
            except FileExistsError:
                linked = False
            except FileNotFoundError:  # the holder swept our scratch file away: try again
                return close_fd(fd)
            except OSError:  # NFS: the reply of a link that succeeded can be lost
                linked = os.fstat(fd).st_nlink == 2
            if not linked:
                return close_fd(fd)
            st = os.fstat(fd)
            return fd, st.st_dev, st.st_ino
        except BaseException:
            close_fd(fd)
            raise
        finally:
            _unlink(tmp)

    def read(self) -> Held | None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            raw = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        return Held(_owner(raw), time.time() - st.st_mtime, (st.st_dev, st.st_ino,
                                                              st.st_mtime_ns))

    def _is(self, path: str, dev: int, ino: int) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (dev, ino)

    def refresh(self, handle: tuple[int, int, int], data: bytes) -> tuple[int, int, int] | None:
        fd, dev, ino = handle
        if not self._is(self.path, dev, ino):
            return None
        os.utime(fd)  # our own inode: never another process's lock
        return handle

    def _remove(self, match) -> bool:
        """Rename ``.lock`` away; delete it if ``match(stat)``, else put it back. Whether it
        was deleted."""
        away = self._scratch("away")
        try:
            os.rename(self.path, away)
        except FileNotFoundError:
            return False
        try:
            if match(os.stat(away)):
                return True
            try:  # not the one we meant: give it back
                os.link(away, self.path)
            except FileExistsError:
                logger.warning("cache lock %s changed hands while it was being checked; two "
                               "processes may extract the same entries (identical results)",
                               self.path)
            return False
        except FileNotFoundError:
            return False
        finally:
            _unlink(away)

    def take_over(self, held: Held, data: bytes) -> tuple[int, int, int] | None:
        if not self._remove(lambda st: (st.st_dev, st.st_ino, st.st_mtime_ns) == held.version):
            return None
        return self.create(data)

    def release(self, handle: tuple[int, int, int]) -> None:
        fd, dev, ino = handle
        try:
            if self._is(self.path, dev, ino):
                self._remove(lambda st: (st.st_dev, st.st_ino) == (dev, ino))
        finally:
            close_fd(fd)


class S3Lock:
    """``.lock`` as an S3 object, with conditional writes (see :mod:`.lock`)."""

    #: error codes that mean "the condition did not hold": someone else has (or took) the lock
    LOST = {"PreconditionFailed", "NoSuchKey", "404", "412"}

    def __init__(self, fs: pafs.S3FileSystem, path: str):
        self.client = s3_client(fs)
        self.bucket, _, self.key = path.partition("/")

    def _code(self, exc) -> str:
        return str(exc.response.get("Error", {}).get("Code", ""))

    def _put(self, data: bytes, **cond) -> str | None:
        from botocore.exceptions import ClientError  # boto3 loads only for an S3 root

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                          ContentType="application/json", **cond)["ETag"]
        except ClientError as exc:
            if self._code(exc) in self.LOST | {"ConditionalRequestConflict", "409"}:
                return None  # exists / changed / a concurrent conditional write won
            raise

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> Held | None:
        from botocore.exceptions import ClientError  # boto3 loads only for an S3 root

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        raw = got["Body"].read()
        date = got["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        return Held(_owner(raw), now - got["LastModified"].timestamp(), got["ETag"])

    def refresh(self, etag: str, data: bytes) -> str | None:
        return self._put(data, IfMatch=etag)

    def take_over(self, held: Held, data: bytes) -> str | None:
        return self._put(data, IfMatch=held.version)

    def release(self, etag: str) -> None:
        from botocore.exceptions import ClientError  # boto3 loads only for an S3 root

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except ClientError as exc:
            if self._code(exc) in self.LOST:
                return  # not ours any more: leave it
            # a store without conditional deletes: check, then delete (a narrow race)
            held = self.read()
            if held is not None and held.version == etag:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)


class BestEffortLock:
    """``.lock`` on an object store without conditional writes (see :mod:`.lock`)."""

    def __init__(self, store: Store, rel: str, settle: float):
        self.store, self.rel, self.settle = store, rel, settle

    def create(self, data: bytes) -> str | None:
        if self.store.info(self.rel).type != pafs.FileType.NotFound:
            return None
        self.store.put(self.rel, data)
        time.sleep(self.settle)
        token = _owner(data).get("token")
        held = self.read()
        return token if held is not None and held.owner.get("token") == token else None

    def read(self) -> Held | None:
        info = self.store.info(self.rel)
        if info.type == pafs.FileType.NotFound:
            return None
        owner = self.store.read_json(self.rel) or {}
        age = time.time() - info.mtime_ns / 1e9 if info.mtime_ns else 0.0
        return Held(owner, age, owner.get("token"))

    def refresh(self, token: str, data: bytes) -> str | None:
        held = self.read()
        if held is None or held.owner.get("token") != token:
            return None
        self.store.put(self.rel, data)
        return token

    def take_over(self, held: Held, data: bytes) -> str | None:
        now = self.read()
        if now is None or now.version == held.version:
            self.store.delete(self.rel)
        return self.create(data)

    def release(self, token: str) -> None:
        held = self.read()
        if held is not None and held.owner.get("token") == token:
            self.store.delete(self.rel)


def s3_client(fs: pafs.S3FileSystem):
    """A boto3 S3 client for the endpoint, region and credentials of a pyarrow
    ``S3FileSystem`` (read from its pickling state, the settings pyarrow itself restores);
    credentials it does not hold come from boto3's usual chain (environment, profile,
    instance role), as they do for pyarrow."""
    import boto3  # here, not at the top: a local root never loads boto3 (slow to import)
    from botocore import UNSIGNED
    from botocore.config import Config

    _, (kw,) = fs.__reduce__()
    endpoint = kw.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{kw.get('scheme') or 'https'}://{endpoint}"
    config: dict[str, Any] = {"retries": {"max_attempts": 4, "mode": "standard"}}
    # pyarrow: path-style addressing when an endpoint is given, unless forced virtual
    config["s3"] = {"addressing_style": "virtual" if kw.get("force_virtual_addressing")
                    else "path" if endpoint else "auto"}
    if kw.get("anonymous"):
        config["signature_version"] = UNSIGNED
    for name in ("connect_timeout", "request_timeout"):
        if (kw.get(name) or -1) > 0:
            config["connect_timeout" if name == "connect_timeout" else "read_timeout"] = kw[name]
    if kw.get("role_arn"):
        logger.warning("the cache lock uses boto3's own credentials, not role_arn %s",
                       kw["role_arn"])
    session = boto3.session.Session(
        aws_access_key_id=kw.get("access_key") or None,
        aws_secret_access_key=kw.get("secret_key") or None,
        aws_session_token=kw.get("session_token") or None,
        region_name=kw.get("region") or None)
    return session.client("s3", endpoint_url=endpoint, config=Config(**config),
                          verify=kw.get("tls_ca_file_path") or None)


def _owner(raw: bytes) -> dict:
    try:
        owner = json.loads(raw)
    except ValueError:
        return {}  # an old or foreign lock: judged by its age alone
    return owner if isinstance(owner, dict) else {}


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
