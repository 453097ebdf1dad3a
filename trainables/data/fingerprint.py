"""Fingerprints of the data a cache entry was extracted from.

:func:`files_fingerprint` walks the folder a split is read from once (relative paths and
sizes, or bytes; never modification times, so a copy elsewhere fingerprints the same): the
driver of a search computes it for every split (:func:`split_files_fingerprints`) and hands it
to the trials. :func:`data_fingerprint` adds what a trial reads of it: the split scheme and the
split's definition (folder, part, holdout), the image size, the label subset and what is done
with undecodable images, so entries of different splits never collide.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from difftune.trainables.data.splits import (
    DEFAULT_HOLDOUT,
    SPLIT_SCHEME,
    SPLITS,
    is_number,
    split_source,
)
from difftune.trainables.errors import DataError

#: how :func:`files_fingerprint` reads a folder: ``size`` (relative paths and sizes) or
#: ``content`` (relative paths and the bytes of every file)
DATA_HASHES = ("size", "content")


def _split_source(name_or_path: str, split: str) -> tuple[str, str]:
    """``(folder, part)`` of a split (:func:`split_source`; digits: ``("digits", split)``)."""
    if name_or_path == "digits":
        return "digits", split
    return split_source(Path(name_or_path), split)


def files_fingerprint(name_or_path: str, split: str, *, data_hash: str = "size") -> str:
    """A fingerprint of the files a split is read from (its folder: ``val`` of an ImageNet
    layout is a holdout of ``train/``): their paths relative to that folder and their sizes
    (``data_hash="content"``: their bytes), never their modification times, so a copy of the
    data in another place or on another node fingerprints the same. The one walk over the
    data a search makes: the driver computes it (:func:`split_files_fingerprints`) and hands
    it to the trials."""
    if data_hash not in DATA_HASHES:
        raise DataError(f"--data-hash {data_hash!r} is unknown; allowed: {list(DATA_HASHES)}")
    source, _ = _split_source(name_or_path, split)
    h = hashlib.sha256(f"files|{source}|{data_hash}".encode())
    if name_or_path == "digits":
        import sklearn  # only the digits' fingerprint names its version

        h.update(f"digits|sklearn-{sklearn.__version__}".encode())
        return h.hexdigest()[:16]
    root = Path(name_or_path) / source
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                size = os.stat(p).st_size
            except OSError:  # unreadable (e.g. a dangling link): the trial reading it says so
                size = -1
            h.update(f"{rel_dir}/{name}|{size}\n".encode())
            if data_hash == "content" and size >= 0:
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()[:16]


def split_files_fingerprints(name_or_path: str, *, data_hash: str = "size",
                             splits: Sequence[str] = SPLITS) -> dict[str, str]:
    """split -> :func:`files_fingerprint`, each folder walked once (``train`` and ``val`` of
    an ImageNet layout share ``train/``)."""
    by_source: dict[str, str] = {}
    out = {}
    for split in splits:
        source, _ = _split_source(name_or_path, split)
        if source not in by_source:
            by_source[source] = files_fingerprint(name_or_path, split, data_hash=data_hash)
        out[split] = by_source[source]
    return out


def data_fingerprint(name_or_path: str, *, split: str, image_size: int,
                     label_fraction: float | str | None = None, seed: int = 0,
                     holdout: float = DEFAULT_HOLDOUT, bad_images: str = "stop",
                     files: str | None = None, data_hash: str = "size") -> str:
    """A fingerprint of a dataset split as a trial reads it: the split scheme and definition
    (its folder and part, the holdout), its files (:func:`files_fingerprint`, or ``files``
    when the driver computed it already), the transform (image size), the label subset and
    what is done with undecodable images. Two splits never share a fingerprint, so their
    cache entries never collide.

    :param files: ``files_fingerprint(name_or_path, split)`` if known (no walk is made).
    """
    source, part = _split_source(name_or_path, split)
    held = holdout if part in ("fit", "holdout") else None
    h = hashlib.sha256(f"{SPLIT_SCHEME}|{split}|{source}|{part}|{held}|{image_size}|"
                       f"{label_fraction}|{seed}|{bad_images}".encode())
    if label_fraction is not None and not is_number(label_fraction) \
            and Path(label_fraction).is_file():
        h.update(Path(label_fraction).read_bytes())  # a file list: what it lists, not its name
    h.update((files or files_fingerprint(name_or_path, split, data_hash=data_hash)).encode())
    return h.hexdigest()[:16]
