"""Datasets (trainables.data): digits splits, label-fraction subsets, ImageFolder trees."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from difftune.trainables.data import (
    DataError,
    class_counts,
    data_fingerprint,
    dataset_indices,
    files_fingerprint,
    load_dataset,
    subset_size,
    targets_of,
)
from difftune.trainables.errors import UserError

# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return {split: load_dataset("digits", split=split, image_size=16) for split in ("train", "val")}


def proportions(labels) -> np.ndarray:
    counts = np.bincount(np.asarray(labels), minlength=10)
    return counts / counts.sum()


def test_digits_images_and_labels(digits):
    for split, (ds, classes) in digits.items():
        assert classes == [str(c) for c in range(10)]
        x, y = ds[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert isinstance(y, int) and 0 <= y < 10
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        assert xs.min() >= -1 and xs.max() <= 1
        assert xs.min() < -0.9 and xs.max() > 0.9  # uses the whole range
        assert torch.equal(xs[:, 0], xs[:, 1]) and torch.equal(xs[:, 0], xs[:, 2])
        assert targets_of(ds) == [ds[i][1] for i in range(len(ds))]
        assert len(set(targets_of(ds))) == 10, split


def test_digits_image_size(digits):
    ds, _ = load_dataset("digits", split="val", image_size=8)
    assert ds[0][0].shape == (3, 8, 8)
    ds32, _ = load_dataset("digits", split="val", image_size=32)
    assert ds32[0][0].shape == (3, 32, 32)
    assert targets_of(ds32) == targets_of(digits["val"][0])


def test_digits_split_is_stratified_and_disjoint(digits):
    train, val = digits["train"][0], digits["val"][0]
    assert len(train) + len(val) == 1797
    assert 0.15 <= len(val) / 1797 <= 0.3
    diff = np.abs(proportions(targets_of(train)) - proportions(targets_of(val)))
    assert diff.max() < 0.01, diff
    # no image of val is also in train
    tr = {tuple(train[i][0][0].flatten().tolist()) for i in range(len(train))}
    overlap = sum(tuple(val[i][0][0].flatten().tolist()) in tr for i in range(len(val)))
    assert overlap <= 5  # digits has a handful of exact duplicates, no more


def test_digits_split_is_deterministic(digits):
    for split in ("train", "val"):
        again, _ = load_dataset("digits", split=split, image_size=16)
        ds = digits[split][0]
        assert targets_of(again) == targets_of(ds)
        assert all(torch.equal(again[i][0], ds[i][0]) for i in range(0, len(ds), 37))


def test_label_fraction_is_seeded_stratified_subset(digits):
    full = digits["train"][0]
    full_targets = targets_of(full)
    sub, _ = load_dataset("digits", split="train", image_size=16, label_fraction=0.1, seed=0)
    again, _ = load_dataset("digits", split="train", image_size=16, label_fraction=0.1, seed=0)
    other, _ = load_dataset("digits", split="train", image_size=16, label_fraction=0.1, seed=1)
    idx = dataset_indices(sub)
    assert idx == dataset_indices(again)
    assert idx != dataset_indices(other)
    assert len(set(idx)) == len(idx) and all(0 <= i < len(full) for i in idx)
    assert abs(len(sub) - 0.1 * len(full)) <= 10
    counts = Counter(targets_of(sub))
    assert sorted(counts) == list(range(10))
    per_class = Counter(full_targets)
    for c in range(10):
        assert abs(counts[c] - 0.1 * per_class[c]) <= 1
    # dataset_indices are positions in the full split: the same image, the same label
    for k in (0, len(sub) // 2, len(sub) - 1):
        x, y = sub[k]
        assert torch.equal(x, full[idx[k]][0]) and y == full_targets[idx[k]]
    assert targets_of(sub) == [full_targets[i] for i in idx]


def test_label_fraction_keeps_every_class_even_when_tiny(digits):
    sub, _ = load_dataset("digits", split="train", image_size=8, label_fraction=0.001)
    assert sorted(set(targets_of(sub))) == list(range(10))


def test_label_fraction_never_subsamples_val(digits):
    val, _ = load_dataset("digits", split="val", image_size=16, label_fraction=0.1)
    assert len(val) == len(digits["val"][0])


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_bad_label_fraction(fraction):
    with pytest.raises(DataError, match="label_fraction"):
        load_dataset("digits", split="train", image_size=8, label_fraction=fraction)


def test_bad_split_or_name(tmp_path):
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", split="test", image_size=8)
    with pytest.raises(DataError, match="digits") as info:
        load_dataset(str(tmp_path / "nowhere"), split="train", image_size=8)
    assert isinstance(info.value, UserError)


# --------------------------------------------------------------------------------------
# ImageFolder trees
# --------------------------------------------------------------------------------------

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def striped(width: int, height: int) -> Image.Image:
    """Left third red, middle third green, right third blue."""
    img = Image.new("RGB", (width, height), GREEN)
    third = width // 3
    img.paste(RED, (0, 0, third, height))
    img.paste(BLUE, (width - third, 0, width, height))
    return img


def make_tree(root, *, per_class: int = 3, classes=("cat", "dog")) -> None:
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                striped(30 + 3 * i, 10 + i).save(d / f"{c}{i}.png")


def test_image_folder_resize_and_center_crop(tmp_path):
    make_tree(tmp_path)
    ds, classes = load_dataset(str(tmp_path), split="train", image_size=6)
    assert classes == ["cat", "dog"]
    assert len(ds) == 6
    assert sorted(targets_of(ds)) == [0, 0, 0, 1, 1, 1]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 6, 6) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        # the wide image is resized to height 6 and center-cropped: only the green middle
        # third is left (so the crop is centered, not squashed nor taken from a corner)
        centre = x[:, 1:5, 1:5]
        assert centre[1].min() > 0.9 and centre[0].max() < -0.9 and centre[2].max() < -0.9
    val, val_classes = load_dataset(str(tmp_path), split="val", image_size=6)
    assert val_classes == classes and len(val) == 6


def test_image_folder_label_fraction_file_keeps_exactly_the_listed_images(tmp_path):
    make_tree(tmp_path, per_class=4)
    listing = tmp_path / "keep.txt"
    listing.write_text("cat1.png\ndog/dog3.png\n\n  cat2.png \n")
    ds, _ = load_dataset(str(tmp_path), split="train", image_size=6, label_fraction=str(listing))
    full, _ = load_dataset(str(tmp_path), split="train", image_size=6)
    kept = sorted(full.samples[i][0].rsplit("/", 1)[-1] for i in dataset_indices(ds))
    assert kept == ["cat1.png", "cat2.png", "dog3.png"]
    assert targets_of(ds) == [full.samples[i][1] for i in dataset_indices(ds)]
    with pytest.raises(DataError, match="none of the training images"):
        (tmp_path / "none.txt").write_text("zebra.png\n")
        load_dataset(str(tmp_path), split="train", image_size=6,
                     label_fraction=str(tmp_path / "none.txt"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path), split="train", image_size=6,
                     label_fraction=str(tmp_path / "missing.txt"))


def test_image_folder_label_fraction_number(tmp_path):
    make_tree(tmp_path, per_class=10)
    ds, _ = load_dataset(str(tmp_path), split="train", image_size=6, label_fraction=0.3, seed=2)
    again, _ = load_dataset(str(tmp_path), split="train", image_size=6, label_fraction=0.3, seed=2)
    assert dataset_indices(ds) == dataset_indices(again)
    assert Counter(targets_of(ds)) == {0: 3, 1: 3}


def test_folder_without_train_split(tmp_path):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="train/"):
        load_dataset(str(tmp_path), split="train", image_size=8)


def test_folder_without_class_subfolders(tmp_path):
    (tmp_path / "train").mkdir()
    striped(9, 9).save(tmp_path / "train" / "loose.png")
    with pytest.raises(DataError, match="class subfolders"):
        load_dataset(str(tmp_path), split="train", image_size=8)


def test_class_folder_without_images(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError):
        load_dataset(str(tmp_path), split="train", image_size=8)


def test_corrupt_image_names_the_file(tmp_path):
    make_tree(tmp_path)
    bad = tmp_path / "train" / "dog" / "dog1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds, _ = load_dataset(str(tmp_path), split="train", image_size=6)
    k = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(DataError, match="dog1.png") as info:
        ds[k]
    assert isinstance(info.value, UserError)


def test_val_labels_index_the_train_classes(tmp_path):
    make_tree(tmp_path, classes=("ant", "bee", "cat"))
    for f in (tmp_path / "val" / "ant").iterdir():
        f.unlink()
    (tmp_path / "val" / "ant").rmdir()  # val lacks the first class
    val, classes = load_dataset(str(tmp_path), split="val", image_size=6)
    assert classes == ["ant", "bee", "cat"]
    names = {p.rsplit("/", 1)[-1][:3] for p, _ in val.samples}
    assert names == {"bee", "cat"}
    for path, label in val.samples:
        assert classes[label] == path.rsplit("/", 1)[-1][:3]
    assert sorted(targets_of(val)) == [1, 1, 1, 2, 2, 2]
    assert val[0][1] in (1, 2)


def test_val_class_unknown_to_train(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "val" / "emu").mkdir()
    striped(9, 9).save(tmp_path / "val" / "emu" / "emu0.png")
    with pytest.raises(DataError, match="emu"):
        load_dataset(str(tmp_path), split="val", image_size=6)


@pytest.mark.parametrize("size", [0, -8, 8.5, "16", True])
def test_bad_image_size(size):
    with pytest.raises(DataError, match="image_size"):
        load_dataset("digits", split="val", image_size=size)


def test_fingerprint_follows_the_label_fraction_file(tmp_path):
    make_tree(tmp_path)
    listing = tmp_path / "keep.txt"
    listing.write_text("cat1.png\n")
    kw = dict(split="train", image_size=6, label_fraction=str(listing))
    a = data_fingerprint(str(tmp_path), **kw)
    assert data_fingerprint(str(tmp_path), **kw) == a
    listing.write_text("cat1.png\ndog2.png\n")
    assert data_fingerprint(str(tmp_path), **kw) != a
    d = data_fingerprint("digits", split="train", image_size=16, label_fraction=0.1)
    assert d != data_fingerprint("digits", split="train", image_size=16, label_fraction=0.2)
    assert d != data_fingerprint("digits", split="train", image_size=16, label_fraction=0.1,
                                 seed=1)


def test_fingerprint_keys_on_relative_paths_and_sizes_never_mtimes(tmp_path):
    import os
    import shutil

    make_tree(tmp_path / "a")
    fp = files_fingerprint(str(tmp_path / "a"), "train")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")  # another place, new mtimes
    assert files_fingerprint(str(tmp_path / "elsewhere" / "b"), "train") == fp
    some = tmp_path / "a" / "train" / "cat" / "cat0.png"
    os.utime(some, (1, 1))
    assert files_fingerprint(str(tmp_path / "a"), "train") == fp
    assert files_fingerprint(str(tmp_path / "a"), "val") != fp
    # same size, other bytes: only the content hash sees it
    data = bytearray(some.read_bytes())
    data[-1] ^= 0xFF
    content = files_fingerprint(str(tmp_path / "a"), "train", data_hash="content")
    some.write_bytes(bytes(data))
    assert files_fingerprint(str(tmp_path / "a"), "train") == fp
    assert files_fingerprint(str(tmp_path / "a"), "train", data_hash="content") != content
    some.write_bytes(bytes(data) + b"x")  # another size
    assert files_fingerprint(str(tmp_path / "a"), "train") != fp
    with pytest.raises(DataError, match="data-hash"):
        files_fingerprint(str(tmp_path / "a"), "train", data_hash="mtime")


def test_a_fingerprint_handed_over_is_used_without_walking(tmp_path, monkeypatch):
    from difftune.trainables import data

    make_tree(tmp_path)
    kw = dict(split="train", image_size=6, label_fraction=0.5, seed=1)
    walked = data_fingerprint(str(tmp_path), **kw)
    files = files_fingerprint(str(tmp_path), "train")
    monkeypatch.setattr(data.os, "walk", lambda *a, **k: pytest.fail("walked the data"))
    assert data_fingerprint(str(tmp_path), files=files, **kw) == walked


def test_class_counts_and_subset_sizes_without_reading_images(tmp_path, digits):
    make_tree(tmp_path, per_class=3)
    assert class_counts(str(tmp_path), "train") == [3, 3]
    counts = class_counts("digits", "train")
    assert sum(counts) == len(digits["train"][0])
    for fraction in (0.03, 0.2, 1.0):
        ds, _ = load_dataset("digits", split="train", image_size=8, label_fraction=fraction)
        assert subset_size(counts, fraction) == len(ds)
    assert subset_size(counts, None) == sum(counts)
