"""Datasets (trainables.data): digits splits, label-fraction subsets, ImageFolder trees."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from difftune.trainables.data.datasets import (
    CorruptImage,
    DataError,
    class_counts,
    data_fingerprint,
    dataset_indices,
    files_fingerprint,
    load_dataset,
    skipped_images,
    subset_size,
    targets_of,
)
from difftune.trainables.errors import UserError

# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------


SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def digits():
    return {split: load_dataset("digits", split=split, image_size=16) for split in SPLITS}


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


def test_digits_three_splits_are_disjoint_stratified_60_20_20(digits):
    parts = {s: digits[s][0] for s in SPLITS}
    positions = {s: set(dataset_indices(ds)) for s, ds in parts.items()}
    assert sum(len(p) for p in positions.values()) == 1797
    assert set().union(*positions.values()) == set(range(1797))  # disjoint and complete
    for split, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs(len(parts[split]) - share * 1797) <= 1, split
    whole = proportions(targets_of(parts["train"]) + targets_of(parts["val"])
                        + targets_of(parts["test"]))
    for split, ds in parts.items():
        assert np.abs(proportions(targets_of(ds)) - whole).max() < 0.01, split
    # an image's index names the same image in every split: the same pixels as digits[index]
    base = parts["test"].base
    for k in (0, 100, 359):
        assert torch.equal(parts["test"][k][0], base[dataset_indices(parts["test"])[k]][0])
    # no image of val or test is also in train (digits has a handful of exact duplicates)
    tr = {tuple(x[0].flatten().tolist()) for x, _ in parts["train"]}
    for split in ("val", "test"):
        ds = parts[split]
        assert sum(tuple(ds[i][0][0].flatten().tolist()) in tr for i in range(len(ds))) <= 5


def test_digits_split_is_deterministic(digits):
    for split in SPLITS:
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
    assert len(set(idx)) == len(idx) and set(idx) <= set(dataset_indices(full))
    assert abs(len(sub) - 0.1 * len(full)) <= 10
    counts = Counter(targets_of(sub))
    assert sorted(counts) == list(range(10))
    per_class = Counter(full_targets)
    for c in range(10):
        assert abs(counts[c] - 0.1 * per_class[c]) <= 1
    # dataset_indices keep the image's index in the whole set: the same image, the same label
    base = full.base
    for k in (0, len(sub) // 2, len(sub) - 1):
        x, y = sub[k]
        assert torch.equal(x, base[idx[k]][0]) and y == base[idx[k]][1]


def test_label_fraction_keeps_every_class_even_when_tiny(digits):
    sub, _ = load_dataset("digits", split="train", image_size=8, label_fraction=0.001)
    assert sorted(set(targets_of(sub))) == list(range(10))


def test_label_fraction_never_subsamples_val_or_test(digits):
    for split in ("val", "test"):
        ds, _ = load_dataset("digits", split=split, image_size=16, label_fraction=0.1)
        assert len(ds) == len(digits[split][0])


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_bad_label_fraction(fraction):
    with pytest.raises(DataError, match="label_fraction"):
        load_dataset("digits", split="train", image_size=8, label_fraction=fraction)


def test_bad_split_or_name(tmp_path):
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", split="holdout", image_size=8)
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


def make_tree(root, *, per_class: int = 3, classes=("cat", "dog"),
              folders=("train", "val")) -> None:
    for split in folders:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                striped(30 + 3 * i, 10 + i).save(d / f"{c}{i}.png")


def test_image_folder_resize_and_center_crop(tmp_path):
    make_tree(tmp_path, folders=("train", "val", "test"))  # one folder per split
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
    ds, _ = load_dataset(str(tmp_path), split="train", image_size=6, label_fraction=str(listing),
                         holdout=0.25)
    full, _ = load_dataset(str(tmp_path), split="train", image_size=6, holdout=0.25)
    held, _ = load_dataset(str(tmp_path), split="val", image_size=6, holdout=0.25)
    folder = full.base.samples  # indices are positions in train/
    kept = sorted(folder[i][0].rsplit("/", 1)[-1] for i in dataset_indices(ds))
    held_out = {folder[i][0].rsplit("/", 1)[-1] for i in dataset_indices(held)}
    # the listed images that the holdout did not take (it keeps them for selection)
    assert kept == sorted({"cat1.png", "cat2.png", "dog3.png"} - held_out) and kept
    assert targets_of(ds) == [folder[i][1] for i in dataset_indices(ds)]
    with pytest.raises(DataError, match="none of the training images"):
        (tmp_path / "none.txt").write_text("zebra.png\n")
        load_dataset(str(tmp_path), split="train", image_size=6,
                     label_fraction=str(tmp_path / "none.txt"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path), split="train", image_size=6,
                     label_fraction=str(tmp_path / "missing.txt"))


def test_image_folder_label_fraction_number(tmp_path):
    make_tree(tmp_path, per_class=11)
    ds, _ = load_dataset(str(tmp_path), split="train", image_size=6, label_fraction=0.3, seed=2)
    again, _ = load_dataset(str(tmp_path), split="train", image_size=6, label_fraction=0.3, seed=2)
    assert dataset_indices(ds) == dataset_indices(again)
    assert Counter(targets_of(ds)) == {0: 3, 1: 3}  # 30% of the 10 per class the holdout left


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
    bad = tmp_path / "val" / "dog" / "dog1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds, _ = load_dataset(str(tmp_path), split="test", image_size=6)
    k = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(CorruptImage, match="dog1.png") as info:
        ds[k]
    assert isinstance(info.value, UserError) and "bad_images: skip" in str(info.value)


def test_bad_images_skip_leaves_them_out_of_every_split(tmp_path):
    make_tree(tmp_path, per_class=4)
    bad = tmp_path / "val" / "dog" / "dog1.png"
    bad.write_bytes(np.random.default_rng(0).bytes(300))  # random bytes named .png
    ds, _ = load_dataset(str(tmp_path), split="test", image_size=6, bad_images="skip")
    assert len(ds) == 7 and str(bad) not in [p for p, _ in ds.samples]
    assert [ds[i][1] for i in range(len(ds))] == targets_of(ds)  # every image reads
    assert skipped_images(str(tmp_path)) == [str(bad)]
    with pytest.raises(DataError, match="bad_images"):
        load_dataset(str(tmp_path), split="test", image_size=6, bad_images="ignore")


def test_an_unreadable_file_is_an_io_error_not_a_data_error(tmp_path):
    """A file that cannot be read (here: a dangling link, as on a flaky mount) raises the
    OSError (transient: a search retries it); only bytes that cannot be decoded are a
    DataError (deterministic: a search stops)."""
    make_tree(tmp_path)
    link = tmp_path / "val" / "dog" / "dog9.png"
    link.symlink_to(tmp_path / "gone.png")
    ds, _ = load_dataset(str(tmp_path), split="test", image_size=6)
    k = [p for p, _ in ds.samples].index(str(link))
    with pytest.raises(OSError) as info:
        ds[k]
    assert not isinstance(info.value, DataError)


def test_val_labels_index_the_train_classes(tmp_path):
    make_tree(tmp_path, classes=("ant", "bee", "cat"))
    for f in (tmp_path / "val" / "ant").iterdir():
        f.unlink()
    (tmp_path / "val" / "ant").rmdir()  # val lacks the first class
    val, classes = load_dataset(str(tmp_path), split="test", image_size=6)
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
        load_dataset(str(tmp_path), split="test", image_size=6)


def test_image_folder_three_splits_are_disjoint_and_stratified(tmp_path):
    """ImageNet's layout (train/ + val/): test is val/, the selection split a seeded
    stratified holdout of train/ (at least one image per class) that train then lacks."""
    make_tree(tmp_path, per_class=10, classes=("ant", "bee", "cat"))
    (tmp_path / "train" / "cat" / "cat9.png").unlink()  # 9 cats: 10% rounds to one
    name = str(tmp_path)
    splits = {s: load_dataset(name, split=s, image_size=6, holdout=0.2)[0] for s in SPLITS}
    files = {s: {p for p, _ in ds.samples} for s, ds in splits.items()}
    train_dir = {str(p) for p in (tmp_path / "train").rglob("*.png")}
    assert files["train"] | files["val"] == train_dir and not files["train"] & files["val"]
    assert files["test"] == {str(p) for p in (tmp_path / "val").rglob("*.png")}
    assert Counter(targets_of(splits["val"])) == {0: 2, 1: 2, 2: 2}  # 20% of each class
    assert Counter(targets_of(splits["train"])) == {0: 8, 1: 8, 2: 7}
    again = load_dataset(name, split="val", image_size=6, holdout=0.2)[0]
    assert dataset_indices(again) == dataset_indices(splits["val"])  # seeded
    tiny = load_dataset(name, split="val", image_size=6, holdout=0.01)[0]
    assert Counter(targets_of(tiny)) == {0: 1, 1: 1, 2: 1}  # at least one per class
    # one index space per folder: fit and holdout never share an index
    assert not set(dataset_indices(splits["train"])) & set(dataset_indices(splits["val"]))
    fps = {data_fingerprint(name, split=s, image_size=6, holdout=0.2) for s in SPLITS}
    assert len(fps) == 3  # cache entries of different splits never collide
    assert data_fingerprint(name, split="val", image_size=6, holdout=0.1) not in fps


def test_image_folder_with_a_test_folder_reads_one_folder_per_split(tmp_path):
    make_tree(tmp_path, folders=("train", "val", "test"), per_class=2)
    for split in SPLITS:
        ds, _ = load_dataset(str(tmp_path), split=split, image_size=6)
        assert {p for p, _ in ds.samples} == {str(p) for p in (tmp_path / split).rglob("*.png")}


@pytest.mark.parametrize("holdout", [0, 1, 1.5, -0.1])
def test_bad_holdout(tmp_path, holdout):
    make_tree(tmp_path)
    with pytest.raises(DataError, match="holdout"):
        load_dataset(str(tmp_path), split="val", image_size=6, holdout=holdout)


def test_holdout_needs_two_images_per_class(tmp_path):
    make_tree(tmp_path, per_class=1)
    with pytest.raises(DataError, match="at least 2 images per class"):
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
    # val is a holdout of train/ (ImageNet's layout): the same files; test is val/
    assert files_fingerprint(str(tmp_path / "a"), "val") == fp
    assert files_fingerprint(str(tmp_path / "a"), "test") != fp
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
    from difftune.trainables.data import datasets as data

    make_tree(tmp_path)
    kw = dict(split="train", image_size=6, label_fraction=0.5, seed=1)
    walked = data_fingerprint(str(tmp_path), **kw)
    files = files_fingerprint(str(tmp_path), "train")
    monkeypatch.setattr(data.os, "walk", lambda *a, **k: pytest.fail("walked the data"))
    assert data_fingerprint(str(tmp_path), files=files, **kw) == walked


def test_the_driver_walks_each_folder_once_and_splits_never_share_a_fingerprint(
        tmp_path, monkeypatch):
    import os

    from difftune.trainables.data import datasets as data

    make_tree(tmp_path)
    walked = []
    real_walk = os.walk
    monkeypatch.setattr(data.os, "walk", lambda root: walked.append(root) or real_walk(root))
    files = data.split_files_fingerprints(str(tmp_path))
    assert sorted(os.path.basename(w) for w in walked) == ["train", "val"]  # train/ serves two splits
    assert files["train"] == files["val"] != files["test"]
    monkeypatch.setattr(data.os, "walk", lambda *a, **k: pytest.fail("walked the data"))
    fps = {s: data_fingerprint(str(tmp_path), split=s, image_size=6, files=files[s])
           for s in ("train", "val", "test")}
    assert len(set(fps.values())) == 3  # the split's definition is in its fingerprint
    assert data_fingerprint(str(tmp_path), split="val", image_size=6, files=files["val"],
                            holdout=0.2) != fps["val"]


def test_class_counts_and_subset_sizes_without_reading_images(tmp_path, digits):
    make_tree(tmp_path, per_class=3)
    # ImageNet's layout: val is a holdout of train/ (one image per class), test is val/
    for split in ("train", "val", "test"):
        ds, _ = load_dataset(str(tmp_path), split=split, image_size=6)
        assert class_counts(str(tmp_path), split) == np.bincount(ds.targets).tolist()
    assert class_counts(str(tmp_path), "train") == [2, 2]
    for split in ("train", "val", "test"):
        counts = class_counts("digits", split)
        assert sum(counts) == len(digits[split][0])
    counts = class_counts("digits", "train")
    for fraction in (0.03, 0.2, 1.0):
        ds, _ = load_dataset("digits", split="train", image_size=8, label_fraction=fraction)
        assert subset_size(counts, fraction) == len(ds)
    assert subset_size(counts, None) == sum(counts)
