"""Sharded cache entries: an entry written as part files, one per shard of the images, and
published by a *manifest* once every part is in.

A part is ``<group>/<entry name>.part<k>-<tag>.arrow`` (``b24-p4-float16.part0001-3fa2c1d0.arrow``):
an Arrow IPC file of the entry's schema holding one contiguous run of the entry's rows, written
under a temporary name and renamed (:class:`~.entry.EntryWriter`), so a half-written part
is never read. The entry's marker (``<entry name>.json``, written last and atomically) is then
the manifest: the usual key, shape, rows and bytes, plus ``parts`` (file, rows, sha256, bytes,
first row, the host and Ray node that wrote it) in row order; its ``sha256`` is the sha256 of the
parts' sha256s, one per line. Until the manifest exists the entry is not visible; a part no
manifest lists (a shard's failed attempt) is debris the next extraction removes.

Readers get a tuple of the parts' local paths where an unsharded entry has one path:
:class:`~.entry.MappedEntry` reads them as one file, row for row.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import socket
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

from difftune.trainables.cache.entry import EntryWriter, check_entry_file
from difftune.trainables.cache.store import FORMAT, EntryKey, Store, local_copy

#: a part file: group 1 is its entry's name (``b24-p4-float16``)
PART_NAME = re.compile(r"^(b\d+-p\d+-[A-Za-z0-9_]+)\.part(\d+)-([0-9a-f]+)\.arrow$")

EntryPath = str | tuple[str, ...]  # one entry's local data: a file, or its parts in row order


def part_writer(store: Store, key: EntryKey, shape: tuple[int, int, int], native: int,
                shard: int) -> EntryWriter:
    """A writer of shard ``shard``'s part of ``key`` (a fresh name per attempt)."""
    rel = f"{key.group}/{key.name}.part{shard:04d}-{uuid.uuid4().hex[:8]}"
    return EntryWriter(store, key, shape, native, rel=rel)


def part_record(writer: EntryWriter, marker: dict, *, shard: int, start: int,
                node: str | None) -> dict:
    """What the manifest lists of one part, from its writer and what its ``close`` gave."""
    return {"file": posixpath.basename(writer.rel) + ".arrow", "shard": shard,
            "start": start, "rows": marker["rows"], "sha256": marker["sha256"],
            "bytes": marker["bytes"], "host": marker["host"], "node": node}


def publish(store: Store, key: EntryKey, parts: Sequence[dict], *, shape: Sequence[int],
            native: int) -> dict:
    """Write the manifest of ``key`` over ``parts`` (in row order): the entry is visible from
    here on. :return: the manifest."""
    parts = sorted(parts, key=lambda p: p["start"])
    at = 0
    for p in parts:
        if p["start"] != at:
            raise ValueError(f"parts of {key.group}/{key.name} leave rows {at}..{p['start']} "
                             "out")
        at += p["rows"]
    manifest = {"format": FORMAT, "key": key.fields(), "shape": list(shape),
                "native": native, "rows": at,
                "sha256": hashlib.sha256("\n".join(p["sha256"] for p in parts).encode()
                                         ).hexdigest(),
                "bytes": sum(p["bytes"] for p in parts),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": socket.gethostname(), "parts": list(parts)}
    store.put(f"{key.group}/{key.name}.json", json.dumps(manifest, indent=1).encode())
    return manifest


def _part_marker(manifest: dict, part: dict) -> dict:
    return {"key": manifest["key"], "rows": part["rows"], "sha256": part["sha256"],
            "bytes": part["bytes"]}


def entry_paths(store: Store, rel: str, marker: dict, mirror: str) -> EntryPath | None:
    """Local path(s) of entry ``rel`` (below the root, without extension): its file, or its
    parts in row order (copied into ``mirror`` from a remote root). None if unreadable."""
    if "parts" not in marker:
        return local_copy(store, rel + ".arrow", marker, mirror)
    group = posixpath.dirname(rel)
    paths = []
    for part in marker["parts"]:
        path = local_copy(store, f"{group}/{part['file']}", _part_marker(marker, part), mirror)
        if path is None:
            return None
        paths.append(path)
    return tuple(paths)


def check_entry(path: EntryPath, marker: dict) -> bool:
    """:func:`~.entry.check_entry_file` of an entry or of every part of a sharded one
    (each part checked once per node), and the parts make the manifest's rows and sha256."""
    if isinstance(path, str):
        return "parts" not in marker and check_entry_file(path, marker)
    parts = marker.get("parts") or []
    if len(parts) != len(path) or sum(p["rows"] for p in parts) != marker.get("rows"):
        return False
    sha = hashlib.sha256("\n".join(p["sha256"] for p in parts).encode()).hexdigest()
    return sha == marker.get("sha256") and all(
        check_entry_file(p, _part_marker(marker, part)) for p, part in zip(path, parts,
                                                                            strict=True))


def delete_entry(store: Store, rel: str, *, keep_parts: Sequence[str] = ()) -> None:
    """Delete entry ``rel``: its marker first (never half-visible), then its data file and
    every part file of its name (but ``keep_parts``, file names)."""
    store.delete(rel + ".json")
    store.delete(rel + ".arrow")
    sweep_parts(store, rel, keep=keep_parts)


def sweep_parts(store: Store, rel: str, *, keep: Sequence[str] = ()) -> int:
    """Delete the part files of entry ``rel`` that are not in ``keep``. :return: how many."""
    group, name = posixpath.split(rel)
    n = 0
    for info in store.files(group):
        m = PART_NAME.match(info.base_name)
        if m and m[1] == name and info.base_name not in keep:
            store.delete(f"{group}/{info.base_name}")
            n += 1
    return n


def entry_of(base_name: str) -> str | None:
    """The entry name a data file (``.arrow`` or a part) belongs to, else None."""
    m = PART_NAME.match(base_name)
    if m:
        return m[1]
    return base_name[: -len(".arrow")] if base_name.endswith(".arrow") else None
