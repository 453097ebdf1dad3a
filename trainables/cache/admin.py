"""Listing, sizing and pruning the feature cache (``difftune cache ls|du|rm``)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow.fs as pafs

from difftune.trainables.cache.parts import delete_entry
from difftune.trainables.cache.store import ENTRY_NAME, Store, default_root


def _entries(store: Store) -> Iterator[tuple[str, dict]]:
    for info in store.files(recursive=True):
        if ENTRY_NAME.match(info.base_name):
            rel = info.path[len(store.base) + 1:]
            marker = store.read_json(rel)
            if marker and "key" in marker:
                yield rel[: -len(".json")], marker


def list_entries(root: str | None = None, *, filesystem: pafs.FileSystem | None = None
                 ) -> list[dict]:
    """Published entries: model/data names and fingerprints, split, t, seed, block, pool,
    dtype, precision, view, order (``""`` for a whole split, else the order whose prefix an
    entry that extends holds), rows, bytes, created, and their path below the root."""
    out = []
    for rel, marker in _entries(Store(root or default_root(), filesystem)):
        k = marker["key"]
        out.append({**{n: k[n] for n in ("model", "model_fp", "data", "data_fp", "split", "t",
                                         "seed", "block", "pool", "dtype")},
                    "precision": k.get("precision", "fp32"), "view": k.get("view", 0),
                    "order": k.get("order", ""),  # "": the whole split; else a prefix entry
                    "rows": marker.get("rows"), "bytes": marker.get("bytes"),
                    "created": marker.get("created"), "path": rel})
    return sorted(out, key=lambda e: (e["model"], e["data"], e["split"], e["t"], e["view"],
                                      e["order"], e["block"], e["pool"]))


def total_bytes(root: str | None = None, *, filesystem: pafs.FileSystem | None = None) -> int:
    """Bytes of every file under the root (entries, markers, debris)."""
    return sum(i.size for i in Store(root or default_root(), filesystem).files(recursive=True))


def remove(root: str | None = None, *, all: bool = False, model: str | None = None,
           t: int | None = None, block: int | None = None,
           filesystem: pafs.FileSystem | None = None) -> int:
    """Delete entries (marker first, so none is ever half-visible); ``all`` empties the root.
    ``model`` matches a model name or a fingerprint prefix. :return: entries removed."""
    store = Store(root or default_root(), filesystem)
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
            delete_entry(store, rel)  # marker first, then its data file or parts
            n += 1
    return n
