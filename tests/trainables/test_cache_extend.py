"""Entries that extend (trainables/cache/prefix.py, trainables/data/order.py), with real Arrow
files and the demo U-Net, without Ray: an extension from n to m images passes only the m - n
new images and reads back what a one-shot extraction of m stores; a reader of n rows reads
the same bytes after it; every prefix of the interleaved order is near-stratified; a reader
during an extension sees the old or the new manifest, never half; whole-split entries are
untouched."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from difftune.trainables.cache.admin import list_entries, remove
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.cache.parts import check_entry, entry_paths
from difftune.trainables.cache.prefix import head_marker
from difftune.trainables.config import TrialConfig
from difftune.trainables.data.datasets import (
    class_counts,
    dataset_indices,
    shared_dataset,
    targets_of,
)
from difftune.trainables.data.order import (
    DEFAULT_FLOOR,
    ORDER,
    class_sequence,
    interleaved_order,
    rung_rows,
    sample_size,
)
from difftune.trainables.errors import DataError

CFG = TrialConfig(label_fraction=0.05)  # 51 digits training images
REQUESTS = [(30, 4, 2), (30, 10, 2)]
KEYS = [(30, 4), (30, 10)]
BATCH = 8  # several batches; the extension's batches start at n, the one-shot's at 0
N, M = 20, 45
#: the fields a whole-split entry's key has always had (its files must not change)
WHOLE_FIELDS = {"model", "model_fp", "data", "data_fp", "split", "image_size", "t", "seed",
                "block", "pool", "dtype", "precision", "view"}


def rows(features, key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, label, [len x C x P x P] stored x) of ``features``' rows of entry ``key``."""
    m = features.maps()[key]
    n = len(features)
    return m.column(0)[:n], m.column(1)[:n], m.take(np.arange(n))


