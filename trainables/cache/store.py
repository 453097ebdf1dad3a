"""Where the feature cache keeps its entries: the key of an entry (what its features depend
on, and so its path below the root) and the root itself, a local folder or a pyarrow
filesystem (:class:`Store`). An entry's files are written and read by :mod:`.entry`; whether
a stored one may be trusted, and a sharded one's parts: :mod:`.parts`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

#: Where the cache lives unless ``--cache`` or ``$DIFFTUNE_CACHE`` says otherwise.
DEFAULT_CACHE = "./difftune_cache"


def default_root() -> str:
    """``$DIFFTUNE_CACHE`` if set, else :data:`DEFAULT_CACHE`."""
    return os.environ.get("DIFFTUNE_CACHE") or DEFAULT_CACHE

FORMAT = 2  # 2: the U-Net's precision is part of the key
ENTRY_NAME = re.compile(r"^b(\d+)-p(\d+)-(\w+)\.json$")


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
    precision: str = "fp32"  # the U-Net pass: fp32, or bf16/fp16 autocast on a GPU
    view: int = 0  # 0: the images themselves; v >= 1: their seeded crop + flip (views.py)
    #: "": the whole split in its own order (every entry before rungs); else the name of the
    #: order whose prefix the entry holds (data/order.py): an entry that extends (prefix.py)
    order: str = ""

    @property
    def group(self) -> str:
        tail = f"-v{self.view}" if self.view else ""
        tail += f"-{self.order}" if self.order else ""
        return f"{self.model_fp}/{self.data_fp}/t{self.t}-s{self.seed}-{self.precision}{tail}"

    @property
    def name(self) -> str:
        return f"b{self.block}-p{self.pool}-{self.dtype}"

    def fields(self) -> dict:
        """The key as markers, manifests and Arrow metadata store it: every field, but
        ``order`` only when set (so a whole-split entry's files are what they always were)."""
        out = dataclasses.asdict(self)
        if not out["order"]:
            del out["order"]
        return out

    def content(self) -> dict:
        """The fields that decide the features (names excluded)."""
        return {k: v for k, v in self.fields().items() if k not in ("model", "data")}


class Store:
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


def local_copy(store: Store, rel: str, marker: dict, mirror: str) -> str | None:
    """A local path of the file ``rel``: itself on a local root, else a copy in ``mirror``
    named by the entry's sha256 (made once per node). None if it cannot be read."""
    if store.local:
        return store.path(rel)
    path = os.path.join(mirror, f"{marker.get('sha256')}.arrow")
    if not (os.path.isfile(path) and os.path.getsize(path) == marker.get("bytes")):
        os.makedirs(mirror, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with store.fs.open_input_stream(store.path(rel)) as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
        except (FileNotFoundError, OSError):
            return None
        os.replace(tmp, path)
    return path


def sweep_tmp(store: Store, group: str) -> None:
    """Delete the debris (``*.tmp``) of writers that died, under the group's lock."""
    if store.local:
        for info in store.files(group):
            if info.base_name.endswith(".tmp"):
                store.delete(f"{group}/{info.base_name}")