def close16(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float16 storage (the passes' batches differ)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(np.abs(b).max()))


def manifests(root: Path, block: int) -> list[Path]:
    return sorted(root.rglob(f"*-{ORDER}/b{block}-p2-float16.json"))


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the order


def deviation(labels: np.ndarray, counts: list[int]) -> float:
    """The largest |images of class c in a prefix - its proportional share|, over every
    prefix and class."""
    onehot = np.zeros((len(labels), len(counts)))
    onehot[np.arange(len(labels)), labels] = 1
    share = np.arange(1, len(labels) + 1)[:, None] * np.asarray(counts)[None] / len(labels)
    return float(np.abs(onehot.cumsum(0) - share).max())


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_prefix_of_a_digits_split_is_near_stratified(split):
    ds, _ = shared_dataset("digits", split, _unet()[0].image_size, None, 0)
    targets = np.asarray(targets_of(ds))
    order = interleaved_order(targets)
    assert sorted(order.tolist()) == list(range(len(ds)))  # a permutation of the split
    counts = np.bincount(targets).tolist()
    assert deviation(targets[order], counts) < 1
    assert np.array_equal(order, interleaved_order(targets))  # seeded
    assert not np.array_equal(order, interleaved_order(targets, seed=1))
    assert np.array_equal(targets[order], targets[interleaved_order(targets, seed=1)])
    for fraction in (0.02, 0.1, 1.0):  # from the labels, or (the plan) from class counts
        size = rung_rows(targets, fraction)
        assert size == sample_size(class_counts("digits", split), fraction)
        assert np.bincount(targets[order[:size]]).min() >= DEFAULT_FLOOR


def test_imbalanced_classes_stay_within_one_of_their_share_and_balanced_ones_round_robin():
    rng = np.random.default_rng(0)
    for _ in range(30):
        counts = rng.integers(1, 120, size=int(rng.integers(2, 12))).tolist()
        counts[0] = 400  # one large class among small ones
        assert deviation(class_sequence(counts), counts) < 1
    assert class_sequence([3, 3, 3]).tolist() == [0, 1, 2] * 3
    assert class_sequence([2, 0, 1]).tolist() == [0, 2, 0]  # an empty class takes no slot


def test_a_rung_holds_its_fraction_and_the_floor_per_class():
    counts = [2, 40, 60, 100, 7]
    seq = class_sequence(counts)
    n = sum(counts)
    for fraction in (0.01, 0.02, 0.1, 0.5):
        for floor in (0, 1, 3, 5):
            size = sample_size(counts, fraction, floor)
            held = np.bincount(seq[:size], minlength=len(counts))
            assert size >= np.ceil(fraction * n)
            assert all(h >= min(c, floor) for h, c in zip(held, counts, strict=True))
            if size > np.ceil(fraction * n):  # the shortest prefix that holds the floor
                short = np.bincount(seq[:size - 1], minlength=len(counts))
                assert any(h < min(c, floor) for h, c in zip(short, counts, strict=True))
    assert sample_size(counts, 1.0, 5) == n
    assert sample_size([178] * 10, 0.02, 0) == 36 and sample_size([178] * 10, 0.02, 5) == 50
    for bad in (0, 1.5, True, "0.1"):
        with pytest.raises(DataError):
            sample_size(counts, bad, 5)


# ----------------------------------------------------------------------------- extending


def test_extending_passes_only_the_new_images_and_reads_back_the_one_shot_rows(tmp_path):
    cache = FeatureCache(str(tmp_path / "ext"), batch_size=BATCH)
    small = cache.get_prefix(CFG, "train", REQUESTS, N)
    assert len(small) == N and cache.unet_images == N
    model, diffusion = _unet()
    extractor = cache.extractor_for(model, diffusion)  # the one the cache passes images with
    passed = extractor.forward_images
    big = cache.get_prefix(CFG, "train", REQUESTS, M)
    assert len(big) == M
    assert cache.unet_images == M and extractor.forward_images - passed == M - N  # new only
    for block in (4, 10):
        (path,) = manifests(tmp_path / "ext", block)
        manifest = json.loads(path.read_text())
        assert [(p["start"], p["rows"]) for p in manifest["parts"]] == [(0, N), (N, M - N)]
        assert manifest["key"]["order"] == ORDER and manifest["rows"] == M
    one = FeatureCache(str(tmp_path / "one"), batch_size=BATCH)
    ref = one.get_prefix(CFG, "train", REQUESTS, M)
    assert one.unet_images == M
    ds, _ = shared_dataset("digits", "train", model.image_size, CFG.label_fraction, CFG.seed)
    order = interleaved_order(targets_of(ds))
    for key in KEYS:
        (ia, la, xa), (ib, lb, xb) = rows(big, key), rows(ref, key)
        np.testing.assert_array_equal(ia, np.asarray(dataset_indices(ds))[order[:M]])
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(big.labels, la)
        close16(xa, xb)
    again = cache.get_prefix(CFG, "train", REQUESTS, M)  # a hit
    assert cache.unet_images == M and len(again) == M


def test_one_pass_extends_blocks_that_hold_different_rows(tmp_path):
    root = str(tmp_path / "c")
    FeatureCache(root, batch_size=BATCH).get_prefix(CFG, "train", [(30, 4, 2)], N)
    both = FeatureCache(root, batch_size=BATCH, extra_blocks=[4, 10])
    got = both.get_prefix(CFG, "train", [(30, 10, 2)], M)  # block 10 from 0, block 4 from N
    assert both.unet_images == M and both.stats.forward_batches == -(-M // BATCH)
    parts = {b: [p["rows"] for p in json.loads(manifests(tmp_path / "c", b)[0].read_text()
                                              )["parts"]] for b in (4, 10)}
    assert parts == {4: [N, M - N], 10: [M]}
    served = both.get_prefix(CFG, "train", REQUESTS, M)
    assert both.unet_images == M  # block 4 at M was written by the same pass
    ref = FeatureCache(str(tmp_path / "one"), batch_size=BATCH).get_prefix(
        CFG, "train", REQUESTS, M)
    for key in KEYS:
        (ia, la, xa), (ib, lb, xb) = rows(served, key), rows(ref, key)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        close16(xa, xb)
    close16(rows(got, (30, 10))[2], rows(ref, (30, 10))[2])


def test_a_reader_of_n_rows_reads_the_same_rows_after_an_extension(tmp_path):
    cache = FeatureCache(str(tmp_path / "c"), batch_size=BATCH)
    before = cache.get_prefix(CFG, "train", REQUESTS, N)
    first = {k: rows(before, k) for k in KEYS}
    (part,) = before.entries[(30, 4)][0]
    part_sha = sha(part)
    cache.get_prefix(CFG, "train", REQUESTS, M)
    assert sha(part) == part_sha  # the first part is never rewritten
    after = cache.get_prefix(CFG, "train", REQUESTS, N)
    assert cache.unet_images == M and len(after) == N
    assert after.entries[(30, 4)][0] == (part,)  # the parts holding n rows, no more
    middle = cache.get_prefix(CFG, "train", REQUESTS, 30)
    assert len(middle) == 30 and len(middle.entries[(30, 4)][0]) == 2
    for k in KEYS:
        for a, b, c in zip(first[k], rows(before, k), rows(after, k), strict=True):
            np.testing.assert_array_equal(a, b)  # the open reader reads the same bytes
            np.testing.assert_array_equal(a, c)
        for a, c in zip(rows(middle, k), rows(cache.get_prefix(CFG, "train", REQUESTS, M), k),
                        strict=True):
            np.testing.assert_array_equal(a, c[:30])
    assert cache.unet_images == M
    item, label = after[N - 1]
    assert tuple(item[(30, 4)].shape) == after.shapes()[(30, 4)]
    assert label == int(after.labels[N - 1]) == int(first[(30, 4)][1][N - 1])


def test_a_reader_during_an_extension_sees_the_old_or_the_new_entry_never_half(tmp_path):
    root = tmp_path / "c"
    FeatureCache(str(root), batch_size=BATCH).get_prefix(CFG, "train", REQUESTS, N)
    (path,) = manifests(root, 10)
    inode = path.stat().st_ino
    old = open(path)  # noqa: SIM115 - held across the extension on purpose
    reader = FeatureCache(str(root), batch_size=BATCH)  # another "process": its own cache
    first = rows(reader.get_prefix(CFG, "train", REQUESTS, N), (30, 10))
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read_while_extending() -> None:
        try:
            while not done.is_set():
                manifest = json.loads(path.read_text())  # whole JSON, or this raises
                seen.append(manifest["rows"])
                local = entry_paths(reader.store, str(path.relative_to(root))[:-5],
                                    manifest, reader.mirror)
                assert local is not None and check_entry(local, manifest)
                got = reader.get_prefix(CFG, "train", REQUESTS, N)
                for a, b in zip(first, rows(got, (30, 10)), strict=True):
                    np.testing.assert_array_equal(a, b)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=read_while_extending)
    thread.start()
    try:
        FeatureCache(str(root), batch_size=BATCH).get_prefix(CFG, "train", REQUESTS, M)
    finally:
        done.set()
        thread.join()
    assert not errors, errors
    assert seen and set(seen) <= {N, M}
    assert reader.unet_images == 0  # a reader of n rows never waited nor extracted
    assert json.loads(old.read())["rows"] == N  # the old manifest was replaced, not rewritten
    old.close()
    assert path.stat().st_ino != inode and json.loads(path.read_text())["rows"] == M
    assert not list(root.rglob("*.tmp"))


def test_whole_split_entries_are_untouched(tmp_path):
    mixed = FeatureCache(str(tmp_path / "mixed"), batch_size=BATCH)
    prefix = mixed.get_prefix(CFG, "train", REQUESTS, M)
    whole = mixed.get(CFG, "train", REQUESTS)  # a miss, as before: another key
    assert mixed.unet_images == M + len(whole) and len(whole) == 51
    plain = FeatureCache(str(tmp_path / "plain"), batch_size=BATCH)
    ref = plain.get(CFG, "train", REQUESTS)
    again = plain.get_prefix(CFG, "train", REQUESTS, N)  # nor does a whole entry serve a prefix
    assert plain.unet_images == len(ref) + N and len(again) == N
    for name in ("b4-p2-float16", "b10-p2-float16"):
        (a,) = [p for p in (tmp_path / "mixed").rglob(f"{name}.arrow")]
        (b,) = [p for p in (tmp_path / "plain").rglob(f"{name}.arrow")]
        assert a.read_bytes() == b.read_bytes()  # byte for byte what it always was
        marker = json.loads(a.with_suffix(".json").read_text())
        assert set(marker["key"]) == WHOLE_FIELDS and "parts" not in marker
        assert not a.parent.name.endswith(ORDER)
    listed = list_entries(str(tmp_path / "mixed"))
    assert sorted((e["order"], e["block"], e["rows"]) for e in listed) == [
        ("", 4, 51), ("", 10, 51), (ORDER, 4, M), (ORDER, 10, M)]
    where = {int(i): r for r, i in enumerate(rows(whole, (30, 10))[0])}
    index, _, x = rows(prefix, (30, 10))
    close16(x, rows(whole, (30, 10))[2][[where[int(i)] for i in index]])  # same features
    assert remove(str(tmp_path / "mixed"), t=30) == 4  # cache rm takes the parts with them
    assert not list((tmp_path / "mixed").rglob("*.arrow"))


def test_a_corrupt_later_part_spares_the_head_and_is_reextracted(tmp_path):
    cache = FeatureCache(str(tmp_path / "c"), batch_size=BATCH)
    cache.get_prefix(CFG, "train", REQUESTS, N)
    cache.get_prefix(CFG, "train", REQUESTS, M)
    manifest = json.loads(manifests(tmp_path / "c", 4)[0].read_text())
    assert head_marker(manifest, N)["parts"] == manifest["parts"][:1]
    later = next((tmp_path / "c").rglob(manifest["parts"][1]["file"]))
    later.write_bytes(later.read_bytes()[:-16] + b"\0" * 16)
    fresh = FeatureCache(str(tmp_path / "c"), batch_size=BATCH)
    assert len(fresh.get_prefix(CFG, "train", REQUESTS, N)) == N and fresh.unet_images == 0
    got = fresh.get_prefix(CFG, "train", REQUESTS, M)
    assert fresh.stats.entries_corrupt == 1 and fresh.unet_images == M and len(got) == M


def _unet():
    from difftune.trainables.model.unet import shared_unet

    return shared_unet(CFG.model, CFG.checkpoint, "cpu")
